"""Resuming a run that already ended: a complete run trains nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import train_config

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
