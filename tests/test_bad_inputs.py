"""Every command, given what a careless user or an adversary gives it: one error line (what, where, the
fix), a non-zero exit, no traceback, no hang, nothing half-written.

Each row is (id, argv builder, expected exit code, a phrase the error line must hold, paths that must
not exist afterwards). Commands run in-process through ``sftlab.cli.main``, so any exception other
than a SftlabError fails the test with its traceback.

Permissions: the tests run as root, for whom chmod-based "unwritable" folders are writable. An
unwritable output folder is therefore a path under /proc (no regular file can be created there, for
root too) or a path under a regular file; the chmod case runs only for a non-root user.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import chat_data

from sftlab import models
from sftlab.cli import main

TRAIN = ["--set", "precision=fp32", "--set", "batch_size=4", "--set", "gradient_accumulation=1"]


@pytest.fixture
def env(tmp_path, tiny_model_dir, monkeypatch):
    """A work folder with the tiny model, 16 chats, a regular file, bad templates and bad data."""
    monkeypatch.chdir(tmp_path)
    e = {"tmp": tmp_path, "model": str(tiny_model_dir), "data": chat_data(tmp_path / "train.jsonl", 16)}
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "range.jinja").write_text("{{ range(10**9)|list|length }}")
    (tmp_path / "repeat.jinja").write_text("{{ 'a' * 100000000 }}")
    (tmp_path / "recurse.jinja").write_text("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "unknown.yaml").write_text("modle: x\n")
    (tmp_path / "datadir").mkdir()
    (tmp_path / "lorarun" / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # a LoRA run's checkpoint
    (tmp_path / "lorarun" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "lorarun" / "config.yaml").write_text("method: lora\n")
    return e


def _train(e, *extra):
    return ["train", "--model", e["model"], "--data", e["data"], *TRAIN, *extra]


def _prepare(e, *extra):
    return ["prepare", "--model", e["model"], "--data", e["data"], *extra]


# (id, argv(env), exit code, phrase in the error, paths (relative to tmp) that must not exist after)
CASES = [
    # run folder
    ("train-output-dir-is-file", lambda e: _train(e, "--output-dir", "afile"), 2, "afile is a file", []),
    ("check-output-dir-is-file", lambda e: _train(e, "--output-dir", "afile", "--check"), 2, "afile is a file", []),
    ("check-output-dir-under-file", lambda e: _train(e, "--output-dir", "afile/run", "--check"), 2,
     "which is a file", []),
    ("check-output-dir-unwritable", lambda e: _train(e, "--output-dir", "/proc/sftlab-test-run", "--check"), 2,
     "cannot be written", []),
    ("train-output-dir-unwritable", lambda e: _train(e, "--output-dir", "/proc/sftlab-test-run"), 2,
     "cannot be written", []),
    ("check-resume-without-checkpoint", lambda e: _train(e, "--output-dir", "fresh", "--resume", "--check"), 2,
     "no complete checkpoint", ["fresh"]),
    ("train-resume-without-checkpoint", lambda e: _train(e, "--output-dir", "fresh", "--resume"), 2,
     "no complete checkpoint", ["fresh"]),
    ("check-resume-other-method", lambda e: _train(e, "--output-dir", "lorarun", "--resume", "--method", "full",
                                                     "--check"), 2, "trained with method lora", []),
    ("check-max-steps-0", lambda e: _train(e, "--output-dir", "r", "--set", "max_steps=0", "--check"), 2,
     "max_steps 0 trains nothing", ["r"]),
    ("train-max-steps-0", lambda e: _train(e, "--output-dir", "r", "--set", "max_steps=0"), 2,
     "max_steps 0 trains nothing", ["r"]),
    ("train-logging-steps-0", lambda e: _train(e, "--output-dir", "r", "--set", "logging_steps=0"), 2,
     "config key 'logging_steps': 0 must be at least 1", ["r"]),
    ("check-logging-steps-negative", lambda e: _train(e, "--output-dir", "r", "--set", "logging_steps=-3", "--check"),
     2, "config key 'logging_steps': -3 must be at least 1", ["r"]),
    ("train-report-to-unknown", lambda e: _train(e, "--output-dir", "r", "--set", "report_to=[nosuch]"), 2,
     "config key 'report_to': 'nosuch' is not one of tensorboard, trackio, wandb, mlflow", ["r"]),
    ("check-lora-alpha-negative", lambda e: _train(e, "--output-dir", "r", "--set", "lora_alpha=-1", "--check"), 2,
     "config key 'lora_alpha': -1 must be positive", ["r"]),
    ("check-lora-alpha-0", lambda e: _train(e, "--output-dir", "r", "--set", "lora_alpha=0", "--check"), 2,
     "config key 'lora_alpha': 0 must be positive", ["r"]),
    ("check-packing-prefix", lambda e: _train(e, "--output-dir", "r", "--method", "prefix", "--set", "packing=true",
                                              "--check"), 2, "packing does not work with prefix tuning", ["r"]),
    ("train-packing-prefix", lambda e: _train(e, "--output-dir", "r", "--method", "prefix", "--set", "packing=true"),
     2, "packing does not work with prefix tuning", ["r"]),
    ("check-lora-target-missing", lambda e: _train(e, "--output-dir", "r", "--set", "lora_target_modules=nosuch_proj",
                                                   "--check"), 2, "the model has no module nosuch_proj", ["r"]),
    ("train-lora-target-missing", lambda e: _train(e, "--output-dir", "r", "--set", "lora_target_modules=nosuch_proj"),
     2, "the model has no module nosuch_proj", ["r"]),
    ("check-json-error-exit", lambda e: _train(e, "--output-dir", "afile", "--check", "--json"), 2, None, []),
    # templates: bounded, one line
    ("template-huge-range", lambda e: _prepare(e, "--template", "range.jinja"), 2, "range.jinja", []),
    ("template-huge-string", lambda e: _prepare(e, "--template", "repeat.jinja"), 2, "repeat.jinja", []),
    ("template-recursion", lambda e: _prepare(e, "--template", "recurse.jinja"), 2, "recurse.jinja", []),
    ("template-does-not-compile", lambda e: _prepare(e, "--template", "broken.jinja"), 2, "does not compile", []),
    ("template-file-missing", lambda e: _prepare(e, "--template", "nothere.jinja"), 2, "not found", []),
    ("template-unknown-name", lambda e: _prepare(e, "--template", "chatml2"), 2, "unknown template", []),
    ("check-template-huge-string", lambda e: _train(e, "--output-dir", "r", "--template", "repeat.jinja", "--check"),
     2, "repeat.jinja", ["r"]),
    # data
    ("data-missing", lambda e: ["prepare", "--model", e["model"], "--data", "nothere.jsonl"], 2, "nothere.jsonl", []),
    ("data-empty", lambda e: ["prepare", "--model", e["model"], "--data", "empty.jsonl"], 2, "empty.jsonl", []),
    ("data-binary", lambda e: ["prepare", "--model", e["model"], "--data", "binary.jsonl"], 2, "binary.jsonl", []),
    ("data-is-empty-folder", lambda e: ["prepare", "--model", e["model"], "--data", "datadir"], 2, "datadir", []),
    ("doctor-data-missing", lambda e: ["doctor", "nothere.jsonl", "--model", e["model"]], 2, "nothere.jsonl", []),
    ("doctor-max-seq-length-0", lambda e: ["doctor", e["data"], "--model", e["model"], "--max-seq-length", "0"], 2,
     "max_seq_length", []),
    ("train-eval-data-missing", lambda e: _train(e, "--eval-data", "nothere.jsonl", "--check"), 2, "nothere.jsonl", []),
    # outputs that cannot be written
    ("prepare-dump-under-file", lambda e: _prepare(e, "--dump", "afile/rows.jsonl"), 2, "afile/rows.jsonl", []),
    ("prepare-dump-unwritable", lambda e: _prepare(e, "--dump", "/proc/sftlab-rows.jsonl"), 2, "cannot write", []),
    # configs and flags
    ("config-missing", lambda e: ["train", "nothere.yaml", "--check"], 2, "nothere.yaml", []),
    ("config-invalid-yaml", lambda e: ["train", "bad.yaml", "--check"], 2, "bad.yaml", []),
    ("config-not-a-mapping", lambda e: ["train", "list.yaml", "--check"], 2, "list.yaml", []),
    ("config-unknown-key", lambda e: ["train", "unknown.yaml", "--check"], 2, "modle", []),
    # a folder or binary file as the config or use case was an IsADirectoryError / UnicodeDecodeError traceback
    ("config-is-a-folder", lambda e: ["train", "datadir", "--check"], 2, "config file 'datadir' cannot be read", []),
    ("config-binary", lambda e: ["train", "binary.jsonl", "--check"], 2, "not UTF-8 text", []),
    ("plan-config-is-a-folder", lambda e: ["plan", "datadir"], 2, "config file 'datadir' cannot be read", []),
    ("plan-config-binary", lambda e: ["plan", "binary.jsonl"], 2, "not UTF-8 text", []),
    ("plan-set-unknown-key", lambda e: ["plan", "--set", "modle=x"], 2, "modle", []),
    ("recommend-use-case-is-a-folder", lambda e: ["recommend", "datadir"], 2, "use-case file datadir cannot be read", []),
    ("recommend-use-case-binary", lambda e: ["recommend", "binary.jsonl"], 2, "not UTF-8 text", []),
    ("set-without-equals", lambda e: _train(e, "--set", "learning_rate", "--check"), 2, "learning_rate", []),
    ("set-unknown-key", lambda e: _train(e, "--set", "learning_rat=1", "--check"), 2, "learning_rat", []),
    ("set-wrong-type", lambda e: _train(e, "--set", "learning_rate=fast", "--check"), 2, "learning_rate", []),
    ("set-negative-epochs", lambda e: _train(e, "--set", "epochs=-1", "--check"), 2, "epochs", []),
    ("set-bad-choice", lambda e: _train(e, "--set", "method=magic", "--check"), 2, "method", []),
    # models
    ("model-missing", lambda e: ["prepare", "--model", "./nothere", "--data", e["data"]], 2, "nothere", []),
    ("model-is-a-text-file", lambda e: ["prepare", "--model", "afile", "--data", e["data"]], 2, "afile", []),
    ("model-hub-id-offline", lambda e: ["plan", "--model", "some-org/some-model"], 2, "not reachable", []),
    ("model-tokenizer-only-for-train", lambda e: ["train", "--model", e["tokonly"], "--data", e["data"], "--check"],
     2, "config.json", []),
    # planning
    ("recommend-no-arguments", lambda e: ["recommend"], 2, "--examples", []),
    ("recommend-bad-examples", lambda e: ["recommend", "--examples", "many"], 2, "examples", []),
    ("recommend-unknown-level", lambda e: ["recommend", "--examples", "10", "--compute", "huge"], 2, "compute", []),
    ("plan-model-and-params", lambda e: ["plan", "--model", e["model"], "--params", "7B"], 2, "not both", []),
    ("plan-bad-params", lambda e: ["plan", "--params", "lots"], 2, "lots", []),
    # planned as a 32M model (one layer of the smallest typical shape), named "~1M"
    ("plan-params-below-the-smallest-shape", lambda e: ["plan", "--params", "1M"], 2, "the smallest typical shape", []),
    # run folders that are not run folders
    ("diagnose-missing-run", lambda e: ["diagnose", "nothere"], 2, "nothere", []),
    ("report-missing-run", lambda e: ["report", "nothere"], 2, "nothere", []),
    ("export-missing-run", lambda e: ["export", "nothere", "--out", "exp"], 2, "nothere", ["exp"]),
    ("eval-missing-run", lambda e: ["eval", "nothere", "--data", e["data"]], 2, "nothere", []),
    # options that would be ignored, or make no sense
    ("export-gguf-dtype-without-gguf", lambda e: ["export", "nothere", "--out", "exp", "--gguf-dtype", "f32"], 2,
     "--gguf-dtype f32 without --gguf", ["exp"]),
    ("eval-negative-forgetting-threshold", lambda e: ["eval", "nothere", "--data", e["data"],
                                                      "--forgetting-threshold", "-1"], 2, "must be above 0", []),
    ("plan-zero-budget", lambda e: ["plan", "--budget-gb", "0"], 2, "must be a number of GB above 0", []),
    # 0 was taken as "not given": the eval ran at the default length and wrote its result
    ("eval-max-seq-length-0", lambda e: ["eval", e["model"], "--data", e["data"], "--max-seq-length", "0",
                                         "--out", "ev.json"], 2, "max_seq_length 0", ["ev.json"]),
    ("eval-negative-samples", lambda e: ["eval", e["model"], "--data", e["data"], "--samples", "-1", "--out", "ev.json"],
     2, "--samples -1", ["ev.json"]),
    # sampling settings that greedy decoding ignores (eval stored them in its settings as if used)
    ("eval-temperature-without-do-sample", lambda e: ["eval", e["model"], "--data", e["data"], "--temperature", "0.7",
                                                      "--out", "ev.json"], 2, "--temperature 0.7 without --do-sample",
     ["ev.json"]),
    ("generate-top-p-while-greedy", lambda e: ["generate", e["model"], "--prompt", "hi", "--top-p", "0.5",
                                               "--out", "g.jsonl"], 2, "--top-p 0.5 with greedy decoding", ["g.jsonl"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_a_nonzero_exit(case, env, capsys, tmp_path):
    name, argv, code, phrase, absent = case
    tok_only = tmp_path / "tokonly"
    if "tokonly" in name or "tokenizer-only" in name:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(env["model"]).save_pretrained(tok_only)
    env["tokonly"] = str(tok_only)
    started = time.monotonic()
    got = main(argv(env))
    took = time.monotonic() - started
    out, err = capsys.readouterr()
    # `sftlab CMD: error: ...` on stderr; `train --check` prints its checklist: `check error: ...`
    errors = [line for line in (out + err).splitlines() if ": error: " in line or line.startswith("check error:")]
    assert got == code, f"{name}: exit {got}, stderr:\n{err}"
    assert "Traceback" not in err
    if phrase is not None:
        assert len(errors) == 1, f"{name}: expected one error line, got:\n{err}"
        assert phrase in errors[0], errors[0]
    for rel in absent:
        assert not (tmp_path / rel).exists(), f"{name}: {rel} was written"
    assert took < 60, f"{name} took {took:.0f}s"


def _old_run(folder: Path) -> dict[str, bytes]:
    """A run folder as a finished 6-step run leaves it; returns its files' bytes by path."""
    (folder / "checkpoints" / "checkpoint-6").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6}')
    (folder / "model").mkdir()
    (folder / "model" / "adapter_model.safetensors").write_bytes(b"old weights")
    (folder / "summary.json").write_text('{"steps": 6, "stopped": "completed"}')
    (folder / "metrics.jsonl").write_text('{"split": "train", "step": 6, "loss": 1.0}\n')
    (folder / "config.yaml").write_text("method: lora\nlearning_rate: 0.001\n")
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("check", [True, False], ids=["check", "train"])
def test_a_folder_holding_a_run_is_refused_without_resume_before_any_loading(env, capsys, monkeypatch, check):
    """A new run into an old run's folder would replace its model and summary and mix its checkpoints
    with the old ones (a later --resume continued the old run): one line, exit 2, the folder untouched."""
    from sftlab.train import run as run_mod

    before = _old_run(env["tmp"] / "old")
    if not check:  # the real run refuses before loading anything; --check goes on to list every finding
        monkeypatch.setattr(run_mod, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before refusing"))
    assert main(_train(env, "--output-dir", "old", *(["--check"] if check else []))) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in (out + err).splitlines() if "error" in ln]
    assert len(lines) == 1 and "old holds a run" in lines[0], out + err
    assert "pass --resume to continue it, choose another --output-dir, or remove it" in lines[0]
    after = {str(p.relative_to(env["tmp"] / "old")): p.read_bytes()
             for p in sorted((env["tmp"] / "old").rglob("*")) if p.is_file()}
    assert after == before


