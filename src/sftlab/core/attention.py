"""Which attention kernel a training micro-batch runs: `attn_implementation: auto`.

On a CPU, PyTorch's fused SDPA kernel has a slow backward for short sequences. Measured on the default
model (LoRA, bf16 autocast, 2 cores, forward + backward of 4 rows): plain matmul ("eager") attention
took 0.44 s against SDPA's 0.54 s at 116 tokens, broke even near 256 tokens and lost beyond (0.70x at
512). Eager was also closer to fp32: loss 0.9168 vs SDPA's 0.9076 against fp32's 0.9184 on the same
batch, because it takes the softmax in fp32. But eager keeps the [rows, heads, L, L] probabilities for
backward (about 4 + compute-dtype bytes per element and layer, measured 4.8-5.1 with bf16).

So `auto` picks, per micro-batch, eager on CPU when the batch is short (L <= EAGER_MAX_LEN) and those
probabilities stay small (<= EAGER_MAX_BYTES), else SDPA; on GPUs it is always SDPA. Packed batches
carry a mask made for one kernel and are not switched.
"""

from __future__ import annotations

EAGER_MAX_LEN = 256
EAGER_MAX_BYTES = 512 * 2**20


def eager_extra_bytes(batch: int, seq_len: int, n_heads: int, n_layers: int, compute_bytes: int) -> int:
    """Memory eager attention keeps for backward beyond SDPA: the softmax (fp32) and its compute-dtype copy."""
    per_element = 4 + (compute_bytes if compute_bytes != 4 else 0)
    return batch * n_heads * seq_len * seq_len * n_layers * per_element


def pick_attention(requested: str, *, device: str, batch: int, seq_len: int, n_heads: int, n_layers: int,
                   compute_bytes: int) -> str:
    """The kernel for one micro-batch (or the worst case of a run) under ``requested``."""
    if requested != "auto":
        return requested
    if device != "cpu" or seq_len > EAGER_MAX_LEN:
        return "sdpa"
    if eager_extra_bytes(batch, seq_len, n_heads, n_layers, compute_bytes) > EAGER_MAX_BYTES:
        return "sdpa"
    return "eager"


class AttentionSwitch:
    """Sets the attention kernel of a (possibly peft-wrapped) model before each micro-batch."""

    def __init__(self, model, compute_bytes: int):
        import torch  # deferred: heavy library, imported on first use

        self.configs = []
        for module in model.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c in self.configs):
                self.configs.append(cfg)
        base = self.configs[0] if self.configs else None
        self.n_heads = getattr(base, "num_attention_heads", 0) or 0
        self.n_layers = getattr(base, "num_hidden_layers", 0) or 0
        self.compute_bytes = compute_bytes
        self.device = "cpu" if next(model.parameters()).device.type == "cpu" else "cuda"
        self.current = base._attn_implementation if base is not None else None
        self.counts: dict[str, int] = {}
        self.enabled = bool(self.configs) and self.n_heads > 0 and self.device == "cpu" and torch.cuda.device_count() == 0

    def before(self, input_ids) -> None:
        if not self.enabled:
            return
        batch, seq_len = input_ids.shape[0], input_ids.shape[-1]
        impl = pick_attention("auto", device=self.device, batch=batch, seq_len=seq_len, n_heads=self.n_heads,
                              n_layers=self.n_layers, compute_bytes=self.compute_bytes)
        self.counts[impl] = self.counts.get(impl, 0) + 1
        if impl != self.current:
            for cfg in self.configs:
                cfg._attn_implementation = impl
            self.current = impl
