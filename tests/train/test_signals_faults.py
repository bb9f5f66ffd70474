"""Signals and faults during training: SIGTERM/SIGINT checkpoint and exit 143/130, a kill -9 in the middle
of a checkpoint save, a full disk during a save, and what the end of a run prints (each line once).

Signals need a real process: those tests run `sftlab train` in a subprocess whose steps are slowed (and
whose save can be held mid-way) by a small patch applied before the CLI starts.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import chat_data, train_config

from sftlab.core.errors import SftlabError
from sftlab.train import run as run_mod
from sftlab.train.checks import checkpoint_complete, last_good_checkpoint
from sftlab.train.run import train
from sftlab.train.trainer import SftlabTrainer

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"

# Runs `sftlab train ARGV` with each step slowed to 0.2 s; writes MARK once step 1 is done; with HOLD_AT
# set, the checkpoint save at that step stops for good after the model and optimizer are written
# (before trainer_state.json), and MARK_SAVE is written then.
_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from sftlab.train.trainer import SftlabTrainer
    step = SftlabTrainer.training_step
    def slow_step(self, *a, **k):
        out = step(self, *a, **k)
        time.sleep(0.2)
        if self.state.global_step >= 1:
            Path(os.environ["MARK"]).touch()
        return out
    SftlabTrainer.training_step = slow_step
    hold = int(os.environ.get("HOLD_AT", "0"))
    rng = SftlabTrainer._save_rng_state
    def held_rng(self, output_dir):
        if self.state.global_step == hold:
            Path(os.environ["MARK_SAVE"]).touch()
            time.sleep(600)
        return rng(self, output_dir)
    SftlabTrainer._save_rng_state = held_rng
    from sftlab.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _spawn(tmp_path, argv, **env):
    e = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
         "MARK": str(tmp_path / "step1"), "MARK_SAVE": str(tmp_path / "saving"), **env}
    return subprocess.Popen([sys.executable, "-c", _CHILD, *argv], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, limit: float = 240):
    end = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path.name} never appeared")
        time.sleep(0.1)


def _argv(tmp_path, model, *extra):
    return ["train", "--model", str(model), "--data", chat_data(tmp_path / "train.jsonl", 16),
            "--output-dir", str(tmp_path / "run"), "--set", "precision=fp32", "--set", "batch_size=2",
            "--set", "gradient_accumulation=1", "--set", "logging_steps=1", "--set", "warmup_ratio=0",
            "--set", "save_steps=2", "--method", "full", *extra]


# Sends SIG to itself while the model loads (before any training step), then runs `sftlab ARGV`.
_CHILD_AT_LOAD = textwrap.dedent("""
    import os, signal, sys
    from sftlab.train import model as tm
    real = tm.load_model
    def load_and_stop(*a, **k):
        os.kill(os.getpid(), getattr(signal, os.environ["SIG"]))
        return real(*a, **k)
    tm.load_model = load_and_stop
    from sftlab.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig,code,words", [("SIGTERM", 143, "stopped by SIGTERM"), ("SIGINT", 130, "interrupted (SIGINT)")])
def test_a_signal_before_training_starts_is_one_line_and_the_signal_code(sig, code, words, tmp_path, tiny_model_dir):
    """While the model loads there is nothing to checkpoint: one line naming the signal, 143 or 130, no
    traceback, and no run folder left behind."""
    e = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "SIG": sig}
    proc = subprocess.run([sys.executable, "-c", _CHILD_AT_LOAD, *_argv(tmp_path, tiny_model_dir, "--set", "max_steps=2")],
                          env=e, capture_output=True, text=True, timeout=240)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"sftlab train: {words}"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_with_the_signal_code(sig, code, tmp_path, tiny_model_dir):
    proc = _spawn(tmp_path, _argv(tmp_path, tiny_model_dir, "--set", "max_steps=200"))
    _wait_for(tmp_path / "step1", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    name = signal.Signals(sig).name
    assert f"{name} received: saving a checkpoint" in err
    assert f"interrupted by {name}" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["signal"] == name
    good = last_good_checkpoint(tmp_path / "run" / "checkpoints")
    assert good is not None and good.name == f"checkpoint-{summary['steps']}"
    assert "Traceback" not in err


class _StartStep:
    """Records the global step a (resumed) training starts from."""

    def __init__(self):
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_resume_continues(tmp_path, tiny_model_dir):
    proc = _spawn(tmp_path, _argv(tmp_path, tiny_model_dir, "--set", "max_steps=6"), HOLD_AT="4")
    _wait_for(tmp_path / "saving", proc)
    proc.kill()  # SIGKILL: no handler runs, the save of checkpoint-4 is cut off
    proc.wait(timeout=60)
    ckpts = tmp_path / "run" / "checkpoints"
    assert checkpoint_complete(ckpts / "checkpoint-2")
    # the trainer saves into a staging folder and renames it when complete: the cut-off save is only there
    assert not (ckpts / "checkpoint-4").exists() and (ckpts / ".staging-checkpoint-4").is_dir()
    assert last_good_checkpoint(ckpts) == ckpts / "checkpoint-2"

    cfg = train_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "run"), batch_size=2, max_steps=6,
                       save_steps=2, resume=True)
    rec = _StartStep()
    summary = train(cfg, quiet=True, callbacks=[rec])
    assert rec.start == 2  # from the last complete checkpoint, not the cut-off one
    assert summary["steps"] == 6 and summary["stopped"] == "completed"
    assert checkpoint_complete(ckpts / "checkpoint-4") and checkpoint_complete(ckpts / "checkpoint-6")
    assert not list(ckpts.glob(".staging-*"))  # the leftover of the killed save was removed