def test_an_empty_existing_folder_or_a_config_kept_there_is_no_run(env, capsys):
    (env["tmp"] / "empty").mkdir()
    assert main(_train(env, "--output-dir", "empty", "--set", "max_steps=1", "--check")) == 0
    (env["tmp"] / "mine").mkdir()
    (env["tmp"] / "mine" / "config.yaml").write_text("max_steps: 1\n")  # the user's own config, kept there
    assert main(_train(env, "--output-dir", "mine", "--set", "max_steps=1", "--check")) == 0
    assert "holds a run" not in capsys.readouterr().out


def test_the_demo_clears_only_its_own_previous_run(tmp_path, capsys):
    from sftlab.core.errors import SftlabError
    from sftlab.demo import clear_previous_demo

    data = chat_data(tmp_path / "demo_train.jsonl", 2)
    assert clear_previous_demo(str(tmp_path / "none"), data) is False  # nothing there yet
    _old_run(tmp_path / "demo")
    (tmp_path / "demo" / "config.yaml").write_text(f"data: {data}\n")
    assert clear_previous_demo(str(tmp_path / "demo"), data) is True
    assert not (tmp_path / "demo").exists() and "removing the previous demo run in" in capsys.readouterr().out
    _old_run(tmp_path / "other")
    (tmp_path / "other" / "config.yaml").write_text("data: somewhere/else.jsonl\n")
    with pytest.raises(SftlabError, match="holds a run that is not the demo's"):
        clear_previous_demo(str(tmp_path / "other"), data)
    assert (tmp_path / "other" / "summary.json").exists()


