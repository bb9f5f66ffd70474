"""Defaults that learn and the optional GPU kernels: the learning-rate table and its scaling, the
kernel selection rule with faked trials, kernels as no-ops on a CPU, the fused loss's trial and wiring
(liger replaced by the plain computation), and (slow) 10 LoRA steps with every default left alone on the
demo's held-out extraction task: learning (45%+) and #11's 90% (a strict xfail)."""

from __future__ import annotations

import pytest
from conftest import PlainFusedCE, train_config

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
    assert [(c.name, c.enabled) for c in choices] == [("liger_kernels", False), ("fused_loss", False),
                                                      ("compile_blocks", False)]
    assert all("CUDA" in c.reason for c in choices)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl for layer in model.model.layers)
    off = kernels.apply_kernels(train_config(tmp_path, tiny_model_dir, liger_kernels=False, fused_loss=False,
                                             compile_blocks=False), model)
    assert [c.reason for c in off] == ["off in the config"] * 3
    for key in ("liger_kernels", "fused_loss"):
        with pytest.raises(SftlabError, match=f"{key}.*CUDA"):
            kernels.apply_kernels(train_config(tmp_path, tiny_model_dir, **{key: True}), model)


@pytest.mark.parametrize("train_head", [False, True])
def test_the_fused_loss_trial_compares_losses_and_gradients(train_head):
    import torch

    head = torch.nn.Linear(16, 40, bias=False)
    timer = iter([3.0, 2.0] * 3)  # reference, then candidate
    good = kernels.loss_trial(head, "fp32", train_head=train_head, fused=PlainFusedCE(), tokens=50, device="cpu",
                              timer=lambda fn: (fn(), next(timer))[1])
    assert good.max_rel_diff < 1e-5 and (good.reference_ms, good.candidate_ms) == (3.0, 2.0)
    assert choose("fused_loss", good).enabled
    wrong = kernels.loss_trial(head, "fp32", train_head=train_head, fused=PlainFusedCE(scale=1.1), tokens=50,
                               device="cpu", timer=lambda fn: (fn(), next(timer))[1])
    assert wrong.max_rel_diff > 0.05 and not choose("fused_loss", wrong).enabled
    one_scale = kernels.loss_trial(head, "fp32", train_head=train_head, fused=_one_scale_backward, tokens=50,
                                   device="cpu", timer=lambda fn: (fn(), next(timer))[1])
    assert one_scale.max_rel_diff > 0.05  # right losses, wrong gradients: caught too
    assert head.weight.grad is None  # the trial works on a copy


def _one_scale_backward(h, weight, bias, target, label_smoothing):
    """Right per-token losses, but backward scales every token by the first token's upstream gradient
    (liger-kernel before 0.8.2 with reduction='none')."""
    import torch
    import torch.nn.functional as F

    class OneScale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            with torch.enable_grad():
                hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
                losses = F.cross_entropy(F.linear(hh, ww), target, reduction="none")
                gh, gw = torch.autograd.grad(losses.sum(), [hh, ww])
            ctx.save_for_backward(gh, gw)
            return losses.detach()

        @staticmethod
        def backward(ctx, grad_out):
            gh, gw = ctx.saved_tensors
            return gh * grad_out[0], gw * grad_out[0]

    return OneScale.apply(h, weight)


