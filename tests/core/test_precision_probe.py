"""precision: auto -- the rule with a faked probe, the per-machine cache, and a real probe on this CPU."""

from __future__ import annotations

import json

import pytest

from sftlab.core import hardware
from sftlab.core.hardware import PrecisionProbe, probe_precision
from sftlab.plan import auto
from sftlab.plan.auto import choose_precision, describe_precision, resolve_precision


def _probe(fp32_ms: float, bf16_ms: float) -> PrecisionProbe:
    return PrecisionProbe(fp32_ms=fp32_ms, bf16_ms=bf16_ms, hidden=64, intermediate=128, tokens=256, threads=2,
                          cpu="fake cpu", torch="0")


def test_rule_picks_the_measured_faster_precision():
    assert choose_precision("cpu", _probe(10.0, 16.0)) == "fp32"  # bf16 slower (AVX512-BF16 without AMX)
    assert choose_precision("cpu", _probe(10.0, 3.0)) == "bf16"  # bf16 faster (AMX)
    assert choose_precision("cpu", _probe(10.0, 9.8)) == "fp32"  # a tie within 5% goes to fp32: it rounds
    assert choose_precision("cpu", None) == "fp32"
    assert choose_precision("cuda", None) == "bf16"
    assert choose_precision("cuda", None, cuda_bf16=False) == "fp32"


def test_resolve_auto_uses_the_probe_and_reports_it(monkeypatch, tiny_model_dir):
    from sftlab.config import load_config
    from sftlab.models import model_config

    mcfg = model_config(str(tiny_model_dir))
    seen = []

    def fake(hidden, intermediate):
        seen.append((hidden, intermediate))
        return slow
    monkeypatch.setattr(auto, "device_memory_gb", lambda: ("cpu", 64.0))
    monkeypatch.setattr(auto, "probe_precision", fake)
    cfg = load_config(None, {"model": str(tiny_model_dir)})
    for slow, want in ((_probe(10.0, 20.0), "fp32"), (_probe(10.0, 2.0), "bf16")):
        notes: dict = {}
        rc = auto.resolve_auto(cfg, n_params=10**6, n_examples=100, model_cfg=mcfg, seq_len=64, notes=notes)
        assert rc.precision == want and notes["precision_probe"]["bf16_ms"] == slow.bf16_ms
    assert seen[0] == (mcfg.hidden_size, mcfg.intermediate_size)  # the model's own shapes
    line = describe_precision("bf16", _probe(10.0, 2.0).to_dict())
    assert "auto -> bf16" in line and "fp32 10.00 ms" in line and "bf16 2.00 ms" in line and "5.00x" in line


def test_probe_is_cached_per_machine_and_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path))
    calls = []

    def fake_measure(hidden, intermediate, **kw):
        calls.append((hidden, intermediate))
        return _probe(10.0, 4.0)
    monkeypatch.setattr(hardware, "measure_precision", fake_measure)
    first = probe_precision(64, 128)
    again = probe_precision(64, 128)
    other = probe_precision(96, 128)  # another shape: measured again
    assert calls == [(64, 128), (96, 128)]
    assert not first.cached and again.cached and again.fp32_ms == 10.0 and not other.cached
    stored = json.loads((tmp_path / "precision-probe.json").read_text())
    assert len(stored) == 2 and all("torch" in k and "576" not in k for k in stored)
    (tmp_path / "precision-probe.json").write_text("not json")  # a damaged cache is measured again
    assert not probe_precision(64, 128).cached and len(calls) == 3


def test_a_real_probe_runs_here_and_returns_figures(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path))
    t0 = time.process_time()
    p = probe_precision(576, 1536)  # the default model's shapes
    assert p.fp32_ms > 0 and p.bf16_ms > 0 and p.tokens == hardware.probe_rows(576, 1536) and p.threads >= 1
    assert time.process_time() - t0 < 30  # CPU time (a loaded machine stretches the wall clock, not this)
    precision, again = resolve_precision("cpu", 576, 1536)
    assert again.cached and precision == ("bf16" if again.bf16_ms <= 0.95 * again.fp32_ms else "fp32")


@pytest.mark.parametrize("hidden,inter,rows", [(576, 1536, 68), (2048, 8192, 16), (64, 128, 512)])
def test_probe_rows_keep_the_probe_small(hidden, inter, rows):
    assert hardware.probe_rows(hidden, inter) == rows


def test_the_onednn_isa_cap_is_part_of_the_cache_key(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    calls = []
    monkeypatch.setattr(hardware, "measure_precision", lambda h, i, **kw: calls.append(1) or _probe(10.0, 4.0))
    assert not probe_precision(64, 128).cached
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")  # AMX off on the same CPU: measure again
    assert not probe_precision(64, 128).cached and len(calls) == 2
    assert probe_precision(64, 128).cached and len(calls) == 2
    keys = list(json.loads((tmp_path / "precision-probe.json").read_text()))
    assert sum("isa AVX512_CORE_BF16" in k for k in keys) == 1 and len(keys) == 2


@pytest.mark.skipif(not {"amx_bf16", "avx512_bf16"} <= set(hardware._cpu_flags().split()),
                    reason="needs a CPU with AMX and AVX512-BF16, to compare it with its AMX turned off")
def test_a_real_probe_picks_fp32_when_amx_is_turned_off(tmp_path):
    """The reporter's CPU class (AVX512-BF16, no AMX), made from this one by capping oneDNN's ISA: bf16
    matmuls run at about 0.6x fp32 there, and the real probe must see that and choose fp32."""
    import os
    import subprocess
    import sys

    code = ("from sftlab.plan.auto import resolve_precision\n"
            "p, probe = resolve_precision('cpu', 576, 1536)\n"
            "print(p, round(probe.bf16_speedup, 2))\n")
    out = {}
    for isa in ("", "AVX512_CORE_BF16"):
        env = {**os.environ, "SFTLAB_CACHE": str(tmp_path), "ONEDNN_MAX_CPU_ISA": isa}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        out[isa] = res.stdout.split()
    assert out["AVX512_CORE_BF16"][0] == "fp32" and float(out["AVX512_CORE_BF16"][1]) < 0.95, out
    assert out[""][0] == "bf16" and float(out[""][1]) > float(out["AVX512_CORE_BF16"][1]), out