def test_lora_targets_the_model_lacks_are_named_by_the_checklist(env):
    """None there: an error (peft refuses after loading); some missing: a warning (peft adapts the others)."""
    from sftlab.config import load_config
    from sftlab.models import model_config
    from sftlab.train.checks import method_findings

    mcfg = model_config(env["model"])
    found = lambda targets: [(f.rule, f.severity, f.message) for f in method_findings(  # noqa: E731
        load_config(None, {"model": env["model"], "lora_target_modules": targets}), mcfg)]
    assert found("q_proj,v_proj") == [] and found("all-linear") == []
    assert found("q_proj,nosuch_proj") == [("lora_target_modules", "warning",
                                           "lora_target_modules: the model has no module nosuch_proj; LoRA adapts "
                                           "only the others")]
    assert [sev for _, sev, _ in found("nosuch_proj")] == ["error"]


def test_hub_id_offline_fails_at_once(env, capsys, monkeypatch):
    """No minute of download retries: with HF_HUB_OFFLINE set (conftest) or no connection it fails in seconds."""
    started = time.monotonic()
    assert main(["plan", "--model", "some-org/some-model"]) == 2
    assert time.monotonic() - started < 5
    monkeypatch.delenv("HF_HUB_OFFLINE")
    from sftlab.core import hub

    monkeypatch.setattr(hub, "hub_unreachable", lambda endpoint: "no connection to huggingface.co: test")
    assert main(["plan", "--model", "some-org/other-model"]) == 2
    assert "no connection to huggingface.co" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0500 folder: /proc stands in above")
