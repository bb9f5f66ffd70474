"""merge_micro_batches: the rule (faked trials), the real trial on a tiny model, the cache, and a run
whose merged step equals the accumulated one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import train_config

from sftlab.rundir import RunDir
from sftlab.train import merge

pytestmark = pytest.mark.xdist_group("train")


@pytest.fixture
def model(tiny_model_dir):
    from sftlab.models import load_model

    return load_model(str(tiny_model_dir))


def _batches(n=16, length=20):
    examples = [SimpleNamespace(input_ids=[1] * (length + i % 3)) for i in range(n)]
    return SimpleNamespace(dataset=examples, lengths=[len(e.input_ids) for e in examples], collator=None)


class _Measure:
    def __init__(self, micro_ms, merged_ms):
        self.calls, self.result = [], (micro_ms, merged_ms)

    def __call__(self, model, examples, collator, *, micro, precision, attention_auto):
        self.calls.append((len(examples), micro))
        return self.result


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def _cfg(tmp_path, tiny_model_dir, **kw):
    return train_config(tmp_path, tiny_model_dir, **{"batch_size": 4, "gradient_accumulation": 2, **kw})


def test_auto_merges_where_the_trial_measures_it_faster(tmp_path, tiny_model_dir, model):
    fast = _Measure(100.0, 60.0)
    c = merge.decide_merge(_cfg(tmp_path, tiny_model_dir), model, _batches(), seq_len=22, measure=fast)
    assert (c.enabled, c.batch_size, c.gradient_accumulation) == (True, 8, 1)
    assert "1.67x faster than 2 of 4" in c.reason and (c.micro_ms, c.merged_ms, c.cached) == (100.0, 60.0, False)
    assert fast.calls == [(8, 4)]  # one typical step of the run's own examples, micro-batches of 4
    again = _Measure(1.0, 100.0)  # cached per machine and shape: not measured again
    c2 = merge.decide_merge(_cfg(tmp_path, tiny_model_dir), model, _batches(), seq_len=22, measure=again)
    assert again.calls == [] and c2.enabled and c2.cached
    other = merge.decide_merge(_cfg(tmp_path, tiny_model_dir, gradient_accumulation=4), model, _batches(),
                               seq_len=22, measure=again)  # another step shape: measured
    assert again.calls == [(16, 4)] and not other.enabled and "needs 1.05x" in other.reason
    assert merge.merged_config(_cfg(tmp_path, tiny_model_dir), c).batch_size == 8


@pytest.mark.parametrize("kw,world,enabled,why", [
    ({"gradient_accumulation": 1}, 1, False, "one micro-batch per step already"),
    ({"merge_micro_batches": False}, 1, False, "off in the config"),
    ({"merge_micro_batches": True}, 2, True, "on in the config"),  # the user's word, every process alike
    ({}, 2, False, "several processes"),
    ({"fsdp": "full_shard auto_wrap"}, 1, False, "sharded"),
])
def test_the_rule_without_a_trial(tmp_path, tiny_model_dir, model, kw, world, enabled, why):
    never = _Measure(1.0, 1.0)
    c = merge.decide_merge(_cfg(tmp_path, tiny_model_dir, **kw), model, _batches(), seq_len=22, world_size=world,
                           measure=never)
    assert c.enabled is enabled and why in c.reason and never.calls == []


def test_auto_keeps_the_micro_batches_where_the_merged_one_would_not_fit(tmp_path, tiny_model_dir, model, monkeypatch):
    monkeypatch.setattr(merge, "device_memory_gb", lambda: ("cpu", 0.001))
    c = merge.decide_merge(_cfg(tmp_path, tiny_model_dir), model, _batches(), seq_len=22, measure=_Measure(9, 1))
    assert not c.enabled and "would need" in c.reason


def test_the_real_trial_times_both_ways_and_leaves_the_model_as_it_was(tmp_path, tiny_model_dir, model):
    from sftlab.data.collate import PadCollator

    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(8):
        ids = torch.randint(5, 100, (12 + i,), generator=g).tolist()
        examples.append(SimpleNamespace(input_ids=ids, labels=[-100] * 4 + ids[4:], weight=1.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    micro_ms, merged_ms = merge.measure_merge(model, examples, PadCollator(0), micro=4, precision="fp32",
                                              attention_auto=True)
    assert micro_ms > 0 and merged_ms > 0
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_merged_step_trains_as_the_accumulated_one(tmp_path, tiny_model_dir):
    from sftlab.train.run import train

    common = dict(optimizer="sgd", max_steps=2, learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0,
                  batch_size=2, gradient_accumulation=4)
    runs = {}
    for name, setting in (("merged", True), ("accumulated", False)):
        (tmp_path / name).mkdir()
        s = train(train_config(tmp_path / name, tiny_model_dir, merge_micro_batches=setting, **common), quiet=True)
        runs[name] = [r["loss"] for r in RunDir(tmp_path / name / "run").metrics() if r["split"] == "train"]
        assert s["merge"]["enabled"] is setting and s["global_batch"] == 8
        assert (s["merge"]["batch_size"], s["merge"]["gradient_accumulation"]) == ((8, 1) if setting else (2, 4))
    assert len(runs["merged"]) == 2 and runs["merged"] == pytest.approx(runs["accumulated"], abs=1e-5)
    saved = (tmp_path / "merged" / "run" / "config.yaml").read_text()
    assert "batch_size: 8" in saved and "# merge_micro_batches: " in saved


def test_check_shows_what_the_merge_will_do_and_a_cached_trial_once_there_is_one(tmp_path, tiny_model_dir):
    """`train --check` loads no model, so it cannot run the trial: it says one decides at the start, and
    once a run on this machine has measured the same shapes it gives that trial's decision."""
    from sftlab.train.run import train

    cfg = _cfg(tmp_path, tiny_model_dir, max_steps=1, precision="fp32")
    before = train(cfg, check_only=True, quiet=True)["merge"]
    assert before.startswith("merge_micro_batches: auto: a trial at the start decides (2 micro-batches of 4")
    s = train(cfg, quiet=True)
    assert s["merge"]["micro_ms"] is not None and not s["merge"]["cached"]
    after = train(_cfg(tmp_path, tiny_model_dir, max_steps=1, precision="fp32", output_dir=str(tmp_path / "again")),
                  check_only=True, quiet=True)["merge"]
    state = "on" if s["merge"]["enabled"] else "off"
    assert after == f"merge_micro_batches: {state} (this machine's earlier trial: {s['merge']['reason']})"
    off = train(_cfg(tmp_path, tiny_model_dir, merge_micro_batches=False), check_only=True, quiet=True)["merge"]
    assert off == "merge_micro_batches: off (off in the config)"


