"""Defaults that learn and the optional GPU kernels: the learning-rate table and its scaling, the
kernel selection rule with faked trials, kernels as no-ops on a CPU, and (slow) 10 LoRA steps with
every default left alone reaching 90% exact match on the demo's held-out extraction task."""

from __future__ import annotations

import pytest
from conftest import train_config

from sftlab.config import Config, load_config
from sftlab.core.errors import SftlabError
from sftlab.plan.auto import REFERENCE_BATCH, auto_learning_rate, lr_for_size
from sftlab.train import kernels
from sftlab.train.kernels import Trial, choose


def test_learning_rate_defaults_to_the_auto_table():
    assert Config().learning_rate == "auto"
    for size in (135e6, 1.7e9, 7e9, 13e9, 70e9):  # adapters about 10x full fine-tuning at every size
        assert 4 <= lr_for_size(size, "lora") / lr_for_size(size, "full") <= 20
        assert lr_for_size(size, "qlora") == lr_for_size(size, "lora") < lr_for_size(size, "prefix")
    assert lr_for_size(135e6, "lora") == 2e-3 and lr_for_size(7e9, "lora") == 2e-4 and lr_for_size(7e9, "full") == 2e-5


def test_auto_learning_rate_scales_with_batch_and_lora_scale():
    base = lr_for_size(135e6, "lora")
    assert auto_learning_rate(135e6, "lora", global_batch=REFERENCE_BATCH) == base
    assert auto_learning_rate(135e6, "lora", global_batch=4 * REFERENCE_BATCH) == pytest.approx(2 * base)  # sqrt
    assert auto_learning_rate(135e6, "lora", global_batch=1000 * REFERENCE_BATCH) == pytest.approx(2 * base)  # clamped
    assert auto_learning_rate(135e6, "lora", global_batch=1) == pytest.approx(0.5 * base)  # clamped
    # alpha/r = 1 instead of 2: the adapter's update is half as large, the rate doubles; rank alone at fixed alpha/r: unchanged
    assert auto_learning_rate(135e6, "lora", global_batch=8, lora_r=32, lora_alpha=32) == pytest.approx(2 * base)
    assert auto_learning_rate(135e6, "lora", global_batch=8, lora_r=64, lora_alpha=128) == base
    assert auto_learning_rate(135e6, "lora", global_batch=8, lora_r=256, lora_alpha=1) == pytest.approx(4 * base)
    assert auto_learning_rate(135e6, "full", global_batch=8, lora_r=256, lora_alpha=1) == lr_for_size(135e6, "full")


def test_plan_recommends_the_rate_train_uses():
    from sftlab.plan import TrainSetup, known_shapes, make_plan

    shape = next(iter(known_shapes().values()))
    plan = make_plan(shape, TrainSetup(method="lora", batch=4, grad_accum=2, device="cuda"), budget_gb=80)
    assert plan.recommended.learning_rate == auto_learning_rate(shape.params, "lora", global_batch=8)


@pytest.mark.parametrize("trial,enabled,why", [
    (Trial(10.0, 5.0, 1e-3), True, "faster"),
    (Trial(10.0, 9.9, 1e-3), False, "needs 1.05x"),  # within noise: not worth another code path
    (Trial(10.0, 12.0, 0.0), False, "needs 1.05x"),
    (Trial(10.0, 2.0, 0.5), False, "differs"),  # fast but wrong
])
def test_kernel_auto_rule(trial, enabled, why):
    c = choose("liger_kernels", trial)
    assert c.enabled is enabled and why in c.reason and c.trial is trial