def test_a_chosen_fused_loss_trains_exactly_as_the_chunked_loss(monkeypatch, tmp_path, tiny_model_dir):
    """fused_loss forced on through the decision (as a GPU trial would turn it on), liger replaced by the
    plain computation: the trainer routes every micro-batch's loss through it, and the losses match."""
    import json

    from sftlab.train.run import train

    spy = PlainFusedCE()
    monkeypatch.setattr(kernels, "_why_not_fused", lambda cfg, model: None)
    monkeypatch.setattr(kernels, "loss_trial", lambda *a, **k: Trial(2.0, 1.0, 0.0))
    monkeypatch.setattr(kernels, "liger_fused_ce", spy)
    runs = {}
    for name, setting in (("fused", "auto"), ("chunked", False)):
        (tmp_path / name).mkdir()
        s = train(train_config(tmp_path / name, tiny_model_dir, fused_loss=setting, max_steps=3, logging_steps=1,
                               precision="fp32"), quiet=True)
        assert [k["enabled"] for k in s["kernels"] if k["name"] == "fused_loss"] == [name == "fused"]
        rows = [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in rows if "loss" in r]
    assert spy.calls >= 3 and len(runs["fused"]) == 3
    assert runs["fused"] == pytest.approx(runs["chunked"], rel=1e-5)


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
    assert [k["name"] for k in s["kernels"]] == ["liger_kernels", "fused_loss", "compile_blocks"]
    assert s["learning_rate"] == 1e-3 and s["global_batch"] == 4  # train_config: 1e-3, batch 4 x 1
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "auto -> " + s["precision"] in saved and load_config(tmp_path / "run" / "config.yaml").precision == s["precision"]
    check = train(train_config(tmp_path, tiny_model_dir, precision="auto"), check_only=True, quiet=True)
    assert check["precision_probe"]["fp32_ms"] == probe["fp32_ms"]  # the cached probe


@pytest.fixture(scope="module")
def ten_default_steps(tmp_path_factory):
    """Every default left alone except the step count and the batch of 4 x 2: 10 LoRA steps on the
    demo's training split, then exact match on 24 held-out examples (generation, the eval module's scorer)."""
    from sftlab.demo_data import demo_path
    from sftlab.eval import GenerationSettings, run_eval
    from sftlab.train.run import train

    out = tmp_path_factory.mktemp("ten") / "run"
    cfg = load_config(None, {"data": str(demo_path("train")), "output_dir": str(out),
                             "max_steps": 10, "batch_size": 4, "gradient_accumulation": 2})
    summary = train(cfg, quiet=True)
    result = run_eval(str(out), str(demo_path("eval")), scorer="exact", limit=24,
                      settings=GenerationSettings(max_new_tokens=48), batch_size=24)["result"]
    return summary, result, load_config(out / "config.yaml").learning_rate


@pytest.mark.slow
@pytest.mark.xdist_group("ten_default_steps")
def test_defaults_learn_the_demo_task_in_ten_lora_steps(ten_default_steps):
    """The defaults learn: 45% or more (15/24 measured). The rates the defaults used before issue #11
    (2e-5, and `plan`'s 2e-4) reach 0/24 in the same 10 steps (benchmarks/RESULTS.md)."""
    summary, result, learning_rate = ten_default_steps
    assert summary["method"] == "lora" and summary["steps"] == 10 and learning_rate >= 1e-3  # auto's table
    assert summary["learning_rate"] == learning_rate and summary["global_batch"] == 8
    assert result["scorer"] == "exact" and result["metrics"]["n_generated"] == 24
    assert result["metrics"]["task_score"] >= 0.45, result["samples"]


@pytest.mark.slow
@pytest.mark.xdist_group("ten_default_steps")
@pytest.mark.xfail(strict=True, reason="issue #11 not done: the defaults reach 62% exact match here, not 90% "
                                       "(benchmarks/RESULTS.md); strict, so it fails loudly once the defaults do")
def test_defaults_reach_ninety_percent_in_ten_lora_steps(ten_default_steps):
    assert ten_default_steps[1]["metrics"]["task_score"] >= 0.9


def test_train_check_prints_the_precision_choice_with_the_probe(tmp_path, tiny_model_dir, capsys):
    from conftest import chat_data

    from sftlab.cli import main

    data = chat_data(tmp_path / "train.jsonl", 8)
    rc = main(["train", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(tmp_path / "run"),
               "--check", "--set", "precision=auto", "--set", "max_seq_length=128"])
    out = capsys.readouterr().out
    assert rc in (0, 2) and "precision: auto -> " in out and "fp32 " in out and " ms" in out
    assert "auto chose: epochs 3" not in out and "auto chose: learning_rate " in out  # epochs: 3 by default


