"""`sftlab plan` and `sftlab train --check` on the same run: the plan command the check points to runs as
printed (the user's config and --set overrides included), and both give the same notes on a LoRA rank past
a layer's width and on rows (after prefix tuning's virtual tokens) past the model's context."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil

import pytest
from conftest import chat_data, train_config

from sftlab.cli import main
from sftlab.core.errors import SftlabError
from sftlab.models import model_config
from sftlab.plan.render import gb
from sftlab.plan.shapes import load_shape
from sftlab.train import checks
from sftlab.train.run import train


def _check(capsys, argv: list[str]) -> str:
    assert main(["train", *argv, "--check"]) == 0
    return capsys.readouterr().out


def _plan_json(capsys, command: str) -> dict:
    words = shlex.split(command)
    assert words[:2] == ["sftlab", "plan"], command
    assert main([*words[1:], "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_the_plan_command_of_the_check_runs_with_the_users_overrides(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The memory line said `sftlab plan CONFIG --device cpu --seq-len N`: plan had no --set (so a run given
    as flags and --set could not be planned), CONFIG was not the user's, and plan then estimated its own
    defaults (another batch, accumulation, precision), not the step the line gave."""
    monkeypatch.chdir(tmp_path)
    data = chat_data(tmp_path / "train.jsonl", 40)
    (tmp_path / "run.yaml").write_text(f"model: {tiny_model_dir}\nmethod: lora\n")
    argv = ["run.yaml", "--data", data, "--output-dir", str(tmp_path / "run"), "--set", "lora_r=8",
            "--set", "precision=fp32", "--set", "batch_size=2", "--set", "merge_micro_batches=false"]
    line = next(x for x in _check(capsys, argv).splitlines() if x.startswith("memory: "))
    command = re.search(r"`(sftlab plan [^`]*)`", line).group(1)
    assert command.startswith(f"sftlab plan run.yaml --set data={data} ") and "--set lora_r=8" in command
    d = _plan_json(capsys, command)
    s = d["setup"]
    assert (s["method"], s["lora_r"], s["batch"], s["grad_accum"], s["precision"]) == ("lora", 8, 2, 4, "fp32")
    assert f"about {gb(d['total_bytes'])} at the peak" in line and d["config"] == "run.yaml"
    # a memory error's fix names the same command
    monkeypatch.setattr(checks, "device_memory_gb", lambda: ("cpu", 1e-4))
    assert main(["train", *argv, "--check", "--json"]) == 2
    [mem] = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["rule"] == "memory"]
    assert re.search(r"`(sftlab plan [^`]*)`", mem["fixes"][-1]).group(1) == command
    assert main(["train", *argv, "--check", "--find-lr"]) == 2  # its checklist, before the range test
    assert f"`{command}` breaks it down" in capsys.readouterr().out
    # a plain run prints the same checklist (and keeps it in summary.json) with the command named, not CONFIG
    assert main(["train", *argv, "--set", "max_steps=1"]) == 0
    out, named = capsys.readouterr().out, command.replace(" --device", " --set max_steps=1 --device")
    [mem] = [f for f in json.loads((tmp_path / "run" / "summary.json").read_text())["findings"] if "free RAM" in f]
    assert f"`{named}`" in out and f"`{named}`" in mem and checks.PLAN_CONFIG not in out + mem


