"""Optional GPU kernels, each behind an ``auto`` config key that turns it on only where it measures
faster and computes the same thing.

- ``liger_kernels``: liger-kernel's Triton RMSNorm, SwiGLU MLP and RoPE patched into the model
  (``pip install sftlab[gpu]``);
- ``fused_loss``: liger-kernel's fused linear cross entropy in place of the chunked loss of
  ``core/loss.py`` (its Triton cross entropy over chunks about the size of the hidden states; for the
  per-token losses sftlab asks for, liger 0.8.2+ recomputes the logits in backward, as the chunked
  loss does);
- ``compile_blocks``: ``torch.compile`` of each decoder block;
- FlashAttention-2 varlen for packed rows is chosen by ``attn_implementation: auto``
  (:func:`flash_attention_available`): packed rows then carry position ids and no mask.

``auto`` runs a :class:`Trial` per kernel on the model's own shapes: the reference module and the
candidate on the same input, forward and backward, a few repetitions; :func:`choose` keeps the
candidate where it is at least 5% faster and its output matches within a tolerance. On a CPU, or
where the package is missing, ``auto`` is off and says why (:class:`KernelChoice`). None of this has
been measured on a GPU yet (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import time
from dataclasses import asdict, dataclass

from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.core.loss import IGNORE, fusable, per_token_losses

SPEEDUP = 1.05  # a kernel must be at least 5% faster to be worth a different code path
TOLERANCE = 2e-2  # largest relative difference of outputs allowed (bf16 rounds at ~4e-3 per op)


@dataclass
class Trial:
    """One measurement: reference and candidate time (ms per forward+backward) and the largest relative
    difference between their outputs."""

    reference_ms: float
    candidate_ms: float
    max_rel_diff: float


@dataclass
class KernelChoice:
    """Whether a kernel is used, and why (``reason``), with the trial behind an ``auto`` decision."""

    name: str
    enabled: bool
    reason: str
    trial: Trial | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def choose(name: str, trial: Trial, *, speedup: float = SPEEDUP, tolerance: float = TOLERANCE) -> KernelChoice:
    """The ``auto`` rule: on only when the candidate is ``speedup`` times faster and matches within ``tolerance``."""
    if trial.max_rel_diff > tolerance:
        return KernelChoice(name, False, f"output differs by {trial.max_rel_diff:.2g} (> {tolerance:g})", trial)
    ratio = trial.reference_ms / max(trial.candidate_ms, 1e-9)
    if ratio < speedup:
        return KernelChoice(name, False, f"measured {ratio:.2f}x the reference (needs {speedup:g}x)", trial)
    return KernelChoice(name, True, f"measured {ratio:.2f}x faster, outputs match", trial)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def flash_attention_available() -> bool:
    """FlashAttention-2 usable: a CUDA device and the ``flash_attn`` package."""
    import torch  # deferred: heavy library, imported on first use

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _time_ms(fn, reps: int = 5) -> float:
    import torch  # deferred: heavy library, imported on first use

    fn()  # warm-up: Triton autotuning and compilation happen here
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def run_trial(reference, candidate, make_input) -> Trial:
    """Time ``reference`` and ``candidate`` (modules on the GPU) forward+backward on ``make_input()``
    and compare their outputs."""
    import torch  # deferred: heavy library, imported on first use

    x = make_input()

    def step(module):
        def go():
            xi = x.detach().requires_grad_(True)
            out = module(xi)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()
            return out
        return go

    with torch.no_grad():
        ref_out, cand_out = reference(x), candidate(x)
    ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    cand_out = cand_out[0] if isinstance(cand_out, tuple) else cand_out
    diff = ((ref_out.float() - cand_out.float()).abs().max() / ref_out.float().abs().max().clamp_min(1e-6)).item()
    return Trial(_time_ms(step(reference)), _time_ms(step(candidate)), diff)


def _decoder_layers(model):
    """The decoder blocks of a (PEFT-wrapped) causal LM, or None when the model has no ``layers`` list."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    return getattr(inner, "layers", None)


def _trial_layer(model, precision: str):
    """A copy of the first decoder block on the GPU, in the dtype training computes in (bf16 under
    bf16 autocast), so the trial neither moves nor changes the model."""
    import torch  # deferred: heavy library, imported on first use

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return copy.deepcopy(_decoder_layers(model)[0]).to("cuda", dtype), dtype


