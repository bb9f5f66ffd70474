"""A weighted (or counted) mixture drawn afresh every epoch: the Trainer's sampler and dataset for it.

The dataset is every usable example of the mixture once (its pool), then the replay examples;
:class:`EpochSampler` yields epoch *e*'s draw (:class:`sftlab.data.mixture.EpochDraw`) plus every
replay example, in an order seeded by (seed, *e*), grouped by length when asked. Nothing in it reads a
global random state, so every process computes the same sequence and accelerate's batch sharding
(``BatchSamplerShard``: each process takes every n-th batch) gives each its shard, and a resumed run
redraws the epoch it stopped in before skipping the batches already trained.

The Trainer tells the sampler the epoch through accelerate's ``DataLoaderShard.set_epoch``, which
finds the sampler under ``BatchSampler`` and ``BatchSamplerShard``, but not under the
``SkipBatchSampler`` that resuming mid-epoch on several processes wraps around the shard: there it
falls back to the dataset's ``set_epoch``, so :class:`EpochExamples` passes it on.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Sampler

from sftlab.config import Config
from sftlab.data.mixture import EpochDraw
from sftlab.data.packing import pack_indices
from sftlab.train.continual import mix_replay


class EpochSampler(Sampler):
    """Epoch *e*: ``draw.indices(e)`` and ``extra`` (indices in every epoch), shuffled by (seed, *e*);
    with ``group_size``, in length-grouped mega-batches of that many examples (as Trainer's
    ``LengthGroupedSampler``, ``lengths`` per dataset index)."""

    def __init__(self, draw: EpochDraw, *, seed: int, extra: tuple[int, ...] = (),
                 lengths: list[int] | None = None, group_size: int | None = None):
        self.draw, self.seed, self.extra = draw, seed, tuple(extra)
        self.lengths, self.group_size = lengths, group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.draw) + len(self.extra)

    def indices(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s dataset indices, in training order."""
        idx = self.draw.indices(epoch) + list(self.extra)
        rng = random.Random(f"{self.seed}/{epoch}/order")
        if self.lengths is None or not self.group_size:
            rng.shuffle(idx)
            return idx
        from transformers.trainer_pt_utils import (
            get_length_grouped_indices,  # deferred: heavy library, imported on first use
        )

        g = torch.Generator()
        g.manual_seed(rng.getrandbits(63))
        order = get_length_grouped_indices([self.lengths[i] for i in idx], self.group_size, generator=g)
        return [idx[j] for j in order]

    def __iter__(self):
        return iter(self.indices(self.epoch))


class EpochExamples(list):
    """The training dataset of a drawn mixture (pool, then replay examples); ``set_epoch`` reaches the
    sampler where accelerate's wrappers hide it (see the module docstring)."""

    def __init__(self, items, sampler: EpochSampler):
        super().__init__(items)
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def drawn_epochs(pool: list, draw: EpochDraw, replay: list, *, seed: int,
                 group_size: int | None = None) -> EpochExamples:
    """The dataset (``pool`` + ``replay``) whose ``sampler`` draws each epoch from ``pool`` and adds
    every replay example; ``group_size``: batch by length (examples' ``input_ids``)."""
    items = list(pool) + list(replay)
    lengths = [len(e.input_ids) for e in items] if group_size else None
    sampler = EpochSampler(draw, seed=seed, extra=tuple(range(len(pool), len(items))), lengths=lengths,
                           group_size=group_size)
    return EpochExamples(items, sampler)


def epoch_rows(cfg: Config, task: list, general: list) -> int:
    """The rows the Trainer iterates per epoch, which its step count follows: the ``task`` examples of one
    epoch and the replay examples from ``general`` that ``replay_ratio`` mixes in (as
    :func:`~sftlab.train.continual.mix_replay` does for the run); with ``packing``, the rows they pack into."""
    mixed, _ = mix_replay(task, general, cfg.replay_ratio, cfg.seed)
    return len(pack_indices([len(e.input_ids) for e in mixed], cfg.max_seq_length)) if cfg.packing else len(mixed)