def test_check_memory_is_the_micro_batch_that_runs_as_plan_estimates_it(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """With the micro-batches merged (true in the config), `train --check` estimated a micro-batch of 4
    while the run computes 8 at once; its memory line and its memory finding now give `sftlab plan
    CONFIG`'s figure for the step that runs, accumulation included (the finding ignored accumulation)."""
    import json

    from sftlab.cli import main
    from sftlab.core import hardware
    from sftlab.plan.render import gb
    from sftlab.train import checks
    from sftlab.train.run import train

    for merged, want in ((True, (8, 1)), (False, (4, 2))):
        cfg = _cfg(tmp_path, tiny_model_dir, precision="fp32", merge_micro_batches=merged)
        path = tmp_path / f"run-{merged}.yaml"
        cfg.save(path)
        line = train(cfg, check_only=True, quiet=True)["memory"]
        assert line.startswith("memory: about ") and f"micro-batch {want[0]} x " in line
        seq = int(line.split(" x ")[1].split()[0])
        assert main(["plan", str(path), "--device", "cpu", "--seq-len", str(seq), "--json"]) == 0
        planned = json.loads(capsys.readouterr().out)
        assert (planned["setup"]["batch"], planned["setup"]["grad_accum"]) == want
        assert line.split("about ")[1].split(" at ")[0] == gb(planned["total_bytes"])
        # a machine with a byte less than that estimate: the checklist says it does not fit
        need = planned["total_bytes"]
        monkeypatch.setattr(checks, "device_memory_gb", lambda n=need: ("cpu", (n - 1) / 2**30))
        findings = train(cfg, check_only=True, quiet=True)["findings"]
        assert any(f["rule"] == "memory" and f"micro-batch {want[0]} x" in f["message"] for f in findings), findings
        monkeypatch.setattr(checks, "device_memory_gb", hardware.device_memory_gb)