def _input_for(model, tokens: int, dtype):
    import torch  # deferred: heavy library, imported on first use

    hidden = model.config.hidden_size
    return lambda: torch.randn(1, tokens, hidden, device="cuda", dtype=dtype)


def liger_trial(model, precision: str, tokens: int = 2048) -> Trial:
    """One decoder block's RMSNorm and MLP, the model's own against liger-kernel's, with copied weights."""
    from liger_kernel.transformers import (  # deferred: optional GPU extra
        LigerRMSNorm,
        LigerSwiGLUMLP,
    )

    layer, dtype = _trial_layer(model, precision)
    cfg = model.config
    ref_norm, ref_mlp = layer.input_layernorm, layer.mlp
    norm = LigerRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps).to(ref_norm.weight.device, ref_norm.weight.dtype)
    norm.weight.data.copy_(ref_norm.weight.data)
    mlp = copy.deepcopy(ref_mlp)
    mlp.forward = LigerSwiGLUMLP.forward.__get__(mlp)  # same weights, liger's fused SiLU*mul
    make = _input_for(model, tokens, dtype)
    a, b = run_trial(ref_norm, norm, make), run_trial(ref_mlp, mlp, make)
    return Trial(a.reference_ms + b.reference_ms, a.candidate_ms + b.candidate_ms, max(a.max_rel_diff, b.max_rel_diff))


def compile_trial(model, precision: str, tokens: int = 2048) -> Trial:
    """One decoder block eager against the same block under ``torch.compile`` (hidden states only)."""
    import torch  # deferred: heavy library, imported on first use

    layer, dtype = _trial_layer(model, precision)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    rotary = copy.deepcopy(rotary).to("cuda") if rotary is not None else None
    make = _input_for(model, tokens, dtype)

    class Block(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            pos = torch.arange(h.shape[1], device=h.device)[None]
            emb = rotary(h, pos) if rotary is not None else None
            return self.inner(h, position_embeddings=emb, position_ids=pos)

    ref = Block(layer)
    return run_trial(ref, torch.compile(Block(layer)), make)


def liger_fused_ce(h, weight, bias, target, label_smoothing: float):
    """liger-kernel's fused linear cross entropy in ``core.loss.FusedCE``'s form: per-token losses."""
    from liger_kernel.transformers.functional import (  # deferred: optional GPU extra
        liger_fused_linear_cross_entropy,
    )

    return liger_fused_linear_cross_entropy(h, weight, target, bias, ignore_index=IGNORE,
                                            label_smoothing=label_smoothing, reduction="none")


def loss_trial(head, precision: str, *, train_head: bool, fused=None, tokens: int = 4096,
               device: str = "cuda", timer=None) -> Trial:
    """sftlab's chunked loss against ``fused`` (default: liger's) on a copy of the output head, forward
    and backward over ``tokens`` trained positions; the difference is the larger of the losses' and the
    hidden-state gradients' (and the head's, when trained)."""
    import torch  # deferred: heavy library, imported on first use

    fused = fused or liger_fused_ce
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    lin = copy.deepcopy(head).to(device)
    lin.requires_grad_(train_head)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(1, tokens + 1, lin.in_features, device=device, generator=gen).to(lin.weight.dtype)
    labels = torch.randint(lin.out_features, (1, tokens + 1), device=device, generator=gen)
    labels[0, 0] = IGNORE
    # per-token upstream gradients that differ (loss weights, per-sequence means): liger before 0.8.2
    # scaled the whole gradient by one of them
    token_weights = torch.rand(tokens, device=device, generator=gen) + 0.5

    def step(f):
        def go():
            lin.zero_grad(set_to_none=True)
            x = hidden.detach().requires_grad_(True)
            with torch.autocast(device, dtype, enabled=dtype != torch.float32):
                losses, _ = per_token_losses(x, lin, labels, fused=f)
            (losses * token_weights).sum().backward()
            grads = [x.grad] + ([lin.weight.grad] if train_head else [])
            return losses.detach(), [g.float() for g in grads]
        return go

    (ref_l, ref_g), (cand_l, cand_g) = step(None)(), step(fused)()

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-6)).item()

    diff = max([rel(ref_l, cand_l)] + [rel(a, b) for a, b in zip(ref_g, cand_g)])
    timer = timer or _time_ms
    return Trial(timer(step(None)), timer(step(fused)), diff)