def test_chmod_unwritable_output_dir(env, capsys):
    locked = env["tmp"] / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(_train(env, "--output-dir", str(locked / "run"), "--check")) == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_train_check_is_sound_only_when_the_run_starts(env, capsys):
    """The counterpart: a sound config says so and exits 0, and the same config then trains."""
    argv = _train(env, "--output-dir", "ok", "--set", "max_steps=1")
    assert main([*argv, "--check"]) == 0
    assert "error" not in capsys.readouterr().out
    assert main(argv) == 0
    assert json.loads((env["tmp"] / "ok" / "summary.json").read_text())["steps"] == 1


def test_tokenizer_only_folder_is_enough_for_prepare_and_doctor(env, capsys, tmp_path):
    from transformers import AutoTokenizer

    tok_only = tmp_path / "tok"
    AutoTokenizer.from_pretrained(env["model"]).save_pretrained(tok_only)
    assert not (tok_only / "config.json").exists()
    assert main(["prepare", "--model", str(tok_only), "--data", env["data"]]) == 0
    assert "16/16 examples kept" in capsys.readouterr().out
    assert main(["doctor", env["data"], "--model", str(tok_only)]) == 0


def test_doctor_without_model_checks_length_with_the_default_tokenizer(env, capsys, monkeypatch):
    """A 5.2-million-character example is flagged against --max-seq-length with no --model: lengths are
    measured by the default model's tokenizer (the tiny one stands in for it here) and the report says so."""
    real = models.load_tokenizer
    asked = []

    def fake(name, **kw):
        asked.append(name)
        return real(env["model"] if name == models.DEFAULT_MODEL else name, **kw)

    monkeypatch.setattr(models, "load_tokenizer", fake)
    big = env["tmp"] / "big.jsonl"
    row = {"messages": [{"role": "user", "content": "word " * 1_040_000}, {"role": "assistant", "content": "ok"}]}
    big.write_text(json.dumps(row) + "\n" + Path(env["data"]).read_text())
    assert len(big.read_text()) > 5_200_000
    code = main(["doctor", str(big), "--max-seq-length", "512"])
    out = capsys.readouterr().out
    assert asked == [models.DEFAULT_MODEL]
    assert code == 1, out
    assert "too_long" in out and "big.jsonl:1" in out and "> max_seq_length 512" in out
    assert f"by the {models.DEFAULT_MODEL} tokenizer" in out
