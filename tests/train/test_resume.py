"""Resuming a run that already ended: a complete run trains nothing; a run given more steps continues on a
learning-rate schedule rebuilt for the new total (and says so)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import chat_data, train_config
from safetensors.torch import load, load_file

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.core.errors import SftlabError
from sftlab.rundir import RunDir
from sftlab.train.run import train

pytestmark = pytest.mark.xdist_group("train")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["learning_rate"] for r in RunDir(run).metrics() if r["split"] == "train"}


@pytest.mark.parametrize("by", ["max_steps", "epochs"])
def test_resuming_a_complete_run_trains_nothing_and_writes_nothing(tmp_path, tiny_model_dir, capsys, by):
    """Trainer would train one step past the end (at lr 0) and log the final evaluation twice."""
    kw = dict(max_steps=2) if by == "max_steps" else dict(epochs=1, batch_size=8)  # 16 examples: 2 steps
    cfg = train_config(tmp_path, tiny_model_dir, **kw)
    assert train(cfg, quiet=True)["steps"] == 2
    run = Path(cfg.output_dir)
    before = _files(run)
    again = load_config(None, {**cfg.to_dict(), "resume": True})
    done = "2/2 steps); raise max_steps" if by == "max_steps" else "1/1 epochs); raise epochs"
    with pytest.raises(SftlabError, match=re.escape(f"run already complete ({done} to train on")):
        train(again, quiet=True)
    assert _files(run) == before
    found = train(again, check_only=True)["findings"]
    assert [(f["rule"], f["severity"]) for f in found if f["rule"] == "resume"] == [("resume", "error")]
    argv = ["train", "--model", str(tiny_model_dir), "--data", cfg.data, "--output-dir", str(run), "--resume",
            "--method", "full", *[a for k, v in kw.items() for a in ("--set", f"{k}={v}")]]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run already complete" in err and "Traceback" not in err
    assert _files(run) == before


def test_resuming_with_more_steps_rebuilds_the_schedule_and_says_so(tmp_path, tiny_model_dir, capsys):
    """2 steps, then resumed to 4: steps 3 and 4 train at the 4-step schedule's rates (a straight 4-step
    run's), not step 3 at the 2-step schedule's final rate of 0."""
    kw = dict(lr_scheduler="linear", learning_rate=1e-2, optimizer="adamw")
    train(train_config(tmp_path / "ref", tiny_model_dir, max_steps=4, **kw), quiet=True)
    ref = _lrs(tmp_path / "ref" / "run")
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=2, **kw)
    train(cfg, quiet=True)
    assert _lrs(tmp_path / "run")[2] == pytest.approx(ref[1] / 2)  # the 2-step schedule: 1e-2, 5e-3, (0)
    more = load_config(None, {**cfg.to_dict(), "max_steps": 4, "resume": True})
    capsys.readouterr()
    s = train(more)
    out = capsys.readouterr().out
    assert s["steps"] == 4 and s["stopped"] == "completed"
    lrs = _lrs(tmp_path / "run")
    assert sorted(lrs) == [1, 2, 3, 4]
    assert lrs[3] == pytest.approx(ref[3]) and lrs[4] == pytest.approx(ref[4]) and lrs[3] > 0
    assert "the run was planned for 2 steps, now 4: its learning-rate schedule (linear) is rebuilt for 4 steps, " \
           "from step 3 on" in out


@pytest.mark.parametrize("kind", ["packing", "replay"])
def test_resume_check_counts_the_rows_an_epoch_trains(tmp_path, tiny_model_dir, kind):
    """An epoch's steps follow its rows: packed rows (fewer than the examples) or the examples plus their
    replay (more). The checklist counted the examples alone, so resuming such a run unchanged said its
    schedule "was planned for 2 steps, now 8" and would be rebuilt, and told the user to keep the epochs
    they had kept."""
    kw = (dict(packing=True, batch_size=2) if kind == "packing" else
          dict(replay_data=chat_data(tmp_path / "general.jsonl", 16, offset=50), replay_ratio=0.5, batch_size=4))
    cfg = train_config(tmp_path, tiny_model_dir, save_steps=1, save_total_limit=50, **kw)
    steps = train(cfg, quiet=True)["steps"]
    assert steps < 8 if kind == "packing" else steps == 8  # 16 examples at batch 2 / 16 + 16 replay at batch 4
    for p in sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*")):
        if p.name != "checkpoint-1":  # as if killed after step 1
            shutil.rmtree(p)
    again = {**cfg.to_dict(), "resume": True}
    found = train(load_config(None, again), check_only=True)["findings"]
    assert [f["message"] for f in found if f["rule"] in ("resume", "global_batch", "warmup")] == []
    longer = train(load_config(None, {**again, "epochs": 2}), check_only=True)["findings"]
    assert [f["message"].split(":")[1] for f in longer if f["rule"] == "resume"] == \
           [f" the run was planned for {steps} steps, now {2 * steps}"]


def test_resume_with_another_global_batch_warns_that_the_data_position_moves(tmp_path, tiny_model_dir):
    """Trainer finds its place in the data by the step count: resumed at step 2 with batch 8 instead of 4, it
    took 16 examples as trained where 8 were, and skipped the rest of the epoch's first half. The checklist
    said only that the schedule was rebuilt, and to keep max_steps/epochs "as they were" (they were)."""
    cfg = train_config(tmp_path, tiny_model_dir, epochs=2, batch_size=4, save_steps=2, save_total_limit=50)
    assert train(cfg, quiet=True)["steps"] == 8
    for p in sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*")):
        if p.name != "checkpoint-2":
            shutil.rmtree(p)
    again = {**cfg.to_dict(), "resume": True}

    def resume_findings(**kw):
        return [f for f in train(load_config(None, {**again, **kw}), check_only=True)["findings"] if f["rule"] == "resume"]

    found = resume_findings(batch_size=8)
    assert [f["severity"] for f in found] == ["warning", "info"]
    assert "global batch of 4 (batch_size x gradient_accumulation x processes), now 8" in found[0]["message"]
    assert "resumed at step 2 it takes 16 examples as trained where the run trained 8" in found[0]["message"]
    assert "keep batch_size x gradient_accumulation x processes at 4" in found[0]["fixes"][0]
    assert "max_steps/epochs" not in found[1]["fixes"][0]
    assert "trained twice" in resume_findings(batch_size=2)[0]["message"]
    assert resume_findings(batch_size=2, gradient_accumulation=2) == []  # the same global batch: the same steps
    assert "the learning rate" not in found[0]["message"]  # the config's rate is fixed: it stays
    auto = resume_findings(batch_size=8, learning_rate="auto")[0]["message"]  # auto follows the batch: said
    assert "the learning rate is" in auto and "before (learning_rate: auto follows the global batch)" in auto
    # a resume attempt rewrites config.yaml before its first checkpoint: the checkpoint's own record decides
    record = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "sftlab-batch.json").read_text())
    assert record == {"global_batch": 4, "learning_rate": 1e-3}
    saved = tmp_path / "run" / "config.yaml"
    saved.write_text(saved.read_text().replace("batch_size: 4", "batch_size: 8"))
    assert "global batch of 4 (batch_size x gradient_accumulation x processes), now 8" in resume_findings(batch_size=8)[0]["message"]
    assert not [f for f in resume_findings(batch_size=4) if f["severity"] == "warning"]  # as the checkpoint trained


def test_resuming_from_an_earlier_checkpoint_logs_each_step_once(tmp_path, tiny_model_dir):
    """A run killed past its last checkpoint (no signal: out of memory, a lost node) had logged steps the
    resumed run trains and logs again: metrics.jsonl held steps 5..8 twice, with two losses each."""
    evald = chat_data(tmp_path / "eval.jsonl", 4, offset=100)
    cfg = train_config(tmp_path, tiny_model_dir, epochs=2, batch_size=4, save_steps=2, eval_steps=2,
                       save_total_limit=50, eval_data=evald)
    assert train(cfg, quiet=True)["steps"] == 8
    run = tmp_path / "run"
    for p in sorted((run / "checkpoints").glob("checkpoint-*")):
        if p.name not in ("checkpoint-2", "checkpoint-4"):  # killed at step 8, before its save
            shutil.rmtree(p)
    (run / "summary.json").unlink()
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "not json\n")  # kept as it is
    train(load_config(None, {**cfg.to_dict(), "resume": True}), quiet=True)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines.count("not json") == 1
    rows = [json.loads(line) for line in lines if line != "not json"]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4, 6, 8]


def test_a_resumed_run_stops_early_where_the_uninterrupted_one_did(tmp_path, tiny_model_dir):
    """Early stopping's count of evaluations without improvement restarted at 0 on resume: a run killed after
    step 3 (2 of its 3 patience used) trained on to step 6 instead of stopping at step 4, and ended with other
    weights; and the run it stopped, resumed, trained a step more. min_delta 100: no evaluation counts as an
    improvement."""
    evald = chat_data(tmp_path / "eval.jsonl", 4, offset=100)
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=8, eval_steps=1, save_steps=1, save_total_limit=0,
                       early_stopping_patience=3, early_stopping_min_delta=100.0, learning_rate=1e-2, eval_data=evald)
    s = train(cfg, quiet=True)
    assert (s["stopped"], s["steps"]) == ("early_stopping", 4)
    run = tmp_path / "run"
    ref_weights = _files(run / "model")
    ref_evals = [r["eval_loss"] for r in RunDir(run).metrics() if r["split"] == "eval"]
    again = load_config(None, {**cfg.to_dict(), "resume": True})
    before = _files(run)  # resuming the stopped run trained step 5 and replaced its model
    with pytest.raises(SftlabError, match=re.escape("run already complete (early stopping at step 4: 3 evaluations "
                                                    "without improvement); raise early_stopping_patience")):
        train(again, quiet=True)
    assert _files(run) == before
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")  # killed during step 4
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    s2 = train(again, quiet=True)
    assert (s2["stopped"], s2["steps"]) == ("early_stopping", 4)
    assert [r["eval_loss"] for r in RunDir(run).metrics() if r["split"] == "eval"] == pytest.approx(ref_evals[:4])
    got, ref = load_file(str(run / "model" / "model.safetensors")), load(ref_weights["model.safetensors"])
    assert got.keys() == ref.keys() and all(torch.allclose(got[k], ref[k], atol=1e-6) for k in got)


@pytest.mark.parametrize("merge", [False, True])
def test_a_mixture_with_accumulation_resumed_mid_epoch_ends_as_the_uninterrupted_run(tmp_path, tiny_model_dir, merge):
    """A weighted mixture drawn afresh each epoch, 2 micro-batches of 2 per step (accumulated, or merged into
    one), replay examples and an EWC penalty: killed after step 3 (mid epoch 1, of 2), resumed, it logs the
    same losses and ends with the same weights as the run that was not killed."""
    data = [{"path": chat_data(tmp_path / "big.jsonl", 10), "weight": 0.7},
            {"path": chat_data(tmp_path / "small.jsonl", 3, offset=300), "weight": 0.3}]
    cfg = train_config(tmp_path, tiny_model_dir, data=data, epochs=2, batch_size=2, gradient_accumulation=2,
                       merge_micro_batches=merge, save_steps=1, save_total_limit=0, learning_rate=1e-2,
                       optimizer="adamw", lr_scheduler="cosine", template="chatml",
                       replay_data=chat_data(tmp_path / "general.jsonl", 4, offset=100), replay_ratio=0.2,
                       ewc_lambda=50.0, ewc_samples=4)
    s = train(cfg, quiet=True)
    run = tmp_path / "run"
    assert s["steps"] == 8 and s["replay_examples"] == 3  # 13 drawn + 3 replay = 16 per epoch, 4 per step
    ref_losses = [r["loss"] for r in RunDir(run).metrics() if r["split"] == "train"]
    ref = load_file(str(run / "model" / "model.safetensors"))
    for p in (run / "checkpoints").glob("checkpoint-*"):
        if int(p.name.split("-")[1]) > 3:
            shutil.rmtree(p)
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    assert train(load_config(None, {**cfg.to_dict(), "resume": True}), quiet=True)["steps"] == 8
    assert [r["loss"] for r in RunDir(run).metrics() if r["split"] == "train"] == pytest.approx(ref_losses, abs=1e-6)
    got = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.allclose(got[k], ref[k], atol=1e-6) for k in ref)