def test_a_checkpoint_folder_without_trainer_state_is_never_resumed_from(tmp_path, tiny_model_dir):
    """A checkpoint cut off some other way (an older run, a copy): skipped, and removed on resume."""
    cfg = train_config(tmp_path, tiny_model_dir, batch_size=4, max_steps=2, save_steps=2)
    train(cfg, quiet=True)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    cut = ckpts / "checkpoint-9"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"partial")
    assert last_good_checkpoint(ckpts) == ckpts / "checkpoint-2"
    rec = _StartStep()
    train(train_config(tmp_path, tiny_model_dir, batch_size=4, max_steps=4, save_steps=2, resume=True),
          quiet=True, callbacks=[rec])
    assert rec.start == 2 and not cut.exists()


def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    real = SftlabTrainer._save_rng_state

    def full_at_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(SftlabTrainer, "_save_rng_state", full_at_4)
    cfg = train_config(tmp_path, tiny_model_dir, batch_size=2, max_steps=6, save_steps=2)
    with pytest.raises(SftlabError) as e:
        train(cfg, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "the disk is full" in msg and "checkpoint-2 is kept" in msg and "--resume" in msg
    ckpts = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]  # the cut-off one is gone
    assert checkpoint_complete(ckpts / "checkpoint-2")
    monkeypatch.setattr(SftlabTrainer, "_save_rng_state", real)
    summary = train(train_config(tmp_path, tiny_model_dir, batch_size=2, max_steps=6, save_steps=2, resume=True),
                    quiet=True)
    assert summary["steps"] == 6


def test_full_disk_while_saving_the_model_keeps_the_previous_model(tmp_path, tiny_model_dir, monkeypatch):
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=1)
    train(cfg, quiet=True)
    model_dir = Path(cfg.output_dir) / "model"
    before = sorted(p.name for p in model_dir.iterdir())

    real = SftlabTrainer.save_model

    def no_space(self, output_dir=None, *a, **k):  # checkpoints save fine; the final model hits a full disk
        if Path(output_dir).name.startswith(".model."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, *a, **k)

    monkeypatch.setattr(SftlabTrainer, "save_model", no_space)
    with pytest.raises(SftlabError, match="the disk is full; the previous version is kept"):  # one step more
        train(train_config(tmp_path, tiny_model_dir, max_steps=2, resume=True), quiet=True)
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".model.")]  # no temp left


def test_end_of_run_says_what_it_is_doing_each_line_once(tmp_path, tiny_model_dir, capsys):
    cfg = train_config(tmp_path, tiny_model_dir, eval_data=chat_data(tmp_path / "eval.jsonl", 4, offset=100),
                       batch_size=4, max_steps=4, eval_steps=2, save_steps=2, load_best_model_at_end=True)
    run_mod.train(cfg)
    out = capsys.readouterr().out.replace("\r", "\n")
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and not ln.startswith("train:")]
    restored = next(ln for ln in lines if ln.startswith("restoring the best checkpoint"))
    restored_last = restored.split()[4] == "checkpoint-4"
    # the best checkpoint is the last step's: its logged evaluation is the final one, not repeated
    final = () if restored_last else ("final evaluation on 4 eval examples", "final  eval_loss")
    for wanted in ("step 4: evaluating", "step 4: saving checkpoint-4", "restoring the best checkpoint checkpoint-",
                   *final, "saving the model to"):
        hits = [ln for ln in lines if ln.startswith(wanted)]
        assert len(hits) == 1, (wanted, lines)
    assert restored_last or any(ln.startswith("final evaluation") for ln in lines)
    assert not restored_last or not any(ln.startswith("final") for ln in lines)
    step_lines = [ln for ln in lines if ln.startswith("step") and "eval_loss" in ln]
    assert len(step_lines) == len(set(step_lines)) == 2  # steps 2 and 4, each once
    order = [next(i for i, ln in enumerate(lines) if ln.startswith(w)) for w in
             ("restoring the best", *final[:1], "saving the model")]
    assert order == sorted(order)


@pytest.mark.parametrize("best,logged_at,evaluates", [
    (None, 4, False),  # no best-model restore, the last step was evaluated: reuse it
    ("checkpoint-4", 4, False),  # the best is the last step: same weights, reuse
    ("checkpoint-2", 4, True),  # an earlier checkpoint was restored: evaluate it
    (None, 2, True),  # the last step was not evaluated
])
def test_final_evaluation_reuses_the_logged_one_only_for_the_same_weights(best, logged_at, evaluates):
    from types import SimpleNamespace

    calls = []
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=4, best_model_checkpoint=None if best is None else f"/r/checkpoints/{best}"),
        args=SimpleNamespace(load_best_model_at_end=best is not None), eval_dataset=[1, 2],
        evaluate=lambda: calls.append(1) or {"eval_loss": 9.0})
    logger = SimpleNamespace(rows=[{"split": "eval", "step": logged_at, "eval_loss": 1.5}], say=lambda m: None, final=False)
    got = run_mod.final_evaluation(SimpleNamespace(trainer=trainer, logger=logger))
    assert (calls == [1]) is evaluates
    assert got == ({"eval_loss": 9.0} if evaluates else {"eval_loss": 1.5})
