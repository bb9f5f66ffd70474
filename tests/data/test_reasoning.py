"""Reasoning in every input format: one rule (sftlab.data.reasoning) splits a reply's <think> block from its
answer in messages, sharegpt, alpaca (output and history) and prompt/completion, so `reasoning` applies to
them all; what the doctor notes, prepare reads."""

import json

import pytest

from sftlab.cli import main
from sftlab.data.doctor import run_doctor
from sftlab.data.reasoning import split_reasoning


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _msgs(*pairs):
    """[(user, reply)] -> messages; a reply is a str, or (reasoning, answer) given as reasoning_content."""
    out = []
    for ask, reply in pairs:
        out.append({"role": "user", "content": ask})
        out.append({"role": "assistant", "content": reply} if isinstance(reply, str)
                   else {"role": "assistant", "reasoning_content": reply[0], "content": reply[1]})
    return {"messages": out}


def _in_each_format(reply):
    """The reply, last of a one-turn chat and first of a two-turn one, in every format that carries a reply:
    {name: (record, the same chat in messages format with the reasoning as a field)}."""
    one, two = _msgs(("q", ("r", "a"))), _msgs(("q0", ("r", "a")), ("q", "b"))
    return {
        "messages": (_msgs(("q", reply)), one),
        "sharegpt": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": reply}]}, one),
        "alpaca-output": ({"instruction": "q", "input": "", "output": reply}, one),
        "alpaca-history": ({"instruction": "q", "output": "b", "history": [["q0", reply]]}, two),
        "prompt_completion": ({"prompt": "q", "completion": reply}, one),
    }


def _dump(tmp_path, model, name, row, reasoning):
    data, dump = _jsonl(tmp_path / f"{name}.jsonl", [row]), tmp_path / f"{name}.dump.jsonl"
    args = ["prepare", "--model", str(model), "--data", data, "--template", "chatml", "--dump", str(dump)]
    assert main(args + (["--reasoning", reasoning] if reasoning else [])) == 0, name
    return [(ex["input_ids"], ex["labels"]) for ex in map(json.loads, dump.read_text().splitlines())]


@pytest.mark.parametrize("reply", ["<think>r</think>\n\na", "r</think>\n\na"], ids=["inline", "r1-unopened"])
@pytest.mark.parametrize("reasoning", [None, "drop"], ids=["default", "drop"])
def test_every_format_trains_inline_reasoning_as_the_messages_format_trains_a_reasoning_field(
        tmp_path, tiny_model_dir, reply, reasoning):
    """alpaca's output and history replies and a string completion were trained as literal text: a <think>
    block kept under `reasoning: drop`, and newlines the template would not write around it."""
    for name, (row, ref) in _in_each_format(reply).items():
        got = _dump(tmp_path, tiny_model_dir, name, row, reasoning)
        want = _dump(tmp_path, tiny_model_dir, name + "-ref", ref, reasoning)
        assert got == want, (name, reasoning)


def test_the_doctor_notes_an_r1_reply_in_every_format_and_prepare_reads_it(tmp_path):
    """The doctor called "r</think>a" in alpaca or a completion a stray </think> (an error) while prepare
    trained it as text; now both read it as reasoning, and the doctor's note is all it says."""
    for name, (row, _) in _in_each_format("r\n</think>\n\na").items():
        path = _jsonl(tmp_path / f"{name}.jsonl", [row])
        res = run_doctor(path)
        assert [(f.rule, f.severity) for f in res.findings] == [("reasoning_unopened", "info")], name
        assert res.stats["tools"]["turns_with_reasoning"] == 1, name


@pytest.mark.parametrize("content, answer, reasoning", [
    ("no reasoning", "no reasoning", None),
    ("  <think>\nr\n</think>\n\na", "a", "r"),
    ("r\n</think>\n\na", "a", "r"),
    ("a</think>b<think>c</think>d", "b<think>c</think>d", "a"),  # the first tag closes: R1; a later block is text
    ("x <think>y</think> z", "x <think>y</think> z", None),  # a block mid-reply is no reasoning: literal, balanced
])
def test_split_reasoning_reads_the_first_think_tag(content, answer, reasoning):
    assert split_reasoning(content, "message 2") == (answer, reasoning)
