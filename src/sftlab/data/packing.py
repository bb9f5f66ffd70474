"""Best-fit-decreasing packing of examples into rows of at most ``max_len`` tokens.

Each packed row keeps the boundaries of its examples (``seq_lens``) so that the collator can give
every example its own positions (restarting at 0) and forbid attention across examples. The first
label of each example is masked: under the one-token label shift it would otherwise be predicted
from the previous example's last token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from sftlab.data.masking import IGNORE, Example


@dataclass
class Packed:
    input_ids: list[int]
    labels: list[int]
    seq_lens: list[int]
    weights: list[float]  # one per example in the row
    indices: list[int]  # the examples' dataset indices


def pack_indices(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: each item (longest first) goes to the open bin it fills most tightly.

    O(n log n): open bins are kept sorted by remaining capacity and searched with bisect.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_len {max_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, b = free.pop(k)
            bins[b].append(i)
            if cap - n > 0:
                bisect.insort(free, (cap - n, b))
        else:
            bins.append([i])
            if max_len - n > 0:
                bisect.insort(free, (max_len - n, len(bins) - 1))
    # Keep dataset order inside each bin, and order bins by their first example, for determinism.
    bins = [sorted(b) for b in bins]
    bins.sort(key=lambda b: b[0])
    return bins


def pack(examples: list[Example], max_len: int) -> list[Packed]:
    rows = []
    for b in pack_indices([len(e.input_ids) for e in examples], max_len):
        ids: list[int] = []
        labels: list[int] = []
        for i in b:
            e = examples[i]
            ids.extend(e.input_ids)
            labels.append(IGNORE)
            labels.extend(e.labels[1:])
        rows.append(Packed(ids, labels, [len(examples[i].input_ids) for i in b],
                           [examples[i].weight for i in b], [examples[i].index for i in b]))
    return rows


def packing_efficiency(rows: list[Packed], max_len: int) -> float:
    """Share of the row capacity filled with real tokens."""
    if not rows:
        return 0.0
    return sum(len(r.input_ids) for r in rows) / (len(rows) * max_len)
