"""benchmarks/bench_gpu.py: its FLOP count, and its whole logic as a dry run on a tiny shape on the CPU
(TRL's rows run where TRL is installed, else they are reported as skipped with the reason)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_flops_follow_the_1_7b_shape():
    b = _bench()
    full = b.model_flops_per_token(b.SHAPE_1_7B, "full", 0)
    # SmolLM2-1.7B: 1.61B parameters in matmuls without the tied embedding, plus the 0.10B LM head
    assert full / 6 == pytest.approx(1.711e9, rel=0.01)
    assert b.model_flops_per_token(b.SHAPE_1_7B, "lora", 0) == pytest.approx(full * 4 / 6)
    assert b.model_flops_per_token(b.SHAPE_1_7B, "full", 1024) - full == 6 * 24 * 2048 * 1024


def test_dry_run_measures_every_side_it_can(tmp_path, monkeypatch):
    b = _bench()
    out = tmp_path / "r.json"
    monkeypatch.setenv("SFTLAB_CACHE", str(Path.home() / ".cache" / "sftlab"))
    rc = b.main(["--dry-run", "--configs", "lora-unpacked,full-packed", "--json", str(out), "--timeout", "600"])
    results = json.loads(out.read_text())
    assert rc == 0, results
    assert [(r["config"], r["side"]) for r in results] == [(c, s) for c in ("lora-unpacked", "full-packed") for s in b.SIDES]
    for r in results:
        if r["side"] == "sftlab" or importlib.util.find_spec("trl") is not None and r["side"] == "trl":
            assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["steps_timed"] >= 1, r
        else:
            assert r["skipped"].startswith("skipped: "), r
    sftlab = [r for r in results if r["side"] == "sftlab"]
    assert all(r["resolved"]["kernels"] == {"liger_kernels": False, "fused_loss": False, "compile_blocks": False}
               for r in sftlab)
