"""A run trained with `system_prompt` is evaluated, chatted with, generated from and exported with it."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from conftest import chat_data, train_config

from sftlab.chat import default_system_prompt, generate_jsonl
from sftlab.cli import main
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Message
from sftlab.eval.generation import GenerationSettings
from sftlab.eval.run import run_eval
from sftlab.export import _check_export_template, export_run
from sftlab.rundir import RunDir
from sftlab.train.run import train

SP = 'You extract fields. Reply with one JSON object: {"a": 1}.'


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """A 2-step full fine-tune with a system_prompt; its eval data has no system messages."""
    tmp = tmp_path_factory.mktemp("sp_run")
    evl = chat_data(tmp / "eval.jsonl", 4, offset=100)
    cfg = train_config(tmp, tiny_model_dir, eval_data=evl, system_prompt=SP, max_steps=2, eval_steps=2, save_steps=2)
    train(cfg, quiet=True)
    return Path(cfg.output_dir), evl


def test_eval_of_a_run_uses_its_system_prompt(sp_run):
    run, evl = sp_run
    trained = RunDir(run).summary().final_eval_loss
    short = GenerationSettings(max_new_tokens=2)
    out = run_eval(str(run), evl, settings=short, samples=1)
    assert out["system_prompt"] == SP
    assert math.isclose(out["result"]["metrics"]["loss"], trained, rel_tol=1e-4)  # as training measured it
    assert out["result"]["samples"][0]["prompt_text"].startswith(f"<|im_start|>system\n{SP}<|im_end|>")
    without = run_eval(str(run), evl, settings=short, samples=1, system_prompt="")  # "" overrides: none
    assert not math.isclose(without["result"]["metrics"]["loss"], trained, rel_tol=1e-4)
    other = run_eval(str(run), evl, settings=short, samples=1, system_prompt="Other.")
    assert other["result"]["samples"][0]["prompt_text"].startswith("<|im_start|>system\nOther.<|im_end|>")


def test_generate_and_chat_of_a_run_use_its_system_prompt(sp_run, monkeypatch, capsys):
    run, _ = sp_run
    assert default_system_prompt(str(run)) == SP
    assert default_system_prompt(str(run), "mine") == "mine" and default_system_prompt(str(run), "") is None
    res = generate_jsonl(str(run), prompts=["hello"], max_new_tokens=2, device="cpu")
    assert res.rows[0]["prompt"] == [{"role": "system", "content": SP}, {"role": "user", "content": "hello"}]
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    assert main(["chat", str(run), "--device", "cpu", "--max-new-tokens", "2"]) == 0
    assert f"system: {SP}" in capsys.readouterr().out


def test_export_of_a_run_carries_its_system_prompt(sp_run, tmp_path):
    from transformers import AutoTokenizer

    run, _ = sp_run
    res = export_run(run, tmp_path / "exp", verify=False)
    assert res.system_prompt == SP and not res.template_problems
    tok = AutoTokenizer.from_pretrained(str(res.out))
    trained = RunDir(run).template(tok)
    user = [{"role": "user", "content": "what is 3 plus 3?"}]
    text = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert text == trained.render([Message("system", SP), Message("user", user[0]["content"])], add_generation_prompt=True)
    own = tok.apply_chat_template([{"role": "system", "content": "Mine."}] + user, tokenize=False)
    assert SP not in own and own.startswith("<|im_start|>system\nMine.")  # a given system message wins
    assert json.dumps(SP) in (res.out / "README.md").read_text()
    assert json.loads((res.out / "sftlab_export.json").read_text())["system_prompt"] == SP


def test_export_check_reports_a_template_without_the_system_prompt(sp_run):
    run, _ = sp_run
    from transformers import AutoTokenizer

    tpl = RunDir(run).template(AutoTokenizer.from_pretrained(RunDir(run).model_dir))
    plain = ChatTemplate(tpl.name, tpl.source, tpl.eot, tpl.special)  # what the export wrote before
    problems = _check_export_template(tpl, plain, SP, [])
    assert problems and "training added the run's system_prompt" in problems[0]
    assert _check_export_template(tpl, plain, None, []) == []