@pytest.mark.parametrize("version,why", [("0.8.1", "older than 0.8.2"), ("0.8.2", None), ("0.10.0", None)])
def test_fused_loss_needs_a_liger_kernel_with_per_token_gradients(monkeypatch, tiny_model_dir, version, why):
    import importlib.metadata

    import torch

    from sftlab.models import load_model

    model = load_model(str(tiny_model_dir))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "liger_available", lambda: True)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    got = kernels._why_not_fused(Config(), model)
    assert got is None if why is None else why in got
    for sharded in ({"fsdp": "full_shard auto_wrap"}, {"deepspeed": "examples/deepspeed/zero3.json"}):
        assert "sharded" in kernels._why_not_fused(Config(**sharded), model)


def test_describe_auto_names_each_auto_key_and_its_grounds():
    from sftlab.plan.auto import describe_auto

    cfg = Config(learning_rate="auto", precision="auto", epochs="auto", gradient_checkpointing="auto")
    resolved = Config(learning_rate=2e-3, precision="fp32", epochs=5, gradient_checkpointing=False,
                      batch_size=4, gradient_accumulation=2)
    line = describe_auto(cfg, resolved, n_params=135e6, n_examples=200,
                         probe={"bf16_speedup": 0.61})
    assert line == ("auto chose: epochs 5 (200 examples), learning_rate 0.002 (the lora table for 135M parameters "
                    "at a global batch of 8), precision fp32 (bf16 0.61x fp32 on this CPU), "
                    "gradient_checkpointing false (fits without it)")
    fixed = Config(learning_rate=1e-4, precision="bf16", epochs=1, gradient_checkpointing=True)
    assert describe_auto(fixed, fixed, n_params=135e6, n_examples=200) is None


def test_train_says_what_auto_chose(tmp_path, tiny_model_dir, capsys):
    from sftlab.train.run import train

    s = train(train_config(tmp_path, tiny_model_dir, learning_rate="auto", max_steps=1), quiet=False)
    out = capsys.readouterr().out
    assert f"auto chose: learning_rate {s['learning_rate']:g} (the full table for " in out
    assert "precision" not in out.split("auto chose:")[1].splitlines()[0]  # fp32 was set, not auto
    assert "# auto chose: learning_rate" in (tmp_path / "run" / "config.yaml").read_text()
    assert "kernels:" not in out  # on a CPU nothing was tried


_REAL_LIGER = '''
import torch
from sftlab.core.loss import IGNORE, sft_loss
from sftlab.train import kernels
torch.manual_seed(0)
hidden, head = torch.randn(3, 9, 16, requires_grad=True), torch.nn.Linear(16, 40, bias=False)
labels = torch.randint(40, (3, 9))
labels[0, :4] = IGNORE
weights = torch.tensor([1.0, 2.0, 0.5])[:, None].expand(3, 9)
for mode in ("token", "sequence"):
    kw = dict(mode=mode, loss_weights=weights, label_smoothing=0.1)
    a = sft_loss(hidden, head, labels, **kw)
    b = sft_loss(hidden, head, labels, fused=kernels.liger_fused_ce, **kw)
    ga, gb = (torch.autograd.grad(x, [hidden, head.weight]) for x in (a, b))
    assert abs(float(a - b)) < 1e-5 and all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb)), mode
trial = kernels.loss_trial(head, "fp32", train_head=True, tokens=50, device="cpu", timer=lambda fn: (fn(), 1.0)[1])
assert trial.max_rel_diff < 1e-4, trial
print("ok")
'''


def test_real_liger_fused_loss_matches_the_chunked_loss_in_the_triton_interpreter():
    """liger-kernel's own Triton code, run by Triton's CPU interpreter (TRITON_INTERPRET=1): the loss and
    gradients of every mode equal the chunked loss's. Needs liger-kernel and triton installed (not by
    `make test`: triton is about 1 GB); checks sftlab's call into liger, not its speed."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("liger-kernel and triton are not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _REAL_LIGER], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