def test_plan_takes_set_overrides_and_its_flags_win(capsys):
    assert main(["plan", "--set", "method=full", "--set", "max_seq_length=300", "--set", "batch_size=3",
                 "--device", "cpu", "--precision", "fp32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    s = d["setup"]
    assert (s["method"], s["seq_len"], s["batch"]) == ("full", 300, 3)
    assert d["set"] == ["method=full", "max_seq_length=300", "batch_size=3"]  # what was planned, as --json says it
    assert main(["plan", "--set", "batch_size=3", "--batch", "5", "--device", "cpu", "--precision", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["batch"] == 5
    for bad, said in (("batch_size", "must look like key=value"), ("lr=1", "unknown config key 'lr'")):
        assert main(["plan", "--set", bad]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1


def test_check_warns_of_a_lora_rank_past_a_layers_width_as_plan_does(tiny_model_dir, tmp_path, capsys):
    """plan noted a LoRA rank above a layer's width (k_proj of the tiny model: 64 -> 32); train --check said
    nothing of it."""
    mcfg = model_config(str(tiny_model_dir))
    cfg = train_config(tmp_path, tiny_model_dir, method="lora", lora_r=100)
    [f] = checks.lora_rank_findings(cfg, mcfg)
    assert f.severity == "warning" and f.message.startswith("lora_r 100 is above k_proj's width of 32")
    assert f.fixes == ["--set lora_r=32"]
    assert checks.lora_rank_findings(dataclasses.replace(cfg, lora_r=32), mcfg) == []
    assert checks.lora_rank_findings(dataclasses.replace(cfg, lora_r=48, lora_target_modules="gate_proj, up_proj"), mcfg) == []
    assert checks.lora_rank_findings(dataclasses.replace(cfg, lora_r=48, lora_target_modules="gate_proj,k_proj"), mcfg)
    assert checks.lora_rank_findings(dataclasses.replace(cfg, method="full"), mcfg) == []
    assert "lora_r" in {x.rule for x in checks.checklist(cfg, n_params=1, n_examples=16, seq_len=32, model_cfg=mcfg,
                                                         train_keys=set(), eval_keys=set(), report=None)}
    assert main(["plan", "--model", str(tiny_model_dir), "--method", "lora", "--lora-r", "100", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert [n for n in notes if n.startswith(f.message)] == [f"{f.message}; --lora-r 32 or less"]
    # GPT-2 has no k_proj or down_proj (c_attn, c_proj, c_fc): the warning does not name a layer it lacks
    from transformers import GPT2Config

    gpt2 = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    [f] = checks.lora_rank_findings(dataclasses.replace(cfg, lora_r=64), gpt2)
    assert f.message.startswith("lora_r 64 is above the width of its narrowest adapted layer, 32:"), f.message


@pytest.fixture
def short_context_model(tiny_model_dir, tmp_path):
    """The tiny model with a context (max_position_embeddings) of 64."""
    out = tmp_path / "ctx64"
    shutil.copytree(tiny_model_dir, out)
    conf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": 64}))
    return out


def test_prefix_tokens_count_towards_the_models_context(short_context_model, tmp_path, capsys):
    """Prefix tuning's virtual tokens take the first positions (peft passes them as past keys and values:
    the row's tokens start at position prefix_tokens): rows of 50 tokens after 20 virtual tokens run past a
    context of 64, which neither plan nor train --check said."""
    mcfg = model_config(str(short_context_model))
    cfg = train_config(tmp_path, short_context_model, method="prefix", prefix_tokens=20)
    [f] = checks.context_findings(cfg, mcfg, 50)
    assert "rows of up to 50 tokens after 20 virtual tokens (prefix_tokens) are longer than the model's context of 64" \
        in f.message and f.fixes == ["--set max_seq_length=44"]
    assert checks.context_findings(cfg, mcfg, 44) == []
    assert checks.context_findings(dataclasses.replace(cfg, method="lora"), mcfg, 50) == []
    [f] = checks.context_findings(dataclasses.replace(cfg, prefix_tokens=64), mcfg, 10)
    assert f.fixes == ["--set prefix_tokens=32"]
    base = ["plan", "--model", str(short_context_model), "--method", "prefix", "--device", "cpu", "--precision", "fp32"]
    assert main([*base, "--seq-len", "50", "--set", "prefix_tokens=20", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert any(n.startswith("note: 50 tokens after 20 virtual tokens (prefix_tokens) is beyond the model's context "
                            "of 64") and n.endswith("--seq-len at most 44") for n in d["notes"]), d["notes"]
    assert d["budget"]["max_seq_len"] == 44  # the longest row offered leaves room for the prefix
    assert main([*base, "--seq-len", "44", "--set", "prefix_tokens=20"]) == 0
    out = capsys.readouterr().out
    assert "setup: prefix, batch 4 x 44 tokens x accumulation 4, fp32 on cpu, adamw, checkpointing off, 20 virtual " \
           "tokens;" in out  # the setup line said nothing of the prefix's length
    assert "beyond the model's context" not in out and "44 (the model's context after the prefix)" in out
    # the same rows without the prefix fit
    assert main([*base[:4], "lora", *base[5:], "--seq-len", "50", "--json"]) == 0
    assert not any("context" in n for n in json.loads(capsys.readouterr().out)["notes"])
    assert load_shape(str(short_context_model)).context == 64


def test_a_tiny_model_is_not_called_0m_and_a_small_budget_not_0_gb(tiny_model_dir, tmp_path, capsys):
    """A model under 500K parameters was "0M parameters" (plan, auto's line) and "a 5.7e-05B model" (the
    learning-rate check); a budget under 0.5 GB was "nothing fits 0 GB"."""
    from sftlab.plan.auto import describe_auto
    from sftlab.plan.shapes import human_count

    params = load_shape(str(tiny_model_dir)).params
    assert params < 5e5 and human_count(params) == f"{params / 1e3:.3g}K"
    assert main(["plan", "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32",
                 "--budget-gb", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert f"{human_count(params)} parameters, 2 layers" in out and "0M" not in out
    assert "nothing fits 0.0001 GB at any length" in out
    cfg = train_config(tmp_path, tiny_model_dir, learning_rate=1.0)
    auto = dataclasses.replace(cfg, learning_rate="auto")
    assert f"table for {human_count(params)} parameters" in describe_auto(auto, cfg, n_params=params, n_examples=16)
    [f] = [x for x in checks.checklist(cfg, n_params=params, n_examples=16, seq_len=32, model_cfg=model_config(
        str(tiny_model_dir)), train_keys=set(), eval_keys=set(), report=None) if x.rule == "learning_rate"]
    assert f"for a {human_count(params)}-parameter model (full)" in f.message


def test_liger_or_flash_where_they_cannot_run_is_a_check_error_and_the_plan_command_still_runs(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    """liger_kernels/fused_loss true on a CPU: `train --check` said "configuration looks sound", then loading
    the model failed; and the plan command of its memory line (plan refuses liger on a CPU, and flash attention
    there) exited 2 instead of breaking the step down."""
    from sftlab.train import checks_model

    cfg = train_config(tmp_path, tiny_model_dir, liger_kernels=True, fused_loss=True)
    [f] = checks.kernel_findings(cfg, "cpu")
    assert f.severity == "error" and f.rule == "liger_kernels" and "need a CUDA GPU (here: cpu)" in f.message
    assert f.fixes == ["--set liger_kernels=auto --set fused_loss=auto"]
    assert checks.kernel_findings(dataclasses.replace(cfg, liger_kernels="auto", fused_loss="auto"), "cpu") == []
    monkeypatch.setattr(checks_model, "liger_available", lambda: False)
    [f] = checks.kernel_findings(dataclasses.replace(cfg, liger_kernels=False), "cuda")
    assert f.rule == "fused_loss" and "need liger-kernel" in f.message
    monkeypatch.setattr(checks_model, "liger_available", lambda: True)
    assert checks.kernel_findings(cfg, "cuda") == []
    mcfg = model_config(str(tiny_model_dir))
    flash = dataclasses.replace(cfg, attn_implementation="flash_attention_2")
    overrides = "--set liger_kernels=true --set fused_loss=true --set attn_implementation=flash_attention_2"
    command = checks.plan_command(flash, "cpu", 48).replace(
        checks.PLAN_CONFIG, f"sftlab plan --set model={tiny_model_dir} --set method=full {overrides}")
    assert _plan_json(capsys, command)["total_bytes"] == checks.step_bytes(flash, mcfg, 48, "cpu")


def test_plan_and_the_check_estimate_only_the_lora_target_modules_of_the_config(tiny_model_dir, tmp_path, capsys):
    """lora_target_modules was left out of every estimate (plan, the memory line, batch_size auto): a config
    adapting q_proj alone was estimated as adapting all seven linears, and plan's rank note named k_proj, which
    it does not adapt."""
    from sftlab.plan.auto import estimated_bytes
    from sftlab.plan.setup import ALL_LINEAR, lora_targets

    assert lora_targets("all-linear") == ALL_LINEAR and lora_targets("q_proj, v_proj,q_proj") == ("q_proj", "v_proj")
    assert lora_targets("c_attn") == ALL_LINEAR  # another architecture's names: the Llama shape stands in
    base = ["plan", "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32", "--lora-r", "40", "--json"]
    assert main([*base, "--set", "lora_target_modules=q_proj"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["trainable_params"] == 2 * 40 * (64 + 64) and not d["notes"]  # q_proj is 64 -> 64 wide
    cfg = train_config(tmp_path, tiny_model_dir, method="lora", lora_r=40, lora_target_modules="q_proj")
    mcfg = model_config(str(tiny_model_dir))
    assert d["total_bytes"] == estimated_bytes(cfg, mcfg, batch=4, seq_len=512, checkpointing=False, device="cpu",
                                               grad_accum=4)
    assert main(base) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["trainable_params"] > 2 * 40 * 128 and "k_proj's width of 32" in d["notes"][0]


def test_plan_notes_that_train_refuses_packing_with_prefix_tuning(capsys):
    assert main(["plan", "--params", "135M", "--method", "prefix", "--set", "packing=true", "--json"]) == 0
    assert any(n.startswith("packing: train refuses it with prefix tuning") for n in json.loads(
        capsys.readouterr().out)["notes"])
    assert main(["plan", "--params", "135M", "--set", "packing=true", "--json"]) == 0
    assert not any("packing" in n for n in json.loads(capsys.readouterr().out)["notes"])


def test_recommend_with_no_examples_is_not_few_shot(capsys):
    """0 examples of a moderate task got few-shot: 'put a handful of the examples in the prompt', of none."""
    assert main(["recommend", "--examples", "0", "--complexity", "complex", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["approach"] == "prompt engineering" and d["rule"] == 1 and "no labelled examples" in d["reasons"][0]
    assert main(["recommend", "--examples", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["approach"] == "few-shot"
    assert main(["recommend", "--examples", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reasons"][0].startswith("only 1 example: too few")


def test_where_the_budget_search_stops_the_plan_says_or_more():
    """A huge budget gave "largest batch: 65536" and, for a model of unknown context, "longest sequence:
    1048576": where the search stops, not what fits."""
    from sftlab.plan import TrainSetup, make_plan, render_plan, shape_from_config

    shape = shape_from_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128})
    assert shape.context == 0
    out = render_plan(make_plan(shape, TrainSetup(method="lora", device="cpu", precision="fp32", batch=1, seq_len=8),
                                budget_gb=1e9))
    assert "largest batch at 8 tokens: 65536 or more; longest sequence at batch 1: 1048576 or more" in out
    out = render_plan(make_plan(shape, TrainSetup(method="lora", device="cpu", precision="fp32", batch=4, seq_len=64),
                                budget_gb=2))
    assert "or more" not in out


def test_a_merged_micro_batch_that_does_not_fit_is_said_so_in_gb(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """plan said train "runs that: 199.87 GB" for a merged micro-batch far over the budget, which train's rule
    never merges (over 80% of the memory); and that rule's reason in train --check gave GiB beside the memory
    line's GB for the same memory (22.6 GiB there, 24.29 GB on the next line)."""
    from sftlab.train import merge

    base = ["plan", "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32", "--batch", "4",
            "--grad-accum", "4"]
    assert main([*base, "--budget-gb", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "merge_micro_batches auto: one micro-batch of 16 would need" in out and "train keeps 4 of 4" in out
    assert main([*base, "--budget-gb", "100"]) == 0
    assert "where a trial at train time measures one micro-batch of 16 faster" in capsys.readouterr().out
    assert main([*base, "--budget-gb", "100", "--set", "deepspeed=ds.json", "--json"]) == 0  # sharded: never merged
    assert json.loads(capsys.readouterr().out)["merged_total_bytes"] is None
    cfg = train_config(tmp_path, tiny_model_dir, gradient_accumulation=4, merge_micro_batches="auto")
    monkeypatch.setattr(merge, "device_memory_gb", lambda: ("cpu", 1e-3))
    monkeypatch.setattr(merge, "_cuda_available", lambda: False)
    choice = merge._preview_choice(cfg, model_config(str(tiny_model_dir)), None, seq_len=32)
    assert re.fullmatch(r"a micro-batch of 16 would need [0-9.]+ [MG]B \(over 80% of 1\.1 MB\)", choice.reason), choice.reason


def test_plan_recommends_the_learning_rate_train_chooses_for_the_configs_lora_alpha(tiny_model_dir, capsys):
    """plan's recommended learning rate used the default lora_alpha (32), not the config's: with lora_alpha 128
    train's `learning_rate: auto` chose 0.0005 and plan recommended 0.002."""
    from sftlab.plan.auto import auto_learning_rate

    assert main(["plan", "--set", f"model={tiny_model_dir}", "--set", "lora_alpha=128", "--device", "cpu",
                 "--precision", "fp32", "--batch", "4", "--grad-accum", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    params = load_shape(str(tiny_model_dir)).params
    want = auto_learning_rate(params, "lora", global_batch=8, lora_r=16, lora_alpha=128)
    assert d["recommended"]["learning_rate"] == want != auto_learning_rate(params, "lora", global_batch=8)
    assert d["setup"]["lora_alpha"] == 128
    # train's line says what the rate followed: the scale too, where it is not the table's 2
    from sftlab.config import load_config
    from sftlab.plan.auto import describe_auto

    cfg = load_config(None, {"lora_alpha": 128})
    line = describe_auto(cfg, dataclasses.replace(cfg, learning_rate=want, batch_size=4, gradient_accumulation=2),
                         n_params=params, n_examples=100)
    assert "at a global batch of 8 and a LoRA scale alpha/r of 8)" in line, line
    assert "LoRA scale" not in describe_auto(load_config(None, {}), cfg, n_params=params, n_examples=100)


def test_a_budget_below_the_fixed_memory_is_not_told_to_shard(tiny_model_dir):
    """A 0.5 GB GPU budget for a 100K-parameter model: 'shard over GPUs (FSDP/DeepSpeed ZeRO-3) or offload
    optimizer state', though the CUDA context and framework overhead alone are 0.7 GB and sharding the model
    saves nothing of them."""
    from sftlab.plan import TrainSetup, recommend_config

    shape = load_shape(str(tiny_model_dir))
    for device, what in (("cuda", "the CUDA context and framework overhead"), ("cpu", "the process baseline")):
        rec = recommend_config(shape, TrainSetup(method="lora", device=device, precision="fp32"), 0.5e9)
        assert not rec.fits and rec.notes[0].startswith(f"nothing fits 0.5 GB at any length: {what}"), rec.notes
        assert "shard" not in rec.notes[0] and rec.notes[0].endswith("give a larger budget")
    seven = load_shape("llama-2-7b")  # the weights are what does not fit: sharding is the advice
    rec = recommend_config(seven, TrainSetup(method="full", device="cuda", seq_len=512), 2e9)
    assert not rec.fits and "shard over GPUs" in rec.notes[0]


def test_plan_shows_liger_s_estimate_only_where_train_may_turn_it_on(tmp_path, capsys):
    """--no-liger, or a config with liger_kernels and fused_loss false, still got 'with liger-kernel, where
    train's trials turn its kernels and fused loss on: ...', which train then never does."""
    for extra in (["--no-liger"], ["--set", "liger_kernels=false", "--set", "fused_loss=false"]):
        assert main(["plan", "--params", "135M", *extra, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["liger_total_bytes"] is None, extra
    for extra in ([], ["--set", "liger_kernels=false"]):  # fused_loss auto: its trial may still turn it on
        assert main(["plan", "--params", "135M", *extra, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["liger_total_bytes"] > 0, extra


def test_prefix_tuning_is_never_checkpointed(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Prefix tuning with gradient checkpointing: train --check said the configuration looked sound and the
    run died at its first step with a RuntimeError traceback (transformers drops a checkpointed layer's cache,
    the prefix's keys and values, while the mask still counts them); `gradient_checkpointing: auto` turned it
    on where memory was short, the memory check advised it, and plan recommended it."""
    from sftlab.plan import TrainSetup, recommend_config
    from sftlab.plan import auto as auto_mod

    cfg = train_config(tmp_path, tiny_model_dir, method="prefix", gradient_checkpointing=True)
    mcfg = model_config(str(tiny_model_dir))
    [f] = checks.method_findings(cfg, mcfg)
    assert f.severity == "error" and f.rule == "gradient_checkpointing" and "prefix tuning" in f.message
    # the run itself: one error line before any step, not a traceback
    argv = ["train", "--model", str(tiny_model_dir), "--data", cfg.data, "--output-dir", str(tmp_path / "r"),
            "--method", "prefix", "--set", "gradient_checkpointing=true", "--set", "precision=fp32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "gradient checkpointing does not work with prefix tuning" in err and "Traceback" not in err
    # auto leaves it off where memory is short, and the memory check does not advise it
    monkeypatch.setattr(auto_mod, "device_memory_gb", lambda: ("cpu", 1e-3))
    auto = dataclasses.replace(cfg, gradient_checkpointing="auto")
    rc = auto_mod.resolve_auto(auto, n_params=1e5, n_examples=16, model_cfg=mcfg, seq_len=32)
    assert rc.gradient_checkpointing is False
    assert auto_mod.resolve_auto(dataclasses.replace(auto, method="lora"), n_params=1e5, n_examples=16,
                                 model_cfg=mcfg, seq_len=32).gradient_checkpointing is True
    monkeypatch.setattr(checks, "device_memory_gb", lambda: ("cpu", 1e-3))
    [f] = checks.memory_findings(rc, mcfg, 32)
    assert not any("gradient_checkpointing" in x for x in f.fixes), f.fixes
    # plan: never recommends it for prefix, and notes it where asked for
    shape = load_shape(str(tiny_model_dir))
    for budget in (1e9, 0.72e9, 0.1e9):
        rec = recommend_config(shape, TrainSetup(method="prefix", device="cuda", batch=16, seq_len=256), budget)
        assert rec.gradient_checkpointing is False and "checkpointing" not in " ".join(rec.notes), rec
    assert main(["plan", "--model", str(tiny_model_dir), "--method", "prefix", "--gradient-checkpointing", "--json"]) == 0
    assert any("does not work with prefix tuning" in n for n in json.loads(capsys.readouterr().out)["notes"])


def test_the_context_check_reads_positions_as_the_model_and_the_packer_use_them(tiny_model_dir, tmp_path):
    """Packed rows restart positions at each example (a 100-token row of two 40-token examples stays within a
    context of 48), which the check called past the context; and past a GPT-2's learned positions (prefix
    tuning's virtual tokens included) the run fails with an IndexError, which the check called a warning."""
    from transformers import GPT2Config

    gpt2 = GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=2, n_positions=48)
    cfg = train_config(tmp_path, tiny_model_dir, max_seq_length=100, packing=True)
    keys = {tuple(range(40)), tuple(range(30))}
    common = dict(n_params=1e5, n_examples=2, model_cfg=gpt2, train_keys=keys, eval_keys=set(), report=None)
    assert "max_seq_length" not in {f.rule for f in checks.checklist(cfg, seq_len=100, **common)}
    [f] = [f for f in checks.checklist(cfg, seq_len=100, **{**common, "train_keys": {tuple(range(60))}})
           if f.rule == "max_seq_length"]
    assert f.message.startswith("examples (packed: positions restart at each) of up to 60 tokens are longer than")
    assert f.severity == "error" and "its positions are learned" in f.message and f.fixes == ["--set max_seq_length=48"]
    prefix = dataclasses.replace(cfg, packing=False, method="prefix", prefix_tokens=20)
    [f] = checks.context_findings(prefix, gpt2, 40)
    assert f.severity == "error" and "40 tokens after 20 virtual tokens" in f.message
    [f] = checks.context_findings(prefix, model_config(str(tiny_model_dir)), 500)  # rotary (Llama): a warning
    assert f.severity == "warning"


def test_a_run_past_learned_positions_stops_with_the_checks_line_not_an_index_error(tiny_model_dir, tmp_path):
    """`train --check` called rows past a GPT-2's learned positions an error, but a plain train went on and
    crashed at its first step with an IndexError traceback (the position embedding has no row for them)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=16)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = train_config(tmp_path, tiny_model_dir, model=str(model_dir), max_steps=1)
    with pytest.raises(SftlabError, match="positions are learned") as e:
        train(cfg, quiet=True)
    assert e.value.hint == "--set max_seq_length=16"


def test_plan_of_packed_rows_past_the_context_says_only_long_examples_pass_it(tiny_model_dir, capsys):
    assert main(["plan", "--model", str(tiny_model_dir), "--set", "packing=true", "--seq-len", "1024", "--json"]) == 0
    [note] = [n for n in json.loads(capsys.readouterr().out)["notes"] if "context" in n]
    assert note.startswith("note: packed rows of 1024 tokens: positions restart at each example") and \
        note.endswith("--set max_seq_length=512 keeps every example within it")
