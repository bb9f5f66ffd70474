"""Collators: padded batches and packed batches.

Padded: right padding; labels are -100 on padding by position (never by token id). Packed, two
ways of keeping examples apart, chosen by the attention implementation:

- ``mask``: a 4D block-diagonal causal mask [B, 1, L, L] (bool for SDPA, additive float for
  eager), plus position ids restarting per example. Works on every backend, CPU included.
- ``flash``: all rows flattened into one row with restarting position ids and no mask;
  flash-attention's varlen kernel finds the boundaries from the position ids (no O(L^2) mask).

Each batch also carries ``loss_weights`` (one float per token: its example's weight) when any
example has a weight other than 1.
"""

from __future__ import annotations

import torch

from sftlab.data.masking import IGNORE, Example
from sftlab.data.packing import Packed


def _pad_to(n: int, multiple: int | None) -> int:
    return n if not multiple else ((n + multiple - 1) // multiple) * multiple


def _padded(rows, L: int, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids padded with ``pad_id`` and labels with -100 (by position), plus the real-token count."""
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row.input_ids)
        ids[r, :n] = torch.tensor(row.input_ids)
        labels[r, :n] = torch.tensor(row.labels)
    return {"input_ids": ids, "labels": labels, "n_real": torch.tensor(sum(len(x.input_ids) for x in rows))}


class PadCollator:
    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        L = _pad_to(max(len(e.input_ids) for e in batch), self.multiple)
        out = _padded(batch, L, self.pad_id)
        att = torch.zeros((len(batch), L), dtype=torch.long)
        weights = torch.zeros((len(batch), L), dtype=torch.float32)
        for r, e in enumerate(batch):
            att[r, :len(e.input_ids)] = 1
            weights[r, :len(e.input_ids)] = e.weight
        out["attention_mask"] = att
        if any(e.weight != 1.0 for e in batch):
            out["loss_weights"] = weights
        return out


def block_causal_mask(seq_lens_per_row: list[list[int]], L: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, 1, L, L] mask: token q may attend to k iff same example and k <= q. Padding attends to itself.

    ``dtype=None`` gives bool (True = attend, for SDPA); a float dtype gives an additive mask
    (0 = attend, most negative value = blocked) for eager attention.
    """
    B = len(seq_lens_per_row)
    seg = torch.full((B, L), -1, dtype=torch.long)
    for r, lens in enumerate(seq_lens_per_row):
        pos = 0
        for k, n in enumerate(lens):
            seg[r, pos:pos + n] = k
            pos += n
        # padding: each pad token its own segment so no row is fully masked (avoids NaN in softmax)
        seg[r, pos:] = torch.arange(len(lens), len(lens) + L - pos)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = (same & causal)[:, None, :, :]
    if dtype is None:
        return mask
    out = torch.zeros(mask.shape, dtype=dtype)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)


class PackedCollator:
    def __init__(self, pad_id: int, mode: str = "mask", mask_dtype: torch.dtype | None = None,
                 pad_to_multiple_of: int | None = None):
        if mode not in ("mask", "flash"):
            raise ValueError(f"unknown packed collation mode {mode!r}")
        self.pad_id = pad_id
        self.mode = mode
        self.mask_dtype = mask_dtype
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[Packed]) -> dict[str, torch.Tensor]:
        if self.mode == "flash":
            batch = [Packed([t for r in batch for t in r.input_ids], [t for r in batch for t in r.labels],
                            [n for r in batch for n in r.seq_lens], [w for r in batch for w in r.weights],
                            [i for r in batch for i in r.indices])]
        L = _pad_to(max(len(r.input_ids) for r in batch), self.multiple if self.mode == "mask" else None)
        out = _padded(batch, L, self.pad_id)
        pos = torch.zeros((len(batch), L), dtype=torch.long)
        weights = torch.zeros((len(batch), L), dtype=torch.float32)
        for r, row in enumerate(batch):
            p = 0
            for k, m in enumerate(row.seq_lens):
                pos[r, p:p + m] = torch.arange(m)
                weights[r, p:p + m] = row.weights[k]
                p += m
        out["position_ids"] = pos
        if self.mode == "mask":
            out["attention_mask"] = block_causal_mask([r.seq_lens for r in batch], L, self.mask_dtype)
        if any(w != 1.0 for r in batch for w in r.weights):
            out["loss_weights"] = weights
        return out