def test_kernels_are_no_ops_on_a_cpu(tmp_path, tiny_model_dir):
    import torch

    from sftlab.models import load_model

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU path")
    model = load_model(str(tiny_model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = train_config(tmp_path, tiny_model_dir)
    assert cfg.liger_kernels == "auto" and cfg.compile_blocks == "auto"
    choices = kernels.apply_kernels(cfg, model)
    assert [(c.name, c.enabled) for c in choices] == [("liger_kernels", False), ("compile_blocks", False)]
    assert all("CUDA" in c.reason for c in choices)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl for layer in model.model.layers)
    off = kernels.apply_kernels(train_config(tmp_path, tiny_model_dir, liger_kernels=False, compile_blocks=False), model)
    assert [c.reason for c in off] == ["off in the config"] * 2
    with pytest.raises(SftlabError, match="liger_kernels.*CUDA"):
        kernels.apply_kernels(train_config(tmp_path, tiny_model_dir, liger_kernels=True), model)


def test_packed_rows_use_flash_attention_only_where_it_runs(monkeypatch, tmp_path, tiny_model_dir):
    from sftlab.train import model as tm

    packed = train_config(tmp_path, tiny_model_dir, packing=True)
    monkeypatch.setattr(tm, "flash_attention_available", lambda: False)
    assert tm._attention(packed) is None  # SDPA
    monkeypatch.setattr(tm, "flash_attention_available", lambda: True)
    assert tm._attention(packed) == "flash_attention_2"
    assert tm._attention(train_config(tmp_path, tiny_model_dir)) is None  # unpacked rows keep SDPA/eager switching
    assert tm._attention(train_config(tmp_path, tiny_model_dir, packing=True, attn_implementation="eager")) == "eager"


def test_summary_records_precision_probe_and_kernels(tmp_path, tiny_model_dir):
    from sftlab.train.run import train

    s = train(train_config(tmp_path, tiny_model_dir, max_steps=1, precision="auto"), quiet=True)
    probe = s["precision_probe"]
    assert probe["fp32_ms"] > 0 and probe["bf16_ms"] > 0 and probe["hidden"] == 64
    assert s["precision"] == ("bf16" if probe["bf16_ms"] <= 0.95 * probe["fp32_ms"] else "fp32")
    assert [k["name"] for k in s["kernels"]] == ["liger_kernels", "compile_blocks"]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "auto -> " + s["precision"] in saved and load_config(tmp_path / "run" / "config.yaml").precision == s["precision"]
    check = train(train_config(tmp_path, tiny_model_dir, precision="auto"), check_only=True, quiet=True)
    assert check["precision_probe"]["fp32_ms"] == probe["fp32_ms"]  # the cached probe


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue #11 not done: the defaults reach 62% exact match here, not 90% "
                                       "(benchmarks/RESULTS.md); strict, so it fails loudly once the defaults do")
def test_defaults_learn_the_demo_task_in_ten_lora_steps(tmp_path):
    """Every default left alone except the step count and the batch of 4 x 2: 10 LoRA steps on the
    demo's training split, then exact match on 24 held-out examples (generation, the eval module's scorer)."""
    from sftlab.demo_data import demo_path
    from sftlab.eval import GenerationSettings, run_eval
    from sftlab.train.run import train

    cfg = load_config(None, {"data": str(demo_path("train")), "output_dir": str(tmp_path / "run"),
                             "max_steps": 10, "batch_size": 4, "gradient_accumulation": 2})
    summary = train(cfg, quiet=True)
    assert summary["method"] == "lora" and summary["steps"] == 10
    result = run_eval(str(tmp_path / "run"), str(demo_path("eval")), scorer="exact", limit=24,
                      settings=GenerationSettings(max_new_tokens=48), batch_size=24)["result"]
    assert result["scorer"] == "exact" and result["metrics"]["n_generated"] == 24
    assert result["metrics"]["task_score"] >= 0.9, result["samples"]


def test_train_check_prints_the_precision_choice_with_the_probe(tmp_path, tiny_model_dir, capsys):
    from conftest import chat_data

    from sftlab.cli import main

    data = chat_data(tmp_path / "train.jsonl", 8)
    rc = main(["train", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(tmp_path / "run"),
               "--check", "--set", "precision=auto", "--set", "max_seq_length=128"])
    out = capsys.readouterr().out
    assert rc in (0, 2) and "precision: auto -> " in out and "fp32 " in out and " ms" in out
