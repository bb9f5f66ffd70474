"""`train --check`'s memory and context findings: the fix each gives makes the step fit, and rows longer
than the model's context are flagged (the memory fix said to turn on checkpointing that was already on)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import train_config

from sftlab.models import model_config
from sftlab.train import checks, checks_model


@pytest.fixture
def cfg(tmp_path, tiny_model_dir):
    return train_config(tmp_path, tiny_model_dir, batch_size=16, gradient_accumulation=2)


def _machine(monkeypatch, nbytes: float):
    monkeypatch.setattr(checks, "device_memory_gb", lambda: ("cpu", nbytes / 2**30))


def _fix_fits(cfg, mcfg, seq, budget, fix: str) -> bool:
    """The --set changes of one fix, applied: does the step then fit?"""
    changes = dict(part.split("=") for part in fix.split("(")[0].replace("--set ", "").split())
    typed = {k: (v == "true") if v in ("true", "false") else int(v) for k, v in changes.items()}
    return checks.step_bytes(dataclasses.replace(cfg, **typed), mcfg, seq, "cpu") <= budget


def test_memory_fixes_are_the_ones_that_make_the_step_fit(cfg, tiny_model_dir, monkeypatch):
    mcfg, seq = model_config(str(tiny_model_dir)), 128
    need = checks.step_bytes(cfg, mcfg, seq, "cpu")
    _machine(monkeypatch, need * 2)
    assert checks.memory_findings(cfg, mcfg, seq) == []
    # between a micro-batch of 4 and one of 16: the fix keeps the global batch of 32 and fits
    budget = (checks.step_bytes(dataclasses.replace(cfg, batch_size=4, gradient_accumulation=8), mcfg, seq, "cpu")
              + checks.step_bytes(dataclasses.replace(cfg, batch_size=8, gradient_accumulation=4), mcfg, seq, "cpu")) / 2
    _machine(monkeypatch, budget)
    [f] = checks.memory_findings(cfg, mcfg, seq)
    assert f.severity == "error" and f.message.startswith(f"micro-batch 16 x {seq} tokens needs about ")
    assert f.fixes[0] == "--set batch_size=4 --set gradient_accumulation=8 (the same global batch)"
    assert _fix_fits(cfg, mcfg, seq, budget, f.fixes[0])
    assert f.fixes[1] == "--set gradient_checkpointing=true" and "sftlab plan CONFIG" in f.fixes[-1]
    # checkpointing already on, and not even one row fits: no advice to turn it on, shorter rows instead
    on = dataclasses.replace(cfg, gradient_checkpointing=True)
    _machine(monkeypatch, 1e6)
    [f] = checks.memory_findings(on, mcfg, seq)
    assert not any("gradient_checkpointing" in x for x in f.fixes), f.fixes
    assert f.fixes[0] == "lower max_seq_length (now 128) or --set method=lora (or qlora)"
    # merged micro-batches (true): the fix has to unmerge them, or the smaller batch_size is merged again
    merged = dataclasses.replace(cfg, merge_micro_batches=True)
    _machine(monkeypatch, budget)
    [f] = checks.memory_findings(merged, mcfg, seq)
    assert f.message.startswith("micro-batch 32 x ") and "--set merge_micro_batches=false" in f.fixes[0]
    assert _fix_fits(merged, mcfg, seq, budget, f.fixes[0])
    # sharded (fsdp): the estimate is of one unsharded process, so it warns rather than errs
    [f] = checks.memory_findings(dataclasses.replace(cfg, fsdp="full_shard auto_wrap"), mcfg, seq)
    assert f.severity == "warning" and "unsharded" in f.message


def test_rows_longer_than_the_models_context_are_flagged(cfg, tiny_model_dir):
    mcfg = model_config(str(tiny_model_dir))  # max_position_embeddings 512
    assert checks.context_findings(cfg, mcfg, 512) == []
    [f] = checks.context_findings(dataclasses.replace(cfg, packing=True, max_seq_length=1024), mcfg, 1024)
    assert f.severity == "warning" and f.message.startswith(
        "examples (packed: positions restart at each) of up to 1024 tokens are longer than the model's context of 512")
    assert f.fixes == ["--set max_seq_length=512"]


def test_flash_attention_where_loading_would_refuse_it_is_a_check_error(cfg, monkeypatch):
    """train --check said "configuration looks sound" for flash_attention_2 on a CPU; the run then failed
    at model loading."""
    flash = dataclasses.replace(cfg, attn_implementation="flash_attention_2", precision="bf16")
    [f] = checks.attention_findings(flash, "cpu")
    assert f.severity == "error" and "needs a CUDA GPU" in f.message and f.fixes == ["--set attn_implementation=sdpa"]
    [f] = checks.attention_findings(dataclasses.replace(flash, precision="fp32"), "cuda")
    assert "needs bf16 or fp16" in f.message
    monkeypatch.setattr(checks_model.importlib.util, "find_spec", lambda name: object())
    assert checks.attention_findings(flash, "cuda") == []
    assert checks.attention_findings(cfg, "cpu") == []
