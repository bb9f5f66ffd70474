"""Every loss variant behind one signature, computed without the full [tokens, vocab] logits.

The label shift (position t predicts label t+1) happens here and nowhere else. Only positions
with a trained label are projected to the vocabulary, in chunks whose logits are recomputed in the
backward pass instead of stored, so peak memory holds one chunk of logits, not all of them. A
micro-batch whose trained positions fit one small chunk (log-probabilities of at most
``NO_RECOMPUTE_BYTES``) keeps them instead: backward needs them first, so the peak is the same, and the
head's matmul is not run twice (about 2% of a default LoRA micro-step on 2 CPU cores).

A fused linear cross entropy (``fused``: liger-kernel's, chosen by a trial in ``train/kernels.py``)
can take the chunks' place where the head is a plain ``nn.Linear``: it computes the gradient of the
projection during the forward pass, so the head's matmul is not recomputed in backward.

Normalisation (``mode``):
- ``token``: sum of per-token losses / ``num_items`` — the number of trained tokens of the whole
  optimizer step (all accumulation micro-batches and all processes), so batch 8 equals batch 2 with
  accumulation 4.
- ``sequence``: the mean loss of each sequence, summed and divided by ``num_sequences`` of the step
  (length-normalised: long replies do not dominate).
Per-example weights multiply each token's (or sequence's) loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
NO_RECOMPUTE_BYTES = 64 * 2**20


class _PassThrough(nn.Module):
    def forward(self, x):
        return x


def _causal_lm(model):
    """The *ForCausalLM module inside DDP/FSDP/PEFT wrappers (the one that owns lm_head)."""
    m = model
    while True:
        if hasattr(m, "module") and isinstance(m.module, nn.Module):  # DDP
            m = m.module
        elif hasattr(m, "get_base_model") and m is not getattr(m, "base_model", None):
            m = m.get_base_model()
        else:
            return m


@contextmanager
def hidden_states_instead_of_logits(model):
    """Swap the output head for a pass-through; yield the real head to project trained positions."""
    lm = _causal_lm(model)
    name = "lm_head"
    head = getattr(lm, name, None)
    if not isinstance(head, nn.Module):  # no separate output head: the model's output is the logits
        yield nn.Identity()
        return
    setattr(lm, name, _PassThrough())
    try:
        yield head
    finally:
        setattr(lm, name, head)


def _chunk_ce(head, h: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    w = getattr(head, "weight", None)
    if w is not None and w.dtype != h.dtype and w.dtype.is_floating_point and not torch.is_autocast_enabled(h.device.type):
        h = h.to(w.dtype)  # e.g. bf16 base weights with fp32 hidden states outside autocast
    logits = head(h).float()
    return F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)


# (hidden [N, H], weight [V, H], bias [V] | None, targets [N], label_smoothing) -> losses [N] (no reduction)
FusedCE = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, float], torch.Tensor]


def fusable(head) -> bool:
    """A head a fused linear cross entropy can replace: exactly ``nn.Linear`` (not an adapter-wrapped
    or quantized layer, whose output is not ``x @ weight.T + bias``) holding its whole weight as a plain
    tensor (not a DeepSpeed ZeRO-3 placeholder or an FSDP shard, gathered only inside the head's forward)."""
    if type(head) is not nn.Linear:
        return False
    w = head.weight
    return tuple(w.shape) == (head.out_features, head.in_features) and type(w) in (nn.Parameter, torch.Tensor)


def per_token_losses(hidden: torch.Tensor, head, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                     chunk_size: int = 2048, fused: FusedCE | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of every trained position: (losses [N], mask [B, S-1] of which positions).

    ``hidden``: [B, S, H] final hidden states; ``head``: the output projection (hidden -> vocab);
    ``labels``: [B, S] with -100 where not trained (unshifted); ``fused``: used instead of the chunks
    when ``head`` is :func:`fusable`.
    """
    target = labels[:, 1:]
    mask = target != IGNORE
    h = hidden[:, :-1][mask]
    y = target[mask]
    if h.shape[0] == 0:
        return hidden.sum() * 0.0 + torch.zeros(0, device=hidden.device), mask
    if fused is not None and fusable(head):
        w = head.weight
        if w.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(w.dtype)
        return fused(h, w, head.bias, y, label_smoothing).float(), mask
    out = []
    recompute = torch.is_grad_enabled() and h.requires_grad
    vocab = getattr(getattr(head, "weight", None), "shape", (0,))[0]
    if recompute and h.shape[0] <= chunk_size and 0 < h.shape[0] * vocab * 4 <= NO_RECOMPUTE_BYTES:
        recompute = False  # one small chunk: backward starts with it, so keeping it costs no peak
    for start in range(0, h.shape[0], chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if recompute:
            out.append(checkpoint(_chunk_ce, head, hc, yc, label_smoothing, use_reentrant=False))
        else:
            out.append(_chunk_ce(head, hc, yc, label_smoothing))
    return torch.cat(out), mask


def sequence_ids(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, S] id of the example each position belongs to (rows, and packed examples within rows)."""
    B, S = labels.shape
    row = torch.arange(B, device=labels.device)[:, None].expand(B, S) * S
    if position_ids is None:
        return row
    starts = (position_ids == 0).long().cumsum(-1)
    return row + starts


def count_sequences(labels: torch.Tensor, position_ids: torch.Tensor | None) -> int:
    ids = sequence_ids(labels, position_ids)[:, 1:][labels[:, 1:] != IGNORE]
    return int(torch.unique(ids).numel())


def sft_loss(hidden: torch.Tensor, head, labels: torch.Tensor, *, num_items: int | torch.Tensor | None = None,
             mode: str = "token", label_smoothing: float = 0.0, loss_weights: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, num_sequences: int | torch.Tensor | None = None,
             chunk_size: int = 2048, fused: FusedCE | None = None) -> torch.Tensor:
    """The training loss of one micro-batch, normalised over the whole optimizer step (see module doc)."""
    ce, mask = per_token_losses(hidden, head, labels, label_smoothing=label_smoothing, chunk_size=chunk_size,
                                fused=fused)
    w = loss_weights[:, 1:][mask].to(ce.dtype) if loss_weights is not None else None
    if mode == "token":
        total = (ce * w).sum() if w is not None else ce.sum()
        denom = num_items if num_items is not None else mask.sum()
        return total / torch.as_tensor(denom, device=ce.device).clamp_min(1)
    if mode == "sequence":
        seq = sequence_ids(labels, position_ids)[:, 1:][mask]
        uniq, inv = torch.unique(seq, return_inverse=True)
        sums = torch.zeros(len(uniq), device=ce.device, dtype=ce.dtype).index_add_(0, inv, ce)
        counts = torch.zeros(len(uniq), device=ce.device, dtype=ce.dtype).index_add_(0, inv, torch.ones_like(ce))
        means = sums / counts.clamp_min(1)
        if w is not None:
            seq_w = torch.zeros(len(uniq), device=ce.device, dtype=ce.dtype).index_reduce_(0, inv, w, "amax", include_self=False)
            means = means * seq_w
        denom = num_sequences if num_sequences is not None else len(uniq)
        return means.sum() / torch.as_tensor(denom, device=ce.device).clamp_min(1)
    raise ValueError(f"unknown loss mode {mode!r}")
