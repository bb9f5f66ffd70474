"""sftlab recommend / plan: every decision rule, every part of the memory estimate, the CLI.

Fast: no model weights are loaded; shapes come from the built-in table or are written out here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from sftlab.cli import main
from sftlab.core.errors import SftlabError
from sftlab.plan import (
    ALL_LINEAR,
    Machine,
    ModelShape,
    TrainSetup,
    UseCase,
    estimate_memory,
    layer_activation_bytes,
    load_shape,
    load_use_case,
    lora_param_count,
    make_plan,
    max_batch,
    max_seq_len,
    parse_param_count,
    recommend,
    recommend_config,
    shape_from_config,
    shape_from_params,
    static_bytes_per_param,
    static_parts,
)
from sftlab.plan.fit import fits

GB = 1e9
SMOL = ModelShape("smollm2-135m-instruct", 30, 576, 9, 3, 1536, 49152, True)
CPU_MACHINE = Machine("cpu", "test machine", 16 * 10**9)


def seven_b():
    return shape_from_params("7B")


# --- recommend: one test per rule ----------------------------------------------------------------


@pytest.mark.parametrize("complexity, approach", [("simple", "prompt engineering"), ("moderate", "few-shot"),
                                                  ("complex", "few-shot")])
def test_rule1_under_50_examples_prompting_or_few_shot(complexity, approach):
    rec = recommend(UseCase(complexity=complexity, examples=49, strict_format=True, compute="high"))
    assert rec.approach == approach and rec.rule == 1
    assert any("49" in r for r in rec.reasons)
    # domain knowledge that changes weekly: rule 1 still decides, but the advice names retrieval for it
    fresh = recommend(UseCase(complexity=complexity, examples=10, domain_specific=True, knowledge_updates="weekly"))
    assert fresh.rule == 1 and any("retrieve it (RAG) into the prompt" in c for c in fresh.caveats), fresh.caveats
    assert not any("RAG" in c for c in recommend(UseCase(complexity=complexity, examples=10, domain_specific=True)).caveats)


def test_rule2_knowledge_heavy_fast_changing_without_strict_format_is_rag():
    for updates in ("daily", "weekly"):
        rec = recommend(UseCase(examples=5000, domain_specific=True, knowledge_updates=updates, compute="high",
                                complexity="complex"))
        assert rec.approach == "RAG" and rec.rule == 2
    # monthly knowledge, or a strict format, or a general task: not RAG
    assert recommend(UseCase(examples=5000, domain_specific=True, knowledge_updates="monthly")).approach != "RAG"
    assert recommend(UseCase(examples=5000, domain_specific=True, strict_format=True, knowledge_updates="daily")).approach != "RAG"
    assert recommend(UseCase(examples=5000, domain_specific=False, knowledge_updates="daily")).approach != "RAG"


def test_rule3_low_compute_with_100_examples_is_peft():
    rec = recommend(UseCase(examples=100, compute="low", strict_format=True, complexity="complex"))
    assert rec.approach == "PEFT" and rec.rule == 3
    # 99 examples with low compute falls through to the default rule, still PEFT but for another reason
    assert recommend(UseCase(examples=99, compute="low")).rule == 6


def test_rule4_strict_format_with_500_examples_is_full_sft():
    rec = recommend(UseCase(examples=500, strict_format=True, compute="medium"))
    assert rec.approach == "full SFT" and rec.rule == 4
    assert recommend(UseCase(examples=499, strict_format=True, compute="medium")).approach == "PEFT"


def test_rule5_complex_with_high_compute_is_full_sft():
    rec = recommend(UseCase(examples=200, complexity="complex", compute="high"))
    assert rec.approach == "full SFT" and rec.rule == 5
    assert recommend(UseCase(examples=200, complexity="complex", compute="medium")).approach == "PEFT"


def test_rule6_otherwise_peft():
    rec = recommend(UseCase(examples=300, complexity="moderate", compute="medium"))
    assert rec.approach == "PEFT" and rec.rule == 6
    assert rec.reasons


def test_latency_adds_caveats_not_a_different_answer():
    slow = recommend(UseCase(examples=1000, domain_specific=True, knowledge_updates="daily", latency="high"))
    assert slow.approach == "RAG" and any("latency" in c for c in slow.caveats)


def test_use_case_from_yaml_with_flag_overrides(tmp_path):
    f = tmp_path / "uc.yaml"
    f.write_text("complexity: complex\nexamples: 800\nstrict-format: yes\ncompute: low\n")
    assert load_use_case(f).compute == "low"
    uc = load_use_case(f, {"compute": "high", "examples": None})
    assert uc == UseCase(complexity="complex", examples=800, strict_format=True, compute="high")


def test_use_case_errors_are_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("complexity: simple\nbudget: 3\n")
    with pytest.raises(SftlabError, match="unknown use-case key 'budget'"):
        load_use_case(f)
    with pytest.raises(SftlabError, match="unknown compute"):
        UseCase(compute="huge")
    with pytest.raises(SftlabError, match="examples"):
        load_use_case(None, {"examples": "many"})
    f.write_text("examples: 800\ncompute: low\nexamples: 80\n")  # safe_load kept the last value silently
    with pytest.raises(SftlabError, match=r"line 3: not valid YAML \(key 'examples' is given twice"):
        load_use_case(f)


# --- shapes ------------------------------------------------------------------------------------


def test_default_shape_parameter_count_is_smollm2_135m():
    assert SMOL.params == 134_515_008  # the published SmolLM2-135M count


def test_shape_from_config_reads_the_fields_that_matter():
    cfg = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
    assert shape_from_config(cfg, "smollm2-135m-instruct") == SMOL


def test_load_shape_reads_a_local_config_without_weights(tmp_path):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = load_shape(str(tmp_path))  # the folder holds no weights at all
    assert shape.context == 2048  # LlamaConfig's default max_position_embeddings: none in this config
    assert replace(shape, name=SMOL.name, context=0) == SMOL


def test_params_parsing_and_typical_shapes():
    assert parse_param_count("7B") == 7_000_000_000
    assert parse_param_count("135m") == 135_000_000
    assert parse_param_count("1.5B") == 1_500_000_000
    assert abs(seven_b().params / 6.74e9 - 1) < 0.01  # Llama-2-7B's shape
    five = shape_from_params("5B")
    assert abs(five.params / 5e9 - 1) < 0.05
    for bad in ("garbage", "7X", "", "0.1"):
        with pytest.raises(SftlabError):
            parse_param_count(bad)


# --- the estimator's parts ---------------------------------------------------------------------


def test_weights_bytes_are_params_times_bytes():
    fp32 = static_parts(SMOL, TrainSetup(method="full", device="cpu", precision="fp32"))
    assert fp32["weights"] == SMOL.params * 4
    bf16 = static_parts(SMOL, TrainSetup(method="lora", device="cuda", precision="bf16"))
    assert bf16["weights"] == SMOL.params * 2


def test_mixed_precision_adam_is_16_bytes_per_param_before_activations():
    s7 = seven_b()
    for precision in ("bf16", "fp16"):
        setup = TrainSetup(method="full", precision=precision, optimizer="adamw", device="cuda")
        assert static_bytes_per_param(s7, setup) == 16.0
        parts = static_parts(s7, setup)
        assert parts["weights"] == 2 * s7.params and parts["gradients"] == 2 * s7.params
        assert parts["optimizer"] == 12 * s7.params  # fp32 master weights + two fp32 moments
    assert static_bytes_per_param(s7, TrainSetup(method="full", precision="fp32", device="cpu")) == 16.0
    assert static_bytes_per_param(s7, TrainSetup(method="full", precision="bf16", optimizer="sgd")) == 8.0


def test_lora_parameter_count_by_hand():
    # SmolLM2-135M, r=16, all linear layers: r * (in + out) per linear, 30 layers.
    # q: 576+576, k: 576+192, v: 576+192, o: 576+576, gate: 576+1536, up: 576+1536, down: 1536+576
    per_layer = 16 * (1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112)
    assert per_layer == 162_816
    assert lora_param_count(SMOL, 16, ALL_LINEAR) == 30 * per_layer == 4_884_480  # what peft reports
    assert lora_param_count(SMOL, 8, ("q_proj", "v_proj")) == 30 * 8 * (1152 + 768)


def test_full_activation_count_matches_the_saved_tensors_of_a_llama_layer():
    # fp32 full fine-tune, per token per layer: 8 hidden-sized, 2 key/value-sized and 4 intermediate-sized
    # tensors, plus a log-sum-exp per head and two rsqrt values (checked with saved_tensors_hooks).
    setup = TrainSetup(method="full", device="cpu", precision="fp32", batch=1, seq_len=1)
    expected = 4 * (8 * 576 + 2 * 192 + 4 * 1536) + 4 * 9 + 2 * 4
    assert layer_activation_bytes(SMOL, setup) == expected


def test_lora_dropout_makes_activations_larger_than_full():
    # LoRA keeps each dropout's mask and output: more saved per layer than a full fine-tune
    # (the reason a LoRA run without checkpointing can peak above a full fine-tune).
    full = layer_activation_bytes(SMOL, TrainSetup(method="full", device="cpu"))
    lora = layer_activation_bytes(SMOL, TrainSetup(method="lora", device="cpu", lora_dropout=0.05))
    lora0 = layer_activation_bytes(SMOL, TrainSetup(method="lora", device="cpu", lora_dropout=0.0))
    assert lora > 1.4 * full and lora0 < full


def test_checkpointing_reduces_activations():
    for method in ("full", "lora", "qlora"):
        base = TrainSetup(method=method, batch=8, seq_len=1024, device="cuda")
        off = estimate_memory(seven_b(), base)
        on = estimate_memory(seven_b(), replace(base, gradient_checkpointing=True))
        assert on.activation_bytes_per_layer["checkpointing"] < off.activation_bytes_per_layer["no_checkpointing"] / 10
        assert on.total_bytes < off.total_bytes


def test_activations_and_logits_scale_with_tokens():
    small = estimate_memory(SMOL, TrainSetup(method="lora", batch=1, seq_len=256, device="cpu"))
    big = estimate_memory(SMOL, TrainSetup(method="lora", batch=4, seq_len=256, device="cpu"))
    assert big.breakdown["activations"] > 3.9 * small.breakdown["activations"]
    assert big.breakdown["logits"] > small.breakdown["logits"]
    # the loss works on chunks: beyond the chunk size the logits part stops growing
    huge = estimate_memory(SMOL, TrainSetup(method="lora", batch=64, seq_len=256, device="cpu"))
    assert huge.breakdown["logits"] == 12 * 2048 * SMOL.vocab


def test_prompt_masking_shrinks_the_loss_chunk():
    setup = TrainSetup(method="lora", batch=2, seq_len=512, device="cpu")
    half = estimate_memory(SMOL, replace(setup, trained_fraction=0.5)).breakdown["logits"]
    assert half == 12 * 511 * SMOL.vocab  # ceil(2 * 511 * 0.5) rows
    assert estimate_memory(SMOL, setup).breakdown["logits"] == 2 * half


def test_breakdown_sums_to_total_and_peak_is_the_largest_phase():
    for setup in (TrainSetup(method="full", batch=1, seq_len=128, device="cpu"),
                  TrainSetup(method="lora", batch=8, seq_len=512, device="cpu"),
                  TrainSetup(method="qlora", batch=2, seq_len=2048, device="cuda", gradient_checkpointing=True),
                  TrainSetup(method="prefix", batch=2, seq_len=512, device="cuda")):
        e = estimate_memory(SMOL, setup)
        assert sum(e.breakdown.values()) == e.total_bytes == max(e.phases.values())


def test_gradient_accumulation_keeps_gradients_alive():
    one = estimate_memory(SMOL, TrainSetup(method="full", batch=8, seq_len=512, device="cpu"))
    acc = estimate_memory(SMOL, TrainSetup(method="full", batch=8, seq_len=512, device="cpu", grad_accum=4))
    assert acc.total_bytes > one.total_bytes and "gradients" in acc.breakdown


def test_7b_full_fine_tune_does_not_fit_one_80gb_gpu():
    e = estimate_memory(seven_b(), TrainSetup(method="full", batch=1, seq_len=512, device="cuda", precision="bf16"))
    assert e.total_bytes > 80 * GB
    assert not fits(seven_b(), TrainSetup(method="full", batch=1, seq_len=512), CPU_MACHINE)["80 GB GPU"]["fits"]


def test_7b_qlora_fits_a_24gb_gpu_at_modest_length():
    setup = TrainSetup(method="qlora", batch=1, seq_len=512, device="cuda")
    e = estimate_memory(seven_b(), setup)
    assert e.total_bytes < 24 * GB
    assert fits(seven_b(), setup, CPU_MACHINE)["24 GB GPU"]["fits"]
    assert 3 * GB < e.breakdown["weights"] < 5 * GB  # 4-bit base weights, embeddings in bf16


def test_budget_search_returns_the_largest_batch_that_fits():
    setup = TrainSetup(method="lora", seq_len=512, device="cuda")
    budget = 24 * GB
    b = max_batch(seven_b(), setup, budget)
    assert b >= 1
    assert estimate_memory(seven_b(), replace(setup, batch=b)).total_bytes <= budget
    assert estimate_memory(seven_b(), replace(setup, batch=b + 1)).total_bytes > budget
    n = max_seq_len(seven_b(), replace(setup, batch=1), budget)
    assert estimate_memory(seven_b(), replace(setup, batch=1, seq_len=n)).total_bytes <= budget
    assert estimate_memory(seven_b(), replace(setup, batch=1, seq_len=n + 1)).total_bytes > budget
    assert max_batch(seven_b(), TrainSetup(method="full", seq_len=512), 24 * GB) == 0


def test_recommended_config_fits_the_budget_and_keeps_the_effective_batch():
    setup = TrainSetup(method="full", batch=16, seq_len=1024, device="cuda")
    rec = recommend_config(seven_b(), setup, 24 * GB)
    assert rec.fits and rec.method in ("lora", "qlora")  # a 7B full fine-tune cannot fit 24 GB
    assert rec.batch * rec.grad_accum >= 16 and rec.estimated_bytes <= 24 * GB
    assert any("full does not fit" in n for n in rec.notes)
    small = recommend_config(SMOL, TrainSetup(method="full", batch=4, seq_len=512, device="cuda"), 24 * GB)
    assert (small.method, small.batch, small.grad_accum, small.gradient_checkpointing) == ("full", 4, 1, False)
    assert small.learning_rate == 7.07e-5  # full under 0.5B: 1e-4 at a global batch of 8, x sqrt(4/8) here
    nothing = recommend_config(shape_from_params("70B"), TrainSetup(method="full", seq_len=4096), 24 * GB)
    assert not nothing.fits and nothing.notes
    # the largest micro-batch that fits is 5 of a global batch of 8: 4 x 2 keeps 8 exactly (it was 5 x 2 = 10)
    lora = TrainSetup(method="lora", batch=8, seq_len=2048, device="cuda")
    budget = (estimate_memory(seven_b(), replace(lora, batch=5, grad_accum=2)).total_bytes
              + estimate_memory(seven_b(), replace(lora, batch=6, grad_accum=2)).total_bytes) / 2 / 0.9
    even = recommend_config(seven_b(), lora, budget)
    assert (even.batch, even.grad_accum) == (4, 2) and not any("rounded up" in n for n in even.notes), even
    odd = recommend_config(seven_b(), replace(lora, batch=7), budget)  # 7 = 4 x 2, one row more
    assert (odd.batch, odd.grad_accum) == (4, 2) and "(rounded up to 8)" in odd.notes[-1]


def test_make_plan_budget_defaults_and_json_shape():
    plan = make_plan(SMOL, TrainSetup(method="lora", batch=2, seq_len=256, device="cpu"), machine=CPU_MACHINE)
    d = plan.to_dict()
    assert d["budget"]["bytes"] == CPU_MACHINE.capacity_bytes
    assert set(d["fits"]) == {"24 GB GPU", "40 GB GPU", "48 GB GPU", "80 GB GPU", "141 GB GPU", "this machine"}
    json.dumps(d)


def test_setup_validation():
    with pytest.raises(SftlabError, match="unknown method 'dpo'"):
        TrainSetup(method="dpo")
    with pytest.raises(SftlabError, match="batch"):
        TrainSetup(batch=0)


# --- QLoRA on CPU: allowed where bitsandbytes trains it (sftlab.qlora, one rule) -------------------


@pytest.fixture
def bnb_version(monkeypatch):
    """Pretend the installed bitsandbytes is the given version (None: not installed)."""
    import sftlab.qlora

    def set_version(version):
        monkeypatch.setattr(sftlab.qlora, "bitsandbytes_version", lambda: version)

    return set_version


def test_qlora_on_cpu_gets_a_4bit_estimate(bnb_version):
    bnb_version("0.50.2")
    setup = TrainSetup(method="qlora", batch=2, seq_len=512, device="cpu")
    e = estimate_memory(SMOL, setup)
    assert sum(e.breakdown.values()) == e.total_bytes == max(e.phases.values())
    # NF4 linears (~0.5 byte/param plus the double-quantised constants), the rest in the fp32 compute dtype.
    linear = SMOL.n_layers * SMOL.layer_linear_params
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)
    assert e.breakdown["weights"] == int(linear * nf4 + (SMOL.params - linear) * 4)
    assert 0.5 * linear < linear * nf4 < 0.52 * linear
    lora = estimate_memory(SMOL, replace(setup, method="lora"))
    assert e.breakdown["weights"] < lora.breakdown["weights"] / 3
    s7 = seven_b()
    q7 = estimate_memory(s7, TrainSetup(method="qlora", batch=1, seq_len=512, device="cpu"))
    assert 3 * GB < q7.breakdown["weights"] < 5 * GB  # a 7B base in 4 bits, embeddings in fp32
    assert q7.total_bytes < estimate_memory(s7, TrainSetup(method="lora", batch=1, seq_len=512, device="cpu")).total_bytes / 2
    f = fits(SMOL, setup, CPU_MACHINE)["this machine"]
    assert f["needed_bytes"] == e.total_bytes and f["fits"]


def test_qlora_is_a_cpu_fallback_only_with_bitsandbytes(bnb_version):
    setup = TrainSetup(method="full", batch=1, seq_len=512, device="cpu")
    bnb_version("0.50.2")  # a 7B LoRA on CPU keeps a ~27 GB fp32 base: only QLoRA fits 20 GB
    rec = recommend_config(seven_b(), setup, 20 * GB)
    assert rec.fits and rec.method == "qlora" and rec.estimated_bytes <= 20 * GB
    note = recommend_config(seven_b(), setup, 4 * GB).notes[-1]
    assert "nothing fits 4 GB at 512 tokens, even qlora" in note
    assert "more memory" in note and "GPU" not in note  # a CPU plan: sharding over GPUs is no advice here
    gpu = recommend_config(seven_b(), replace(setup, device="cuda"), 4 * GB).notes[-1]
    assert "shard over GPUs" in gpu
    bnb_version(None)
    rec = recommend_config(seven_b(), setup, 20 * GB)
    assert not rec.fits and rec.method == "lora"


@pytest.mark.parametrize("version, found", [(None, "not installed"), ("0.49.1", "found 0.49.1")])
def test_qlora_on_cpu_without_bitsandbytes_is_one_clear_error(bnb_version, capsys, version, found):
    bnb_version(version)
    with pytest.raises(SftlabError, match="QLoRA on CPU needs bitsandbytes >=0.50") as exc:
        TrainSetup(method="qlora", device="cpu")
    assert found in str(exc.value) and "pip install" in str(exc.value) and "--method lora" in str(exc.value)
    assert main(["plan", "--params", "7B", "--method", "qlora", "--device", "cpu", "--batch", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bitsandbytes" in err and "pip install" in err
    # a plan for CUDA does not need bitsandbytes here; this CPU machine says why it cannot run it
    f = fits(SMOL, TrainSetup(method="qlora", device="cuda"), CPU_MACHINE)
    assert f["24 GB GPU"]["fits"] and f["this machine"]["needed_bytes"] is None
    assert "pip install" in f["this machine"]["note"]


def test_bitsandbytes_rule_matches_the_installed_version():
    from sftlab.qlora import bitsandbytes_version, qlora_unavailable

    try:
        import bitsandbytes
    except Exception:
        assert bitsandbytes_version() is None and "not installed" in qlora_unavailable("cpu")
        return
    assert bitsandbytes_version() == bitsandbytes.__version__
    from packaging.version import Version

    assert (qlora_unavailable("cpu") is None) == (Version(bitsandbytes.__version__) >= Version("0.50"))
    assert qlora_unavailable("cuda") is None


def test_cli_plan_json_for_qlora_on_cpu(bnb_version, capsys):
    bnb_version("0.50.2")
    assert main(["plan", "--params", "7B", "--method", "qlora", "--device", "cpu", "--batch", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["setup"]["method"] == "qlora" and d["setup"]["device"] == "cpu"
    assert d["total_bytes"] == sum(d["breakdown"].values()) and 3 * GB < d["breakdown"]["weights"] < 5 * GB


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_plan_json_for_7b_qlora(capsys):
    assert main(["plan", "--params", "7B", "--method", "qlora", "--batch", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"total_bytes", "breakdown", "fits", "recommended"} <= set(d)
    assert d["total_bytes"] == sum(d["breakdown"].values())
    assert d["fits"]["24 GB GPU"]["fits"] is True
    assert d["recommended"]["method"] == "qlora"


def test_cli_plan_for_cuda_shows_the_estimate_with_liger_too(capsys, tmp_path):
    """auto kernels wait for a trial on the GPU, so a cuda plan gives both figures; --liger plans with them."""
    assert main(["plan", "--params", "1.7B", "--method", "full", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["liger_total_bytes"] < plain["total_bytes"] and "logits" in plain["breakdown"]
    assert main(["plan", "--params", "1.7B", "--method", "full", "--liger", "--json"]) == 0
    liger = json.loads(capsys.readouterr().out)
    assert liger["total_bytes"] == plain["liger_total_bytes"] and liger["liger_total_bytes"] is None
    assert "fused loss" in liger["breakdown"] and liger["fits"]["this machine"]["needed_bytes"] > 0
    assert main(["plan", "--params", "1.7B", "--method", "full"]) == 0
    assert "with liger-kernel (pip install 'sftlab[gpu]')" in capsys.readouterr().out
    assert main(["plan", "--params", "1.7B", "--device", "cpu", "--liger"]) == 2
    assert "run on CUDA GPUs" in capsys.readouterr().err
    # a config with liger on (which a CPU plan refuses) is planned for a CPU with --no-liger
    cfg = tmp_path / "liger.yaml"
    cfg.write_text("model: smollm2-135m-instruct\nliger_kernels: true\nfused_loss: true\n")
    assert main(["plan", str(cfg), "--device", "cpu", "--json"]) == 2
    assert "run on CUDA GPUs" in capsys.readouterr().err
    assert main(["plan", str(cfg), "--device", "cpu", "--no-liger", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["setup"]
    assert (s["liger_kernels"], s["fused_loss"], s["device"]) == (False, False, "cpu")


def test_cli_plan_text_with_budget(capsys):
    assert main(["plan", "--params", "135M", "--method", "full", "--budget-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "peak memory" in out and "largest batch" in out and "recommended:" in out
    # the recommendation uses far less than the budget here: "leaves 10% of the budget spare" said it used 90%
    assert "of the 24.00 GB budget (at most 90% of it: 10% kept spare)" in out and "leaves 10%" not in out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--params", "7B", "--method", "dpo"], "unknown method"),
    (["plan", "--params", "garbage"], "--params 'garbage'"),
    (["recommend", "--examples", "10", "--compute", "huge"], "unknown compute"),
])
def test_cli_bad_input_is_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_recommend_json(capsys):
    assert main(["recommend", "--examples", "1000", "--strict-format", "--compute", "high", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["approach"] == "full SFT" and d["reasons"]


def test_allocator_setting_applies_in_a_fresh_process():
    # In a subprocess: the setting lasts for the life of the process that makes it.
    code = "from sftlab.plan import release_freed_memory as r; print(r(), r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == (["True", "True"] if sys.platform.startswith("linux") else ["False", "False"])


def _saved_per_token(model, loss_fn, layer, vocab: int, B: int, L: int, precision: str) -> float:
    """Bytes ``layer`` saves for backward per token in one training forward of the model (parameters
    not counted), with torch.autograd.graph.saved_tensors_hooks."""
    import torch

    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(3, vocab, (B, L))
    saved, inside = {}, [False]

    def pack(t):
        st = t.untyped_storage()
        if inside[0] and st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss_fn(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return sum(saved.values()) / (B * L)


@pytest.mark.parametrize("precision, dropout", [("bf16", 0.0), ("bf16", 0.1), ("fp32", 0.0), ("fp32", 0.1)])
def test_lora_activation_count_matches_saved_tensors(tiny_model_dir, precision, dropout):
    """Per token and layer, what sftlab's LoRA model really keeps for backward (CPU, autocast or not)."""

    from sftlab.config import Config
    from sftlab.models import load_tokenizer, model_config
    from sftlab.plan.memory import layer_activation_bytes
    from sftlab.plan.shapes import shape_from_config
    from sftlab.train.model import build_model

    tok = load_tokenizer(str(tiny_model_dir))
    cfg = Config(model=str(tiny_model_dir), precision=precision, lora_dropout=dropout, attn_implementation="sdpa",
                 gradient_checkpointing=False)
    model, loss_fn = build_model(cfg, tok, [])
    B, L = 4, 256
    measured = _saved_per_token(model, loss_fn, model.base_model.model.model.layers[1], len(tok), B, L, precision)
    shape = shape_from_config(model_config(str(tiny_model_dir)), "tiny")
    est = layer_activation_bytes(shape, TrainSetup(method="lora", batch=B, seq_len=L, device="cpu",
                                                   precision=precision, lora_dropout=dropout))
    assert est == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("method, precision", [("full", "bf16"), ("full", "fp32"), ("lora", "bf16"), ("lora", "fp32")])