def _decide(key: str, setting, available: str | None, trial_fn) -> KernelChoice:
    """``setting`` is True, False or "auto"; ``available`` is None or why the kernel cannot run here."""
    if setting is False:
        return KernelChoice(key, False, "off in the config")
    if available is not None:
        if setting is True:
            raise SftlabError(f"config key '{key}': true, but {available}", hint=f"--set {key}=auto")
        return KernelChoice(key, False, available)
    if setting is True:
        return KernelChoice(key, True, "on in the config")
    try:
        return choose(key, trial_fn())
    except Exception as exc:  # a kernel that fails its trial is simply not used
        return KernelChoice(key, False, f"trial failed: {type(exc).__name__}: {exc}")


def _why_not_liger(model) -> str | None:
    import torch  # deferred: heavy library, imported on first use

    if not torch.cuda.is_available():
        return "no CUDA device (liger-kernel's Triton kernels run on GPUs)"
    if not liger_available():
        return "liger-kernel is not installed (pip install 'sftlab[gpu]')"
    if _decoder_layers(model) is None or not hasattr(model.config, "rms_norm_eps"):
        return "the model is not a Llama-style decoder (RMSNorm + SwiGLU)"
    return None


def _why_not_fused(cfg: Config, model) -> str | None:
    import torch  # deferred: heavy library, imported on first use

    if not torch.cuda.is_available():
        return "no CUDA device (liger-kernel's Triton kernels run on GPUs)"
    if not liger_available():
        return "liger-kernel is not installed (pip install 'sftlab[gpu]')"
    if cfg.deepspeed or cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "sharded parameters (fsdp, deepspeed): the head's weight is whole only inside its own forward"
    version = importlib.metadata.version("liger-kernel")
    if tuple(int(p) for p in version.split(".")[:3] if p.isdigit()) < (0, 8, 2):
        return f"liger-kernel {version} is older than 0.8.2 (per-token gradients of reduction='none')"
    if not fusable(model.get_output_embeddings()):
        return "the output head is not a plain linear layer"
    return None


def fused_loss_fn(choices: list[KernelChoice]):
    """The fused cross entropy for ``core.loss.sft_loss`` when ``fused_loss`` was chosen, else None."""
    return liger_fused_ce if any(c.name == "fused_loss" and c.enabled for c in choices) else None


def _why_not_compile(model) -> str | None:
    import torch  # deferred: heavy library, imported on first use

    if _decoder_layers(model) is None:
        return "the model has no decoder block list to compile"
    if not torch.cuda.is_available():
        return "no CUDA device (on a CPU compiling blocks costs more than it saves in short runs)"
    return None


def apply_kernels(cfg: Config, model) -> list[KernelChoice]:
    """Decide ``liger_kernels``, ``fused_loss`` and ``compile_blocks`` for ``model`` (before PEFT wraps it) and apply
    what is on. Returns the decisions, for the run's summary."""
    out = [_decide("liger_kernels", cfg.liger_kernels, _why_not_liger(model), lambda: liger_trial(model, cfg.precision))]
    if out[0].enabled:
        from liger_kernel.transformers import (  # deferred: optional GPU extra
            _apply_liger_kernel_to_instance,
        )

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    out.append(_decide("fused_loss", cfg.fused_loss, _why_not_fused(cfg, model),
                       lambda: loss_trial(model.get_output_embeddings(), cfg.precision, train_head=cfg.method == "full")))
    compile_setting = cfg.compile_blocks
    if compile_setting is True and _decoder_layers(model) is not None:
        out.append(KernelChoice("compile_blocks", True, "on in the config"))
    else:
        out.append(_decide("compile_blocks", compile_setting, _why_not_compile(model), lambda: compile_trial(model, cfg.precision)))
    if out[-1].enabled:
        for layer in _decoder_layers(model):
            layer.compile()  # in place: parameter names (and so checkpoints) stay as they are
    return out


__all__ = ["KernelChoice", "SPEEDUP", "TOLERANCE", "Trial", "apply_kernels", "choose", "flash_attention_available",
           "fused_loss_fn", "liger_available", "liger_fused_ce", "loss_trial", "run_trial"]
