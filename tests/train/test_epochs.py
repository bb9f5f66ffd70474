"""A weighted mixture is drawn afresh every epoch of a real run: what each epoch trains on, each
process's shard of it, a resume that redraws the epoch it stopped in, and packing's one draw per run."""

import os
import signal
from collections import Counter
from dataclasses import replace

import pytest
from conftest import build_tiny_tokenizer, chat_data, train_config
from transformers import TrainerCallback

import sftlab.train.run as run_module
from sftlab.config import load_config
from sftlab.data.collate import PadCollator
from sftlab.data.prepare import prepare
from sftlab.rundir import RunDir
from sftlab.train.epochs import drawn_epochs
from sftlab.train.run import train

pytestmark = pytest.mark.xdist_group("train")

BATCH = 4


def _mixture(tmp_path) -> list[dict]:
    """12 + 4 examples at 0.5/0.5: each epoch 8 of the 12 (subsampled) and the 4 twice each."""
    return [{"path": chat_data(tmp_path / "big.jsonl", 12), "weight": 0.5},
            {"path": chat_data(tmp_path / "small.jsonl", 4, offset=300), "weight": 0.5}]


class _Seen(TrainerCallback):
    """The examples each epoch collated for training ("file:line"), one list per epoch begun."""

    def __init__(self):
        self.epochs: list[list[str]] = []

    def on_epoch_begin(self, args, state, control, **kw):
        self.epochs.append([])


class _StopAt(TrainerCallback):
    """SIGTERM while step ``step`` runs: the run checkpoints at that step and stops."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def seen(monkeypatch) -> _Seen:
    """Records what the training collator receives, per epoch (evaluation has its own collator)."""
    cb = _Seen()

    class Recording(PadCollator):
        def __call__(self, batch):
            cb.epochs[-1].extend(e.where for e in batch)
            return super().__call__(batch)

    monkeypatch.setattr(run_module, "PadCollator", Recording)
    return cb


def _cfg(tmp_path, tiny_model_dir, data, **kw):
    return train_config(tmp_path, tiny_model_dir, data=data, epochs=2, batch_size=BATCH, template="chatml",
                        learning_rate=1e-2, save_steps=100, **kw)


def test_a_two_epoch_run_trains_each_epoch_on_a_fresh_draw(tmp_path, tiny_model_dir, seen):
    data = _mixture(tmp_path)
    s = train(_cfg(tmp_path, tiny_model_dir, data), quiet=True, callbacks=[seen])
    assert s["steps"] == 8 and s["examples"] == 16  # 16 examples per epoch, batch 4, 2 epochs
    assert len(seen.epochs) == 2
    big, small = data[0]["path"], data[1]["path"]
    per_epoch = []
    for epoch in seen.epochs:
        assert len(epoch) == 16
        mine = Counter(w.rsplit(":", 1)[0] for w in epoch)
        assert mine == {big: 8, small: 8}  # the weights, in every epoch
        assert set(Counter(w for w in epoch if w.startswith(small)).values()) == {2}  # 4 examples, twice each
        drawn = {w for w in epoch if w.startswith(big)}
        assert len(drawn) == 8  # subsampled without repetition
        per_epoch.append(drawn)
    assert per_epoch[0] != per_epoch[1]  # epoch 2 trains on another subsample of the big source
    # what each epoch trained on is the data layer's draw for that epoch (seed, epoch), in the sampler's order
    p = prepare(load_config(None, {"data": data, "template": "chatml", "max_seq_length": 128, "seed": 42}),
                build_tiny_tokenizer())
    for e, epoch in enumerate(seen.epochs):
        assert sorted(epoch) == sorted(p.pool[j].where for j in p.draw.indices(e))


def test_resuming_mid_epoch_redraws_the_same_epoch(tmp_path, tiny_model_dir, seen):
    data = _mixture(tmp_path)
    train(_cfg(tmp_path / "ref", tiny_model_dir, data), quiet=True, callbacks=[seen])
    ref_seen = seen.epochs
    assert ref_seen[1][2 * BATCH:] != ref_seen[0][2 * BATCH:]  # the second epoch is another draw
    ref = [r["loss"] for r in RunDir(tmp_path / "ref" / "run").metrics() if r["split"] == "train"]
    cfg = _cfg(tmp_path / "cut", tiny_model_dir, data)
    seen.epochs = []
    s = train(cfg, quiet=True, callbacks=[seen, _StopAt(6)])  # step 6: the second step of epoch 2
    assert s["stopped"] == "interrupted" and s["steps"] == 6
    seen.epochs = []
    s2 = train(load_config(None, {**cfg.to_dict(), "resume": True}), quiet=True, callbacks=[seen])
    assert s2["stopped"] == "completed" and s2["steps"] == 8
    assert seen.epochs == [ref_seen[1][2 * BATCH:]]  # the rest of epoch 2, as the uncut run drew it
    losses = [r["loss"] for r in RunDir(tmp_path / "cut" / "run").metrics() if r["split"] == "train"]
    assert losses == pytest.approx(ref, abs=1e-5)


def test_each_process_takes_its_shard_of_every_epoch_and_a_resume_on_two_reaches_the_sampler(tmp_path):
    """accelerate's own wrappers, as Trainer builds them for 2 processes (and to resume mid-epoch)."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    p = prepare(load_config(None, {"data": _mixture(tmp_path), "template": "chatml", "max_seq_length": 128}),
                build_tiny_tokenizer())
    replay = [replace(e) for e in p.pool[:2]]  # two more examples in every epoch (copies: ids tell them apart)
    dataset = drawn_epochs(p.pool, p.draw, replay, seed=5)
    assert len(dataset.sampler) == 18 and len(dataset) == 18

    def shard(rank: int, epoch: int, skip: int = 0) -> list[int]:
        dl = DataLoader(dataset, batch_size=3, sampler=dataset.sampler, collate_fn=lambda b: [id(x) for x in b])
        dl = prepare_data_loader(dl, num_processes=2, process_index=rank, put_on_device=False)
        if skip:
            dl = skip_first_batches(dl, skip)
        dl.set_epoch(epoch)  # what Trainer calls before each epoch
        return [i for batch in dl for i in batch]

    by_id = {id(x): j for j, x in enumerate(dataset)}
    for epoch in range(3):
        full = [id(dataset[j]) for j in dataset.sampler.indices(epoch)]
        mine = [shard(0, epoch), shard(1, epoch)]
        assert sorted(mine[0] + mine[1]) == sorted(full)  # the two shards make up the epoch, each once
        assert full[:3] == mine[0][:3] and full[3:6] == mine[1][:3]  # batch by batch, in turns
        assert Counter(by_id[i] >= len(p.pool) for i in full)[True] == 2  # the replay examples, every epoch
    dataset.sampler.set_epoch(0)
    assert shard(1, 1, skip=1) == shard(1, 1)[3:]  # resumed on process 1: epoch 1's draw, not epoch 0's
    assert dataset.sampler.epoch == 1