def test_liger_activation_count_matches_what_liger_saves(tiny_model_dir, monkeypatch, method, precision):
    """With liger-kernel's RMSNorm and SwiGLU patched in (as train/kernels.py does on a GPU), per token and
    layer, what the model keeps for backward. Its Triton kernels are not launched (no GPU here): only what
    liger's autograd functions save is counted, and that is what the plan models. Needs liger-kernel and
    triton (not installed by `make test`; run with them on the path)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("liger-kernel and triton are not installed")
    import triton
    from liger_kernel.ops import rms_norm, swiglu
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    from sftlab.config import Config
    from sftlab.models import load_tokenizer, model_config
    from sftlab.plan.memory import layer_activation_bytes
    from sftlab.plan.shapes import shape_from_config
    from sftlab.train.model import build_model

    class NoLaunch:  # kernel[grid](...) does nothing: the outputs liger allocated stay as they are
        def __getitem__(self, grid):
            return lambda *a, **k: None

    for mod in (rms_norm, swiglu):
        for name, value in list(vars(mod).items()):
            if isinstance(value, triton.runtime.jit.JITFunction):
                monkeypatch.setattr(mod, name, NoLaunch())
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = Config(model=str(tiny_model_dir), method=method, precision=precision, attn_implementation="sdpa",
                 gradient_checkpointing=False, liger_kernels=False, fused_loss=False)
    model, loss_fn = build_model(cfg, tok, [])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    from transformers.models.llama import modeling_llama

    for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb"):  # liger also patches these module-wide
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    # rope stays HF's (liger's keeps what HF's keeps: cos and sin)
    _apply_liger_kernel_to_instance(model=base, rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    layer = base.model.layers[1]
    assert layer.mlp._get_name() == "LigerSwiGLUMLP"
    B, L = 4, 256
    measured = _saved_per_token(model, loss_fn, layer, len(tok), B, L, precision)
    shape = shape_from_config(model_config(str(tiny_model_dir)), "tiny")
    setup = TrainSetup(method=method, batch=B, seq_len=L, device="cuda", precision=precision, liger_kernels=True)
    # the dropout mask's dtype is the one CPU/CUDA difference, and there is no dropout here
    assert layer_activation_bytes(shape, setup) == pytest.approx(measured, rel=0.05)
    assert layer_activation_bytes(shape, replace(setup, liger_kernels=False)) > 1.1 * measured


def test_fused_loss_is_planned_as_liger_chunks_it():
    """liger's chunk: next_power_of_2(rows / ceil(vocab / hidden)) rows; its logits and their scaled
    gradient in the compute dtype, the hidden states' gradient for every trained row, fp32 losses."""
    from sftlab.plan.memory import fused_loss_bytes, logits_bytes

    s = TrainSetup(method="lora", batch=4, seq_len=512, device="cuda", precision="bf16", fused_loss=True)
    rows = 4 * 511  # ceil(49152 / 576) = 86 -> 2044 / 86 -> 24 -> a chunk of 32 rows
    assert fused_loss_bytes(SMOL, s) == 2 * 32 * SMOL.vocab * 2 + rows * SMOL.hidden * 2 + rows * 4
    assert logits_bytes(SMOL, s) == fused_loss_bytes(SMOL, s) < logits_bytes(SMOL, replace(s, fused_loss=False)) / 100
    est = estimate_memory(SMOL, s)
    assert "fused loss" in est.breakdown and "logits" not in est.breakdown
    with pytest.raises(SftlabError, match="run on CUDA GPUs"):
        TrainSetup(method="lora", device="cpu", fused_loss=True)


