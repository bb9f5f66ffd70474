"""train(cfg) on a tiny model: methods, invariants, resume, signals, divergence, forgetting tools."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import chat_data, train_config
from safetensors.torch import load_file
from transformers import TrainerCallback

from sftlab import rundir as A
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.rundir import RunDir
from sftlab.train.run import train

pytestmark = pytest.mark.xdist_group("train")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_batch8_equals_batch2_with_accumulation4(tmp_path, tiny_model_dir, method):
    """The same step three ways: one micro-batch of 8, 4 accumulated micro-batches of 2, and those 4 merged
    into one (merge_micro_batches); for a full fine-tune and for LoRA (its adapter weights)."""
    common = dict(optimizer="sgd", max_steps=2, learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0, method=method)
    shapes = {"a": dict(batch_size=8, gradient_accumulation=1),
              "b": dict(batch_size=2, gradient_accumulation=4, merge_micro_batches=False),  # really 4 micro-batches
              "c": dict(batch_size=2, gradient_accumulation=4, merge_micro_batches=True)}
    summaries = {k: train(train_config(tmp_path / k, tiny_model_dir, **kw, **common), quiet=True) for k, kw in shapes.items()}
    assert summaries["c"]["merge"]["enabled"] and not summaries["b"]["merge"]["enabled"]
    losses = {k: [r["loss"] for r in RunDir(tmp_path / k / "run").metrics() if r["split"] == "train"] for k in shapes}
    file = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    weights = {k: load_file(str(tmp_path / k / "run" / A.MODEL_DIR / file)) for k in shapes}
    assert len(losses["a"]) == 2
    for k in "bc":
        assert losses["a"] == pytest.approx(losses[k], abs=1e-5), k
        assert weights[k].keys() == weights["a"].keys()
        for name in weights["a"]:
            assert torch.allclose(weights["a"][name], weights[k][name], atol=1e-5), (k, name)
        assert summaries[k]["trained_tokens"] == summaries["a"]["trained_tokens"]
    base = load_file(str(tiny_model_dir / "model.safetensors"))  # the steps trained (equal weights prove something)
    trained = [n for n, w in weights["a"].items() if ("lora_B" in n and w.abs().sum() > 0) or
               (n in base and not torch.equal(base[n], w))]
    assert trained


@pytest.mark.parametrize("method", ["full", "lora", "prefix", "qlora"])
def test_each_method_trains_and_saves(tmp_path, tiny_model_dir, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = train_config(tmp_path, tiny_model_dir, method=method, max_steps=3, learning_rate=1e-2, precision="fp32")
    summary = train(cfg, quiet=True)
    run = tmp_path / "run"
    assert summary["stopped"] == "completed" and summary["steps"] == 3
    files = {p.name for p in (run / A.MODEL_DIR).iterdir()}
    if method == "full":
        assert "model.safetensors" in files
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickles shipped
    tok_cfg = json.loads((run / A.MODEL_DIR / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template") or (run / A.MODEL_DIR / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    losses = [r["loss"] for r in RunDir(run).metrics() if r["split"] == "train"]
    assert len(losses) == 3 and all(l == l for l in losses)
    saved = yaml_load(run / A.CONFIG)
    assert saved["method"] == method and saved["learning_rate"] == 1e-2
    assert RunDir(run).summary().to_dict() == json.loads(json.dumps(summary))
    assert summary["eos_trained"] is True and summary["precision"] == "fp32"
    assert summary["prepare"]["n_reply_ends"] == summary["prepare"]["n_reply_ends_trained"] == 16


def test_qlora_without_bitsandbytes_is_one_error_line_and_no_run_folder(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import sftlab.qlora

    monkeypatch.setattr(sftlab.qlora, "bitsandbytes_version", lambda: None)
    cfg = train_config(tmp_path, tiny_model_dir)
    argv = ["train", "--model", str(tiny_model_dir), "--data", cfg.data, "--output-dir", cfg.output_dir,
            "--method", "qlora", "--set", "max_steps=1"]
    for extra in ([], ["--check"]):
        capsys.readouterr()
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs bitsandbytes" in err and "--method lora" in err, err
    assert not Path(cfg.output_dir).exists()


def test_saved_model_and_checkpoints_are_readable_by_others(tmp_path, tiny_model_dir):
    umask = os.umask(0)
    os.umask(umask)
    train(train_config(tmp_path, tiny_model_dir, max_steps=1, save_steps=1), quiet=True)
    run = tmp_path / "run"
    paths = [p for p in (run / A.MODEL_DIR, run / A.CHECKPOINTS) for p in (p, *p.rglob("*"))]
    assert any(p.name == "model.safetensors" for p in paths) and any(p.name.startswith("checkpoint-") for p in paths)
    assert {str(p): os.stat(p).st_mode & 0o777 for p in paths} == {
        str(p): (0o777 if p.is_dir() else 0o666) & ~umask for p in paths}


def yaml_load(p):
    import yaml

    return yaml.safe_load(Path(p).read_text())


def test_lora_run_reloads_with_the_same_logits(tmp_path, tiny_model_dir):
    cfg = train_config(tmp_path, tiny_model_dir, method="lora", max_steps=2, learning_rate=5e-2)
    train(cfg, quiet=True)
    model, tok, _ = RunDir(tmp_path / "run").load_model()
    ids = tok("<|im_start|>user\nhi<|im_end|>\n", return_tensors="pt")["input_ids"]
    from sftlab.models import load_model

    base = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)  # the adapter is applied


def test_loss_variants_and_weights_run(tmp_path, tiny_model_dir):
    p = tmp_path / "w.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}", "weight": 0.5 + i % 2}) + "\n" for i in range(8)))
    s = train(train_config(tmp_path, tiny_model_dir, data=str(p), loss="sequence", label_smoothing=0.1, max_steps=2), quiet=True)
    assert s["stopped"] == "completed"


def test_replay_mixing_count_and_ewc(tmp_path, tiny_model_dir):
    from sftlab.train.continual import replay_count

    assert replay_count(100, 0.2) == 25 and replay_count(30, 0.5) == 30 and replay_count(10, 0.0) == 0
    general = chat_data(tmp_path / "general.jsonl", 6, offset=100)
    s = train(train_config(tmp_path, tiny_model_dir, replay_data=general, replay_ratio=0.2, ewc_lambda=10.0, ewc_samples=4,
                   max_steps=2), quiet=True)
    assert s["replay_examples"] == 4 and s["examples"] == 16


def test_ewc_penalty_is_logged_beside_the_task_loss_once_per_step(tmp_path, tiny_model_dir, monkeypatch):
    """The logged `loss` held the penalty (a run at a strong ewc_lambda logged 4x its first loss, which
    `diagnose` called divergence); and each micro-batch added penalty / gradient_accumulation, so a step
    with fewer micro-batches (an epoch's last) got only part of it. 8 micro-batches of 2 at accumulation
    3: steps of 3, 3 and 2."""
    from sftlab.train.continual import EWC

    seen = []
    real = EWC.penalty
    monkeypatch.setattr(EWC, "penalty", lambda self, model: seen.append(float(p := real(self, model))) or p)
    general = chat_data(tmp_path / "general.jsonl", 6, offset=100)
    kw = dict(batch_size=2, gradient_accumulation=3, merge_micro_batches=False, learning_rate=5e-2, optimizer="sgd",
              replay_data=general, ewc_samples=4)
    train(train_config(tmp_path / "plain", tiny_model_dir, **kw), quiet=True)
    plain = [r for r in RunDir(tmp_path / "plain" / "run").metrics() if r["split"] == "train"]
    assert seen == [] and all("ewc_penalty" not in r for r in plain)
    train(train_config(tmp_path / "ewc", tiny_model_dir, ewc_lambda=1e4, **kw), quiet=True)
    rows = [r for r in RunDir(tmp_path / "ewc" / "run").metrics() if r["split"] == "train"]
    assert len(seen) == 8 and len(rows) == 3
    per_step = [seen[0], seen[3], seen[6]]  # every micro-batch of a step sees the same weights
    assert seen[:3] == [per_step[0]] * 3 and seen[3:6] == [per_step[1]] * 3 and seen[6:] == [per_step[2]] * 2
    assert [r["ewc_penalty"] for r in rows] == pytest.approx(per_step, rel=1e-5)
    assert per_step[0] == 0.0 and per_step[1] > 0 and per_step[2] > 0  # at the anchor, then away from it
    assert rows[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)  # the task loss, without the penalty
    assert all(r["loss"] < 7.0 for r in rows)


def test_ewc_penalty_pulls_towards_the_anchor():
    from sftlab.train.continual import EWC

    model = torch.nn.Linear(3, 1)
    x = torch.randn(8, 3)

    def loss_fn(m, batch):
        return (m(batch) ** 2).mean()

    ewc = EWC(model, [x], loss_fn, lam=2.0)
    assert float(ewc.penalty(model)) == 0.0
    with torch.no_grad():
        model.weight += 1.0
    pen = ewc.penalty(model)
    expected = 0.5 * 2.0 * (ewc.fisher["weight"] * 1.0).sum()
    assert torch.allclose(pen, expected) and float(pen) > 0


def test_ewc_penalty_keeps_no_copy_of_the_parameters_and_has_autograd_gradient():
    from sftlab.train.continual import EWC

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 1))
    ewc = EWC(model, [torch.randn(8, 5)], lambda m, b: (m(b) ** 2).mean(), lam=3.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    own = {t.data_ptr() for t in [*model.parameters(), *ewc.fisher.values(), *ewc.anchor.values()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pen = ewc.penalty(model)
    assert saved and all(t.data_ptr() in own for t in saved)  # nothing param-sized of its own lives to backward
    pen.backward()
    expected = 0.5 * 3.0 * sum((ewc.fisher[n] * (p - ewc.anchor[n]) ** 2).sum() for n, p in model.named_parameters())
    assert torch.allclose(pen, expected)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, 3.0 * ewc.fisher[n] * (p.detach() - ewc.anchor[n]))


class _SignalAt(TrainerCallback):
    def __init__(self, step, sig):
        self.step, self.sig = step, sig

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step - 1:  # arrives while step `self.step` runs
            os.kill(os.getpid(), self.sig)


def test_sigterm_saves_checkpoint_and_resume_continues_the_same_curve(tmp_path, tiny_model_dir):
    kw = dict(max_steps=4, save_steps=100, learning_rate=1e-2, optimizer="adamw", lr_scheduler="cosine", warmup_ratio=0.25)
    train(train_config(tmp_path / "ref", tiny_model_dir, **kw), quiet=True)
    ref_losses = [r["loss"] for r in RunDir(tmp_path / "ref" / "run").metrics() if r["split"] == "train"]
    cfg = train_config(tmp_path / "cut", tiny_model_dir, **kw)
    s = train(cfg, quiet=True, callbacks=[_SignalAt(2, signal.SIGTERM)])
    assert s["stopped"] == "interrupted" and s["steps"] == 2
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "run" / A.CHECKPOINTS).iterdir())
    assert ckpts == ["checkpoint-2"]  # complete, and no staging folder left behind
    s2 = train(load_config(None, {**cfg.to_dict(), "resume": True}), quiet=True)
    assert s2["stopped"] == "completed" and s2["steps"] == 4
    losses = [r["loss"] for r in RunDir(tmp_path / "cut" / "run").metrics() if r["split"] == "train"]
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_nan_loss_stops_with_a_diagnosis(tmp_path, tiny_model_dir, capsys):
    cfg = train_config(tmp_path, tiny_model_dir)
    code = main(["train", "--model", str(tiny_model_dir), "--data", cfg.data, "--output-dir", str(tmp_path / "run"),
                 "--method", "full", "--set", "optimizer=sgd", "--set", "learning_rate=1e12", "--set", "max_grad_norm=0",
                 "--set", "max_steps=6", "--set", "batch_size=4", "--set", "gradient_accumulation=1",
                 "--set", "precision=fp32", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged" in err and "lower the learning rate" in err
    summary = RunDir(tmp_path / "run").summary().to_dict()
    assert summary["stopped"] == "diverged" and summary["divergence"]["step"] >= 1


def test_check_flags_bad_configuration(tmp_path, tiny_model_dir, capsys):
    """check_only returns the findings as data and prints nothing (the CLI decides how to show them)."""
    data = chat_data(tmp_path / "d.jsonl", 16)
    cfg = train_config(tmp_path, tiny_model_dir, data=data, eval_data=data, learning_rate=1.0, weight_decay=0.5,
               gradient_accumulation=64)
    result = train(cfg, check_only=True)
    assert capsys.readouterr().out == ""
    findings = result["findings"]
    assert set(findings[0]) == {"rule", "severity", "message", "where", "evidence", "fixes", "data"}
    messages = " | ".join(f["message"] for f in findings)
    assert "learning rate 1 is outside the usual range" in messages
    lr_fixes = next(f["fixes"] for f in findings if f["rule"] == "learning_rate")
    assert lr_fixes[0].startswith("--set learning_rate=") and "--find-lr" in lr_fixes[1]
    assert "weight decay 0.5 is high" in messages
    assert "eval data is identical to the training data" in messages
    assert "global batch 256 is implausible" in messages
    assert result["resolved"]["learning_rate"] == 1.0 and json.loads(json.dumps(result)) == result
    code = main(["train", "--model", str(tiny_model_dir), "--data", data, "--eval-data", data, "--check",
                 "--set", "learning_rate=1.0", "--set", "weight_decay=0.5", "--set", "gradient_accumulation=64"])
    assert code == 2  # an error among the findings


@pytest.mark.parametrize("batch, accum", [(16, 1), (16, 2), (4, 4)])
def test_the_global_batch_fix_clears_the_warning(tmp_path, tiny_model_dir, batch, accum):
    """Its fix was always a gradient_accumulation: "--set gradient_accumulation=1" for a run at 1 already
    (a saved config of a merged run is batch 16 x 1), which changed nothing."""
    cfg = train_config(tmp_path, tiny_model_dir, batch_size=batch, gradient_accumulation=accum)  # 16 examples
    found = [f for f in train(cfg, check_only=True)["findings"] if f["rule"] == "global_batch"]
    assert len(found) == 1
    fixed = {k: v for k, v in (a.split("=") for a in found[0]["fixes"][0].split() if "=" in a)}
    assert fixed != {"gradient_accumulation": str(accum)}
    again = load_config(None, {**cfg.to_dict(), **fixed})
    assert [f for f in train(again, check_only=True)["findings"] if f["rule"] == "global_batch"] == []


def test_max_steps_past_the_epochs_says_it_overrides_them(tmp_path, tiny_model_dir):
    """epochs 1 with max_steps 12 on 16 examples at batch 4 trained 3 epochs, and nothing said that epochs was
    no limit beside max_steps."""
    cfg = train_config(tmp_path, tiny_model_dir, epochs=1, max_steps=12, batch_size=4)
    found = [f for f in train(cfg, check_only=True)["findings"] if f["rule"] == "max_steps"]
    assert [f["message"] for f in found] == ["max_steps 12 runs past epochs 1 (4 steps): the run trains 3 epochs, "
                                             "as max_steps overrides epochs"]
    assert found[0]["severity"] == "info" and found[0]["fixes"] == ["--set max_steps=-1 to train 1 epoch, or --set max_steps=4"]
    assert train(cfg, quiet=True)["epochs"] == 3.0
    within = train_config(tmp_path / "b", tiny_model_dir, epochs=1, max_steps=3, batch_size=4)
    assert not [f for f in train(within, check_only=True)["findings"] if f["rule"] == "max_steps"]


def test_normal_run_prints_the_checklist_unless_quiet(tmp_path, tiny_model_dir, capsys):
    train(train_config(tmp_path / "loud", tiny_model_dir, max_steps=1, learning_rate=1.0))
    assert "check warning: learning rate 1 is outside the usual range" in capsys.readouterr().out
    train(train_config(tmp_path / "quiet", tiny_model_dir, max_steps=1, learning_rate=1.0), quiet=True)
    assert "check" not in capsys.readouterr().out


def test_unknown_config_key_is_one_line(tmp_path, tiny_model_dir, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("model: x\nlearning_rat: 0.1\n")
    assert main(["train", str(cfgfile)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rat'" in err and "did you mean 'learning_rate'" in err and err.count("\n") == 1


def test_auto_values_follow_model_and_data_size(monkeypatch, tiny_model_dir):
    from sftlab.models import model_config
    from sftlab.plan import auto

    assert auto.lr_for_size(1e9, "full") == 2e-5 and auto.lr_for_size(7e9, "full") == 2e-5
    assert auto.lr_for_size(13e9, "full") == 1e-5 and auto.lr_for_size(70e9, "full") == 5e-6
    assert [auto.epochs_for_data(n) for n in (999, 9999, 10000)] == [5, 3, 1]
    assert auto.batch_for_memory(80) == (4, 4) and auto.batch_for_memory(40) == (2, 8)
    assert auto.batch_for_memory(24) == (1, 16) and auto.batch_for_memory(None) == (1, 16)
    cfg = load_config(None, {"model": str(tiny_model_dir), "learning_rate": "auto", "epochs": "auto",
                             "gradient_checkpointing": "auto", "batch_size": 4})
    mcfg = model_config(str(tiny_model_dir))
    monkeypatch.setattr(auto, "device_memory_gb", lambda: ("cpu", 64.0))
    roomy = auto.resolve_auto(cfg, n_params=10**6, n_examples=500, model_cfg=mcfg, seq_len=128)
    # LoRA under 0.5B: 2e-3 at a global batch of 8; this config's 4 x 4 = 16 takes sqrt(2) more
    assert roomy.learning_rate == 2.83e-3 and roomy.epochs == 5 and roomy.gradient_checkpointing is False
    monkeypatch.setattr(auto, "device_memory_gb", lambda: ("cpu", 0.001))  # would not fit: checkpoint
    tight = auto.resolve_auto(cfg, n_params=10**6, n_examples=500, model_cfg=mcfg, seq_len=128)
    assert tight.gradient_checkpointing is True


def test_a_mixtures_relative_paths_are_saved_absolute(monkeypatch, tmp_path, tiny_model_dir):
    """The run's config names a mixture's sources from anywhere, as it does one data file: eval, report and
    resume of a run read from another folder did not find `data: [a.jsonl, {path: b.jsonl, weight: 2}]`."""
    from sftlab.models import model_config
    from sftlab.plan import auto

    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("{}\n")
    cfg = load_config(None, {"model": str(tiny_model_dir), "data": ["a.jsonl", {"path": "b.jsonl", "weight": 2}],
                             "eval_data": ["a.jsonl", "gone.jsonl"], "batch_size": 4})
    rc = auto.resolve_auto(cfg, n_params=10**6, n_examples=100, model_cfg=model_config(str(tiny_model_dir)), seq_len=64)
    assert rc.data == [str(tmp_path / "a.jsonl"), {"path": str(tmp_path / "b.jsonl"), "weight": 2}]
    assert rc.eval_data == [str(tmp_path / "a.jsonl"), "gone.jsonl"]  # what is not here stays as written
    assert cfg.data[0] == "a.jsonl"  # the config itself is not changed


def test_auto_batch_follows_the_model_memory_estimate(monkeypatch, tiny_model_dir):
    """`batch_size: auto` is the largest micro-batch whose estimate for this model and these rows fits
    90% of the memory (not a table by GPU size), accumulation makes a global batch of 16, and a value
    the config sets is kept."""
    from sftlab.models import model_config
    from sftlab.plan import auto

    mcfg = model_config(str(tiny_model_dir))
    cfg = load_config(None, {"model": str(tiny_model_dir), "batch_size": "auto", "gradient_accumulation": "auto",
                             "precision": "fp32", "gradient_checkpointing": False})

    def need(b, seq=256, accum=1):
        return auto.estimated_bytes(cfg, mcfg, batch=b, seq_len=seq, checkpointing=False, device="cuda", grad_accum=accum)

    assert need(16) > need(8) > need(4)
    between = (need(8) + need(16)) / 2 / 0.9 / 2**30  # room for 8 rows, not 16
    assert auto.auto_batch(cfg, mcfg, seq_len=256, device="cuda", mem_gb=between)[:2] == (8, 2)
    assert auto.auto_batch(cfg, mcfg, seq_len=256, device="cuda", mem_gb=1000)[:2] == (16, 1)
    assert auto.auto_batch(cfg, mcfg, seq_len=256, device="cuda", mem_gb=1e-6)[:2] == (1, 16)
    # longer rows need more memory: the same budget takes fewer of them
    assert auto.auto_batch(cfg, mcfg, seq_len=1024, device="cuda", mem_gb=between)[0] < 8
    # on a CPU at most 4 rows (merge_micro_batches measures whether more pay); why names the memory
    micro, accum, why = auto.auto_batch(cfg, mcfg, seq_len=256, device="cpu", mem_gb=1000)
    assert (micro, accum) == (4, 4) and "free RAM" in why and "at most 4" in why
    assert "fits 90% of 1073.74 GB of free RAM" in why  # GB as the memory line says it (1000 GiB is not "1000 GB")
    fixed = dataclasses.replace(cfg, gradient_accumulation=2)
    assert auto.auto_batch(fixed, mcfg, seq_len=256, device="cuda", mem_gb=1000)[:2] == (16, 2)
    fixed = dataclasses.replace(cfg, batch_size=3)
    assert auto.auto_batch(fixed, mcfg, seq_len=256, device="cuda", mem_gb=1000)[:2] == (3, 6)
    # small data: the global batch the checklist finds plausible (at most a quarter of the examples, 8 at least)
    assert auto.auto_batch(cfg, mcfg, seq_len=256, device="cuda", mem_gb=1000, n_examples=40)[:2] == (8, 1)
    assert auto.auto_batch(cfg, mcfg, seq_len=256, device="cpu", mem_gb=1000, n_examples=48)[:2] == (4, 3)
    assert auto.auto_batch(cfg, mcfg, seq_len=256, device="cpu", mem_gb=1000, n_examples=5000)[:2] == (4, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")  # four processes of 4 rows each are already 16
    assert auto.auto_batch(cfg, mcfg, seq_len=256, device="cpu", mem_gb=1000)[:2] == (4, 1)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(auto, "device_memory_gb", lambda: ("cuda", between))
    monkeypatch.setattr(auto, "resolve_precision", lambda *a: ("fp32", None))
    notes: dict = {}
    rc = auto.resolve_auto(cfg, n_params=10**6, n_examples=500, model_cfg=mcfg, seq_len=256, notes=notes)
    assert (rc.batch_size, rc.gradient_accumulation) == (8, 2)
    line = auto.describe_auto(cfg, rc, n_params=10**6, n_examples=500, batch=notes["batch_size"])
    assert "batch_size 8 (the largest micro-batch of 256-token rows" in line and "gradient_accumulation 2 (a global batch of about 16)" in line


def test_bf16_mixed_precision_trains_on_this_cpu(tmp_path, tiny_model_dir):
    """bf16 autocast trains on this CPU; `precision: auto` picks what the probe measured faster."""

    s = train(train_config(tmp_path, tiny_model_dir, method="lora", precision="bf16", max_steps=2, learning_rate=1e-2), quiet=True)
    rows = [r for r in RunDir(tmp_path / "run").metrics() if r["split"] == "train"]
    assert s["stopped"] == "completed" and all(r["loss"] == r["loss"] for r in rows)
    saved = yaml_load(tmp_path / "run" / A.CONFIG)
    assert saved["precision"] == "bf16"
    auto = train(train_config(tmp_path / "auto", tiny_model_dir, precision="auto", max_steps=1), check_only=True, quiet=True)
    probe = auto["precision_probe"]
    assert auto["resolved"]["precision"] == ("bf16" if probe["bf16_ms"] <= 0.95 * probe["fp32_ms"] else "fp32")


def test_lora_under_autocast_skips_peft_input_casts_with_the_same_loss_and_grads(tiny_model_dir):
    """Under autocast the adapters take their input as it is (no fp32 round trip): the same loss and
    gradients as peft's casting path; outside autocast peft's cast still runs. (What the skipped casts
    save is measured in tests/plan: test_lora_activation_count_matches_saved_tensors.)"""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from sftlab.config import Config
    from sftlab.models import load_tokenizer
    from sftlab.train.model import build_model

    tok = load_tokenizer(str(tiny_model_dir))
    model, loss_fn = build_model(Config(model=str(tiny_model_dir), precision="bf16"), tok, [])
    for m in model.modules():  # peft's own forward, where the casts are (the fused one has none)
        if isinstance(m, LoraLinear):
            m.__class__ = LoraLinear
    flags = [m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert len(flags) == 14 and all(bool(f) for f in flags)  # 2 layers x 7 linears; outside autocast: cast
    for m in model.modules():  # the adapters start at zero: give B weights so the adapter path counts
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    ids = torch.randint(3, len(tok), (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def run(skip: bool):
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = flags[0] if skip else True
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not flags[0]  # under autocast: no cast
            loss = loss_fn(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss), grads

    skipped, cast = run(True), run(False)
    assert skipped[0] == cast[0] and skipped[1].keys() == cast[1].keys() and len(skipped[1]) == 28
    assert all(torch.equal(skipped[1][n], cast[1][n]) for n in cast[1])
    with torch.no_grad():  # bf16 base, fp32 adapters, no autocast: peft's own cast keeps the dtypes apart
        assert model(input_ids=ids).logits.shape == (2, 24, len(tok))


def test_summary_reports_the_end_of_turn_tokens_trained(tmp_path):
    """A Cohere2-style template ends replies with `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`: the label rule
    trains both (the model emits both at inference), and summary.json says every reply end is trained."""
    from conftest import COHERE_LIKE, build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|START_OF_TURN_TOKEN|>", "<|END_RESPONSE|>",
                                                         "<|END_OF_TURN_TOKEN|>"]})
    tok.eos_token = "<|END_OF_TURN_TOKEN|>"
    tok.chat_template = COHERE_LIKE
    model_dir = tmp_path / "cohere_like"
    build_tiny_model(len(tok)).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    summary = train(train_config(tmp_path, model_dir, max_steps=1), quiet=True)
    assert summary["eos_trained"] is True and summary["prepare"]["eos_trained"] is True
    prep = summary["prepare"]
    assert prep["n_reply_ends"] == prep["n_reply_ends_trained"] > 0
    assert RunDir(tmp_path / "run").summary().eos_trained is True


def test_trainer_skips_its_per_micro_step_walks_but_not_a_module_left_in_eval(monkeypatch, tmp_path, tiny_model_dir):
    """Trainer calls model.train() and counts the parameters on every micro-step; sftlab skips the
    first while every module is training (a module set to eval still gets the real call) and counts
    the parameters once, with the same FLOP total."""
    from transformers import PreTrainedModel

    from sftlab.train.trainer import SftlabTrainer

    calls = {"train": 0, "count": 0}
    real_train, real_count = PreTrainedModel.train, PreTrainedModel.num_parameters
    monkeypatch.setattr(PreTrainedModel, "train", lambda self, mode=True: calls.__setitem__("train", calls["train"] + 1) or real_train(self, mode))
    monkeypatch.setattr(PreTrainedModel, "num_parameters", lambda self, *a, **k: calls.__setitem__("count", calls["count"] + 1) or real_count(self, *a, **k))
    tokens, modes = [], []
    step = SftlabTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens.append(inputs["input_ids"].numel())
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(SftlabTrainer, "training_step", training_step)

    class EvalOneLayer(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            layer = model.model.layers[0]
            if state.global_step == 2:
                layer.eval()  # as a callback might; the next micro-step must train it again
            if not getattr(layer, "_hooked", False):
                layer.register_forward_hook(lambda m, *a: modes.append(m.training))
                layer._hooked = True

        def on_train_end(self, args, state, control, **kw):
            calls["flos"] = state.total_flos

    cfg = train_config(tmp_path, tiny_model_dir, max_steps=4, batch_size=2, gradient_accumulation=2,
                       merge_micro_batches=False)
    calls_before = dict(calls)
    train(cfg, quiet=True, callbacks=[EvalOneLayer()])
    assert len(tokens) == 8 and modes[:8] == [True] * 8  # the layer trained in every micro-step
    # Trainer alone: one root call per micro-step (8) plus the nested LlamaModel's (8 more).
    assert calls["train"] - calls_before["train"] <= 2 + 2 + 2  # set-up, the step-2 layer fix, the end
    from sftlab.models import load_model

    n = load_model(str(tiny_model_dir)).num_parameters(exclude_embeddings=True)
    assert calls["flos"] == 6 * sum(tokens) * n


def test_warmup_is_counted_as_transformers_counts_it(tmp_path, tiny_model_dir):
    """ceil(total x warmup_ratio) steps, not int(): the checklist names the warmup the run really has, and
    the warning says the first step trains at lr 0."""
    from transformers import TrainingArguments

    from sftlab.train.checks import warmup_findings, warmup_steps

    for ratio, total in ((0.1, 2), (0.1, 30), (0.25, 4), (0.05, 1000), (0.0, 5)):
        cfg = load_config(None, {"warmup_ratio": ratio, "lr_scheduler": "linear"})
        args = TrainingArguments(output_dir=str(tmp_path / "a"), warmup_steps=ratio, report_to=[])
        assert warmup_steps(cfg, total) == args.get_warmup_steps(total), (ratio, total)
    assert warmup_steps(load_config(None, {"warmup_ratio": 0.1, "lr_scheduler": "constant"}), 2) == 0
    assert warmup_findings(load_config(None, {"warmup_ratio": 0.0}), 2) == []  # a short run alone is fine
    assert warmup_findings(load_config(None, {"warmup_ratio": 0.1}), 10) == []  # 1 step of 10
    assert warmup_findings(load_config(None, {"warmup_ratio": 0.1, "resume": True}), 2) == []  # warned at the start
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=2, warmup_ratio=0.1, lr_scheduler="linear")
    found = [f["message"] for f in train(cfg, check_only=True)["findings"] if f["rule"] == "warmup"]
    assert found == ["warmup (1 of 2 steps) is 50% of the run, and step 1 trains at lr 0"]
    train(cfg, quiet=True)
    assert [r["learning_rate"] for r in RunDir(tmp_path / "run").metrics() if r["split"] == "train"][0] == 0.0
    whole = warmup_findings(load_config(None, {"warmup_ratio": 0.5}), 1)[0].message
    assert whole == "warmup (1 of 1 steps) lasts the whole run: the learning rate never reaches its peak, and step 1 " \
                    "trains at lr 0"


def test_a_run_shorter_than_logging_steps_still_logs_its_last_step(tmp_path, tiny_model_dir):
    """No eval data and logging_steps 10 > 2 steps: the last step's train row is logged, so metrics.jsonl
    exists and diagnose and report read the run (they refused it as unfinished)."""
    from sftlab.diagnose import diagnose
    from sftlab.report import write_report

    s = train(train_config(tmp_path, tiny_model_dir, max_steps=2, logging_steps=10), quiet=True)
    rows = RunDir(tmp_path / "run").metrics()
    assert [(r["split"], r["step"]) for r in rows] == [("train", 2)]
    assert s["final_train_loss"] == rows[0]["loss"]
    diagnose(tmp_path / "run")
    assert Path(write_report(tmp_path / "run", doctor=False)["path"]).exists()
    train(train_config(tmp_path / "every", tiny_model_dir, max_steps=2, logging_steps=1), quiet=True)
    assert [r["step"] for r in RunDir(tmp_path / "every" / "run").metrics()] == [1, 2]  # the last one once


def _fresh_prefix_reads_its_seed(tmp_path, model_dir):
    """(model, data, seed) of a fresh 7-token prefix model, after checking that its logits on an example are the
    base model's reading the seed text first."""
    from sftlab.train.model import build_model, prefix_seed_ids
    from sftlab.train.run import load_data

    cfg = train_config(tmp_path, model_dir, method="prefix", prefix_tokens=7)
    data = load_data(cfg)
    model, _ = build_model(cfg, data.tok, [], template=data.train.template)
    model.eval()
    seed = prefix_seed_ids(data.tok, data.train.template, 7)
    ids = torch.tensor([data.train.examples[0].input_ids])
    with torch.no_grad():
        prefixed = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        with model.disable_adapter():
            reading = model(input_ids=torch.cat([torch.tensor([seed]), ids], 1)).logits[0, len(seed):]
    assert torch.allclose(prefixed, reading, atol=1e-4)
    return model, data, seed


def test_a_fresh_prefix_is_the_base_model_reading_a_short_chat_first(tmp_path, tiny_model_dir):
    """peft's random prefix made the untrained SmolLM2 score loss ~10 (base ~0.8): the prefix now starts
    as the base model's own keys/values of a rendered short chat, so the fresh prefix model is exactly
    the base model with that text in front, and scores about the base model's loss."""
    from sftlab.eval.loss import evaluate_loss

    model, data, seed = _fresh_prefix_reads_its_seed(tmp_path, tiny_model_dir)
    assert len(seed) == 7 and data.tok.decode(seed).endswith("?<|im_end|>\n")  # the end of the chat's reply
    fresh = evaluate_loss(model, data.tok, data.train.examples)["loss"]
    with model.disable_adapter():
        base = evaluate_loss(model, data.tok, data.train.examples)["loss"]
    assert abs(fresh - base) < 0.02 * base


def test_prefix_training_beats_the_base_model(tmp_path, tiny_model_dir):
    from sftlab.eval.loss import evaluate_loss
    from sftlab.train.run import load_data

    cfg = train_config(tmp_path, tiny_model_dir, method="prefix", max_steps=8, learning_rate=3e-2)
    train(cfg, quiet=True)
    model, tok, _ = RunDir(tmp_path / "run").load_model(device="cpu")
    examples = load_data(cfg).train.examples
    after = evaluate_loss(model, tok, examples)["loss"]
    with model.disable_adapter():
        base = evaluate_loss(model, tok, examples)["loss"]
    losses = [r["loss"] for r in RunDir(tmp_path / "run").metrics() if r["split"] == "train"]
    assert abs(losses[0] - base) < 0.05 * base  # the first step trains from about the base model's loss
    assert after < base - 0.1


def test_check_prints_the_memory_estimate_that_plan_breaks_down(tmp_path, tiny_model_dir, capsys):
    """`train --check` states the step's estimated peak for the data's longest row, and `sftlab plan` on
    the same config, device and row length gives the same total (one model of memory, not two)."""
    from sftlab.core import hardware

    cfg = train_config(tmp_path, tiny_model_dir, method="lora", gradient_accumulation=2)
    path = tmp_path / "run.yaml"
    cfg.save(path)
    assert main(["train", str(path), "--check"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory: about "))
    seq = int(line.split(" x ")[1].split()[0])
    assert 0 < seq <= 128 and "fp32" in line and f"--device cpu --seq-len {seq}" in line
    assert hardware.device_memory_gb()[0] == "cpu"
    assert main(["plan", str(path), "--device", "cpu", "--seq-len", str(seq), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert (planned["setup"]["batch"], planned["setup"]["grad_accum"]) == (4, 2)
    from sftlab.plan.render import gb

    assert line.split("about ")[1].split(" at ")[0] == gb(planned["total_bytes"])


def test_generation_during_training_prompts_without_reasoning_under_drop(tmp_path, tiny_model_dir, monkeypatch):
    """reasoning: drop trains no reasoning anywhere, but eval_generate's prompts showed earlier turns' reasoning."""
    import sftlab.train.run as train_run

    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}.", "reasoning_content": f"SECRET {i}"},
                          {"role": "user", "content": "and twice?"}, {"role": "assistant", "content": f"{4 * i}."}]}
            for i in range(4)]
    evald = tmp_path / "eval.jsonl"
    evald.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    real = train_run.training_eval

    def spy(*args, **kw):
        seen.extend(kw.get("conversations") or [])
        return real(*args, **kw)

    monkeypatch.setattr(train_run, "training_eval", spy)
    train(train_config(tmp_path, tiny_model_dir, eval_data=str(evald), reasoning="drop", eval_generate=2, max_steps=1,
                       eval_steps=1), quiet=True)
    assert seen and all(m.reasoning is None for c in seen for m in c.messages)


def test_check_warns_when_the_template_drops_the_datas_tools(tmp_path, tiny_model_dir):
    """Data that offers tools (and answers without calling them) trained silently with a template that
    ignores `tools`: the model never saw the schemas. Calls it drops were refused; offered tools were not."""
    from tool_data import TOOLS

    rows = [{"tools": TOOLS, "messages": [{"role": "user", "content": f"hi {i}"},
                                          {"role": "assistant", "content": f"hello {i}"}]} for i in range(8)]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = train(train_config(tmp_path, tiny_model_dir, data=str(data)), check_only=True)["findings"]
    dropped = [f for f in found if f["rule"] == "template_tools"]
    assert len(dropped) == 1 and dropped[0]["severity"] == "warning" and "ignores the record's tools" in dropped[0]["message"]
    assert "template=chatml-tools" in dropped[0]["fixes"][0]
    found = train(train_config(tmp_path, tiny_model_dir, data=str(data), template="chatml-tools", max_seq_length=2048),
                  check_only=True)["findings"]
    assert not [f for f in found if f["rule"] == "template_tools"]


def test_auto_batch_on_small_data_is_one_the_checklist_finds_plausible(tmp_path, tiny_model_dir, capsys):
    """40 examples: `auto` aims below the default global batch of 16, and the checklist (which calls a
    global batch above a quarter of the examples implausible) has nothing to say about it."""
    cfg = train_config(tmp_path, tiny_model_dir, data=chat_data(tmp_path / "d.jsonl", 40), batch_size="auto",
                       gradient_accumulation="auto", method="lora")
    path = tmp_path / "run.yaml"
    cfg.save(path)
    assert main(["train", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "global batch" not in out.replace("a global batch of about", "") and "batch_size 4" in out
    assert "gradient_accumulation 2 (a global batch of about 10 for 40 examples)" in out


def _tiny_gemma(out: Path, tiny_model_dir: Path, kind: str) -> Path:
    """A random 2-layer Gemma 2 (a sliding-window layer, then a global one) or Gemma 3 (both sliding)
    with a 4-token window, and the tiny tokenizer."""
    import shutil

    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
    )

    config, cls = (Gemma2Config, Gemma2ForCausalLM) if kind == "gemma2" else (Gemma3TextConfig, Gemma3ForCausalLM)
    torch.manual_seed(0)
    model = cls(config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=4,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2))
    shutil.copytree(tiny_model_dir, out)
    for f in out.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_a_fresh_prefix_of_a_sliding_window_model_reads_the_chat_too(tmp_path, tiny_model_dir, kind):
    """Gemma's cache keeps only the last `sliding_window` tokens in a sliding layer, so the prefix's keys and
    values did not fit and the prefix silently kept peft's random start."""
    _fresh_prefix_reads_its_seed(tmp_path, _tiny_gemma(tmp_path / kind, tiny_model_dir, kind))


def test_a_prefix_that_can_not_start_from_the_model_is_refused_in_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import yaml

    import sftlab.train.model as tm

    monkeypatch.setattr(tm, "init_prefix_from_tokens", lambda model, ids: False)  # a layout that does not fit
    cfg = train_config(tmp_path, tiny_model_dir, method="prefix", max_steps=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)))
    assert main(["train", str(tmp_path / "cfg.yaml")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would start from random vectors" in err[0] and "method=lora" in err[0]


def test_a_run_of_a_model_named_from_the_current_folder_loads_from_anywhere(tmp_path, tiny_model_dir, monkeypatch):
    """`model: tiny` (a folder in the current one) was saved as is: eval, chat, export and report of the run
    from any other folder failed with "model 'tiny' could not be loaded: a hub id ..."; so did data paths
    (eval's general data is the run's replay_data; report's doctor skipped the data "not found from here")."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "tiny")
    monkeypatch.chdir(work)
    chat_data(work / "general.jsonl", 4, offset=50)
    cfg = train_config(work, tiny_model_dir, model="tiny", method="lora", max_steps=1, data="train.jsonl",
                       eval_data="general.jsonl", replay_data="general.jsonl")
    train(cfg, quiet=True)
    monkeypatch.chdir(tmp_path)
    run = RunDir(work / "run")
    saved = run.config()
    assert saved.model == str(work / "tiny") and saved.data == str(work / "train.jsonl")
    assert saved.eval_data == saved.replay_data == str(work / "general.jsonl")
    model, _, _ = run.load_model(device="cpu")
    assert model.get_base_model().config.vocab_size > 0
    # eval takes the run's replay_data as its general data: it was not found from another folder
    assert main(["eval", str(work / "run"), "--data", str(work / "general.jsonl"), "--max-new-tokens", "1"]) == 0


def test_a_sliding_window_prefix_model_replies_alike_in_any_batch(tmp_path, tiny_model_dir):
    """Left pads sat between the prefix and a shorter prompt, so Gemma's sliding window over the prompt's
    first tokens held other prefix tokens: a reply depended on the prompts batched with it."""
    from sftlab.data.types import Conversation, Message
    from sftlab.eval.generation import GenerationSettings, generate
    from sftlab.train.model import build_model
    from sftlab.train.run import load_data

    gemma = _tiny_gemma(tmp_path / "gemma2", tiny_model_dir, "gemma2")
    cfg = train_config(tmp_path, gemma, method="prefix", prefix_tokens=7)
    data = load_data(cfg)
    model, _ = build_model(cfg, data.tok, [], template=data.train.template)
    convs = [Conversation([Message("user", q), Message("assistant", "")])
             for q in ("hi", "what is 3 plus 3 and then some more words?", "ok then", "what is 2 plus 2?")]
    settings = GenerationSettings(max_new_tokens=6)
    batched = [g.token_ids for g in generate(model, data.tok, data.train.template, convs, settings, batch_size=4)]
    alone = [generate(model, data.tok, data.train.template, [c], settings, batch_size=1)[0].token_ids for c in convs]
    assert batched == alone
