"""`--json`: for every command that reports something, stdout is exactly one JSON document.

Each command runs on tiny inputs (the tiny model, a 16-example file, a 2-step LoRA run); stdout is
captured at the file-descriptor level, so prints from libraries (or C code) would break ``json.loads``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.config import load_config

pytestmark = pytest.mark.xdist_group("train")


def _data(path: Path, n: int = 16) -> str:
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


SETS = dict(max_steps=2, batch_size=4, gradient_accumulation=1, learning_rate=1e-3, precision="fp32",
            save_steps=100, eval_steps=100, warmup_ratio=0.0, gradient_checkpointing=False, max_seq_length=128,
            logging_steps=1)


def _train_flags(model: Path, data: str, out: Path) -> list[str]:
    return ["--model", str(model), "--data", data, "--output-dir", str(out), "--method", "lora",
            *[a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]]


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny model, a data file and a finished 2-step LoRA run folder."""
    from sftlab.train.run import train

    d = tmp_path_factory.mktemp("json")
    data = _data(d / "train.jsonl")
    train(load_config(None, dict(model=str(tiny_model_dir), data=data, output_dir=str(d / "run"), method="lora",
                                 **SETS)), quiet=True)
    return {"model": str(tiny_model_dir), "data": data, "run": str(d / "run"), "tmp": d}


def _json_stdout(capfd, argv: list[str]) -> dict:
    code = main(argv)
    out = capfd.readouterr().out
    assert code in (0, 1, 2), out  # doctor/diagnose report findings through the exit code
    return json.loads(out)


CASES = {
    "prepare": (lambda i: ["prepare", "--model", i["model"], "--data", i["data"], "--json"], "report"),
    "doctor": (lambda i: ["doctor", i["data"], "--model", i["model"], "--json"], "findings"),
    "train --help-config": (lambda i: ["train", "--help-config", "--json"], "learning_rate"),
    "train --check": (lambda i: ["train", *_train_flags(Path(i["model"]), i["data"], i["tmp"] / "check"),
                                 "--check", "--json"], "resolved"),
    "plan": (lambda i: ["plan", "--params", "135M", "--device", "cpu", "--budget-gb", "8", "--json"], "total_bytes"),
    "recommend": (lambda i: ["recommend", "--examples", "200", "--json"], "approach"),
    "diagnose": (lambda i: ["diagnose", i["run"], "--json"], "findings"),
    "report": (lambda i: ["report", i["run"], "--no-doctor", "--out", str(i["tmp"] / "r.html"), "--json"], "path"),
    "eval": (lambda i: ["eval", i["run"], "--data", i["data"], "--limit", "2", "--max-new-tokens", "4",
                        "--device", "cpu", "--json"], "result"),
    "export": (lambda i: ["export", i["run"], "--out", str(i["tmp"] / "export"), "--force", "--no-verify", "--json"],
               "out"),
    "generate": (lambda i: ["generate", i["run"], "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu",
                            "--json"], "rows"),
    "generate --out": (lambda i: ["generate", i["run"], "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu",
                                  "--out", str(i["tmp"] / "g.jsonl"), "--json"], "n"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_json_stdout_is_one_document(name, inputs, capfd):
    argv, key = CASES[name]
    doc = _json_stdout(capfd, argv(inputs))
    assert key in doc, sorted(doc)


def test_train_json_is_the_summary_only(inputs, tiny_model_dir, capfd):
    doc = _json_stdout(capfd, ["train", *_train_flags(tiny_model_dir, inputs["data"], inputs["tmp"] / "again"), "--json"])
    assert doc["steps"] == 2 and doc["stopped"] == "completed"


def test_train_check_text_prints_the_checklist_once(inputs, tiny_model_dir, capfd):
    flags = _train_flags(tiny_model_dir, inputs["data"], inputs["tmp"] / "text")
    assert main(["train", *flags, "--check", "--set", "weight_decay=0.5"]) == 0
    out = capfd.readouterr().out
    assert out.count("weight decay 0.5 is high") == 1 and "{" not in out


def test_eval_json_of_a_nan_model_is_strict_json(tiny_model_dir, tmp_path, capfd):
    # a diverged model's eval loss is NaN: json.dumps wrote a bare NaN, which jq and JavaScript reject
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    nan_dir = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, nan_dir)
    model = AutoModelForCausalLM.from_pretrained(nan_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(nan_dir)
    out_file = tmp_path / "eval.json"
    code = main(["eval", str(nan_dir), "--data", _data(tmp_path / "eval.jsonl", 4), "--max-new-tokens", "2",
                 "--json", "--out", str(out_file)])
    out = capfd.readouterr().out
    assert code == 0

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))

    for doc in (strict(out), strict(out_file.read_text())):
        assert doc["result"]["metrics"]["loss"] == "nan"
        assert doc["result"]["metrics"]["perplexity"] == "nan"