def test_cpu_plan_counts_the_process_baseline():
    from sftlab.plan.memory import CPU_LIBRARY_BYTES, process_baseline_bytes

    cpu = TrainSetup(method="lora", batch=2, seq_len=256, device="cpu")
    est = estimate_memory(SMOL, cpu)
    base = process_baseline_bytes(SMOL, cpu)
    assert est.breakdown["process baseline"] == base > CPU_LIBRARY_BYTES  # in every moment, so in the peak's parts
    assert all(v >= base for v in est.phases.values())
    assert process_baseline_bytes(replace(SMOL, vocab=4 * SMOL.vocab), cpu) > base  # a bigger tokenizer
    gpu = estimate_memory(SMOL, replace(cpu, device="cuda"))
    assert "process baseline" not in gpu.breakdown and process_baseline_bytes(SMOL, replace(cpu, device="cuda")) == 0


def test_library_baseline_matches_a_fresh_process():
    # What `sftlab train` has imported before its model loads, measured in a fresh interpreter.
    from sftlab.plan.memory import CPU_LIBRARY_BYTES

    code = ("import os, torch, sftlab.cli, sftlab.train.run, peft; from transformers import Trainer; "
            "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    rss = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert 0.75 * CPU_LIBRARY_BYTES < rss < 1.25 * CPU_LIBRARY_BYTES, rss


def test_train_keeps_freed_pages_by_default_and_returns_them_when_lean():
    """By default glibc keeps the pages of freed blocks (no trim, no per-block mmap); lean returns them."""
    code = ("import os\nfrom sftlab.train.callbacks import set_train_malloc\nprint(repr(set_train_malloc()))\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
            "before = rss()\nblocks = [bytearray(1 << 20) for _ in range(200)]\nheld = rss()\ndel blocks\n"
            "print(held - before > 150 << 20, rss() - before > 150 << 20)")
    from sftlab.plan.allocator import glibc_version

    if not sys.platform.startswith("linux") or glibc_version() is None:
        pytest.skip("glibc's malloc")
    env = dict(os.environ)
    env.pop("SFTLAB_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split("\n")
    assert out[-3:-1] == ["'keep'", "True True"]  # 200 MB allocated, still resident after the free
    env["SFTLAB_MALLOC"] = "lean"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split("\n")
    assert out[-3:-1] == ["'lean'", "True False"]  # unmapped at once
    plain = code.replace("from sftlab.train.callbacks import set_train_malloc", "set_train_malloc = lambda: 'glibc default'")
    out = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, check=True, env=env).stdout.split("\n")
    assert out[-3:-1] == ["'glibc default'", "True False"]  # glibc's own settings give the pages back


def test_plan_stays_within_the_models_context_and_refuses_an_empty_budget(capsys):
    """The longest sequence offered is at most the context the model was trained for (a config's
    max_position_embeddings, or the table's), a longer --seq-len gets a note, and a budget must be > 0."""
    from sftlab.plan.shapes import load_shape, shape_from_config

    assert load_shape("llama-2-7b").context == 4096
    assert shape_from_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128,
                              "max_position_embeddings": 512}).context == 512
    assert main(["plan", "--params", "135M", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"]["context"] == 8192 and d["budget"]["max_seq_len"] == 8192  # 80 GB would hold far more
    assert main(["plan", "--params", "7B", "--seq-len", "16384"]) == 0
    assert "16384 tokens is beyond the model's context of 4096" in capsys.readouterr().out
    # a --seq-len past the context that fits nowhere: the longest offered is still within the context
    seven = load_shape("llama-2-7b")
    rec = recommend_config(seven, TrainSetup(method="lora", seq_len=1_000_000, device="cuda"), 80 * GB)
    assert not rec.fits and "the longest that fits is 4096 tokens (the model's context)" in rec.notes[0], rec.notes
    for bad in ("0", "-5", "nan", "inf"):  # inf: an OverflowError traceback before
        assert main(["plan", "--budget-gb", bad]) == 2
        assert "a memory budget must be a number of GB above 0" in capsys.readouterr().err


def test_this_machine_row_plans_the_precision_train_would_pick(monkeypatch):
    """A plan for a GPU also says whether this CPU machine could run it: at the precision `precision:
    auto` measures here (the probe), not a fixed fp32."""
    from sftlab.plan import fit as fit_mod

    setup = TrainSetup(method="lora", batch=4, seq_len=512, device="cuda")
    for chosen in ("bf16", "fp32"):
        monkeypatch.setattr(fit_mod, "resolve_precision", lambda device, h, i, c=chosen: (c, None))
        row = fits(SMOL, setup, CPU_MACHINE)["this machine"]
        want = estimate_memory(SMOL, replace(setup, device="cpu", precision=chosen)).total_bytes
        assert row["needed_bytes"] == want and row["precision"] == chosen and f"CPU training in {chosen}" in row["note"]
    bf16 = estimate_memory(SMOL, replace(setup, device="cpu", precision="bf16")).total_bytes
    assert bf16 != estimate_memory(SMOL, replace(setup, device="cpu", precision="fp32")).total_bytes


def test_cli_plan_defaults_are_trains_and_a_config_plans_its_run(tmp_path, capsys, monkeypatch):
    """Without flags, plan uses train's defaults (batch 4 x accumulation 4, so the recommended rate is
    train's); with a training config it plans that run (its method, batch, accumulation, max_seq_length,
    precision, ...), flags overriding it."""
    from sftlab.config import load_config
    from sftlab.plan.auto import auto_learning_rate

    assert main(["plan", "--params", "135M", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    defaults = load_config(None, {})
    assert (d["setup"]["batch"], d["setup"]["grad_accum"], d["setup"]["method"]) == (
        defaults.batch_size, defaults.gradient_accumulation, defaults.method)
    assert d["setup"]["seq_len"] == 512
    g = defaults.batch_size * defaults.gradient_accumulation
    assert d["recommended"]["learning_rate"] == auto_learning_rate(135e6, "lora", global_batch=g)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: smollm2-135m-instruct\nmethod: full\nbatch_size: 2\ngradient_accumulation: 8\n"
                   "max_seq_length: 1024\nprecision: fp32\ngradient_checkpointing: true\noptimizer: adamw\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    s = d["setup"]
    assert (s["method"], s["batch"], s["grad_accum"], s["seq_len"], s["precision"], s["gradient_checkpointing"]) == (
        "full", 2, 8, 1024, "fp32", True)
    assert d["model"]["params"] > 100e6 and d["config"] == str(cfg)
    assert main(["plan", str(cfg), "--batch", "1", "--seq-len", "256", "--method", "lora", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["setup"]
    assert (s["method"], s["batch"], s["grad_accum"], s["seq_len"]) == ("lora", 1, 8, 256)
    # a flag overrides the config's gradient_checkpointing: true both ways (there was no way to turn it off)
    for flag, want in (("--no-gradient-checkpointing", False), ("--gradient-checkpointing", True)):
        assert main(["plan", str(cfg), flag, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["setup"]["gradient_checkpointing"] is want
    cfg.write_text("model: smollm2-135m-instruct\nbatch_size: auto\ngradient_accumulation: auto\n")
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "planning the run of" in out and "batch_size auto: planned at 4" in out
    cfg.write_text("modle: x\n")
    assert main(["plan", str(cfg)]) == 2
    assert "unknown config key 'modle'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", ["method: prefix\nprefix_tokens: 200\n", "packing: true\n",
                                   "method: full\newc_lambda: 1\nreplay_data: general.jsonl\n"])
def test_plan_of_a_config_estimates_what_train_check_estimates(tmp_path, capsys, extra):
    """`sftlab plan RUN.yaml` left out the config's prefix_tokens (it planned 20 virtual tokens) and its packing
    (train runs packed rows with sdpa, not the per-batch eager/sdpa choice): its total differed from the
    memory line of `train --check`, which points to plan for the breakdown of that same total."""
    from sftlab.config import load_config
    from sftlab.models import model_config
    from sftlab.plan.auto import estimated_bytes

    text = f"precision: fp32\nbatch_size: 2\ngradient_accumulation: 1\nmax_seq_length: 256\n{extra}"
    (tmp_path / "run.yaml").write_text(text)
    cfg = load_config(tmp_path / "run.yaml")
    want = estimated_bytes(cfg, model_config(cfg.model), batch=2, seq_len=256, checkpointing=False, device="cpu")
    assert main(["plan", str(tmp_path / "run.yaml"), "--device", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_bytes"] == want
    assert ("EWC anchor and Fisher" in d["breakdown"]) == ("ewc_lambda" in extra)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ewc_holds_an_anchor_and_a_fisher_of_every_trained_parameter(method):
    """train/continual.py's EWC keeps a copy of each trained parameter (the anchor) and its Fisher diagonal for
    the whole run: for a full fine-tune two more copies of the model, which the estimate (batch_size and
    gradient_checkpointing auto, the memory line, plan) left out."""
    shape = shape_from_params("135M")
    setup = TrainSetup(method=method, device="cpu", precision="fp32", batch=2, seq_len=256)
    plain, ewc = (estimate_memory(shape, replace(setup, ewc=e)) for e in (False, True))
    extra = 2 * (shape.params if method == "full" else ewc.trainable_params) * 4
    assert ewc.breakdown["EWC anchor and Fisher"] == extra
    assert ewc.phases["optimizer step"] == plain.phases["optimizer step"] + extra
    # the penalty's two temporaries of the largest trained tensor (the embedding), while the activations live
    tmp = 2 * shape.vocab * shape.hidden * 4 if method == "full" else 0
    assert ewc.phases["loss backward"] == plain.phases["loss backward"] + extra + tmp


def test_plan_of_a_sharded_config_says_it_plans_one_unsharded_process(tmp_path, capsys):
    """A config with fsdp or deepspeed was planned as one GPU holding everything, without a word: the
    plan now says what it leaves out (sharding is not estimated), in the text and in --json's notes."""
    for key, value in (("fsdp", "full_shard auto_wrap"), ("deepspeed", "ds_zero3.json")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(f"model: llama-2-7b\nmethod: full\n{key}: {value}\nmax_seq_length: 1024\n")
        assert main(["plan", str(path), "--json"]) == 0
        notes = json.loads(capsys.readouterr().out)["notes"]
        assert any(n.startswith(f"{key} '{value}': planned as one process holding the whole model") for n in notes)
    path.write_text("model: llama-2-7b\nmethod: full\n")
    assert main(["plan", str(path), "--json"]) == 0
    assert not any("sharding" in n for n in json.loads(capsys.readouterr().out)["notes"])


def test_train_check_and_plan_agree_on_8bit_adam_on_a_cpu():
    """train --check estimated adamw8bit on a CPU as fp32 AdamW (8 bytes of state per parameter) while
    `sftlab plan --device cpu --optimizer adamw8bit` counted 8-bit state; bitsandbytes keeps uint8 state
    and a float32 absmax per 256 on a CPU as on a GPU, which is what both now estimate."""
    from sftlab.config import load_config
    from sftlab.plan.auto import estimated_bytes

    tiny = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 1000,
            "intermediate_size": 512, "max_position_embeddings": 512}
    shape = shape_from_config(tiny, "tiny")
    for opt in ("adamw", "adamw8bit"):
        cfg = load_config(None, {"method": "full", "optimizer": opt, "precision": "fp32"})
        got = estimated_bytes(cfg, tiny, batch=2, seq_len=64, checkpointing=False, device="cpu")
        setup = TrainSetup(method="full", optimizer=opt, precision="fp32", batch=2, seq_len=64, device="cpu")
        assert got == estimate_memory(shape, setup).total_bytes, opt
    assert static_parts(shape, setup)["optimizer"] < shape.params * 2.1  # 2 bytes + absmax, not 8


def test_plan_refuses_flash_attention_where_train_cannot_run_it(capsys):
    """flash_attention_2 on a CPU or in fp32 was planned silently although loading the model refuses it;
    a GPU plan with it still gets its this-machine row on a CPU (planned there with sdpa)."""
    for flags in (["--device", "cpu"], ["--precision", "fp32"]):
        assert main(["plan", "--attention", "flash_attention_2", *flags]) == 2
        assert "attention flash_attention_2 runs on CUDA GPUs in bf16 or fp16" in capsys.readouterr().err
    row = fits(SMOL, TrainSetup(method="lora", attention="flash_attention_2", device="cuda"), CPU_MACHINE)
    assert row["this machine"]["needed_bytes"] > 0


def test_plan_notes_a_lora_rank_past_the_layers_width(capsys):
    """--lora-r 100000 on a 135M model (k_proj 576 -> 192) was planned as given, ending in 'nothing fits
    ... shard over GPUs'; the rank is the mistake, and the plan now says so."""
    assert main(["plan", "--params", "135M", "--method", "lora", "--lora-r", "100000", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith("lora_r 100000 is above k_proj's width of 192") and "--lora-r 64" in n for n in notes), notes
    assert main(["plan", "--params", "135M", "--method", "lora", "--lora-r", "192", "--json"]) == 0
    assert not any("lora_r" in n for n in json.loads(capsys.readouterr().out)["notes"])