def test_grouping_by_length_keeps_the_draw(tmp_path):
    p = prepare(load_config(None, {"data": _mixture(tmp_path), "template": "chatml", "max_seq_length": 128}),
                build_tiny_tokenizer())
    dataset = drawn_epochs(p.pool, p.draw, [], seed=5, group_size=8)
    for epoch in range(2):
        grouped = dataset.sampler.indices(epoch)
        assert sorted(grouped) == sorted(p.draw.indices(epoch))  # the same examples, in batches by length
        assert grouped == dataset.sampler.indices(epoch)  # and seeded
        lengths = [len(dataset[j].input_ids) for j in grouped]
        assert lengths[:8] == sorted(lengths[:8], reverse=True)  # a mega-batch sorted longest first


def test_packing_draws_once_per_run_and_says_so(tmp_path, tiny_model_dir):
    data = _mixture(tmp_path)
    found = train(_cfg(tmp_path, tiny_model_dir, data, packing=True), check_only=True)["findings"]
    note = [f for f in found if f["rule"] == "mixture"]
    assert len(note) == 1 and note[0]["severity"] == "info" and "drawn once for the run" in note[0]["message"]
    plain = train(_cfg(tmp_path, tiny_model_dir, data), check_only=True)["findings"]
    assert not [f for f in plain if f["rule"] == "mixture"]


def test_replay_examples_join_every_drawn_epoch(tmp_path, tiny_model_dir, seen):
    data, general = _mixture(tmp_path), chat_data(tmp_path / "general.jsonl", 6, offset=900)
    s = train(_cfg(tmp_path, tiny_model_dir, data, replay_data=general, replay_ratio=0.2), quiet=True, callbacks=[seen])
    assert s["replay_examples"] == 4 and s["steps"] == 10  # 16 drawn + 4 replay per epoch, batch 4, 2 epochs
    replayed = [sorted(w for w in epoch if w.startswith(general)) for epoch in seen.epochs]
    assert len(replayed) == 2 and len(replayed[0]) == 4 and replayed[0] == replayed[1]  # the same 4, every epoch
    assert [len(epoch) for epoch in seen.epochs] == [20, 20]
    drawn = [{w for w in epoch if w.startswith(data[0]["path"])} for epoch in seen.epochs]
    assert [len(d) for d in drawn] == [8, 8] and drawn[0] != drawn[1]
