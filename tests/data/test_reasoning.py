"""Reasoning in every input format: one rule (sftlab.data.reasoning) splits a reply's <think> block from its
answer in messages, sharegpt, alpaca (output and history) and prompt/completion, so `reasoning` applies to
them all; what prepare refuses, the doctor calls an error, and what the doctor notes, prepare reads."""

import json
import re

import pytest

from sftlab.cli import main
from sftlab.data.doctor import run_doctor
from sftlab.data.formats import from_alpaca
from sftlab.data.reasoning import split_reasoning
from sftlab.data.roles import FormatError


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


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content", "thinking"])
def test_a_record_level_reasoning_field_is_the_replys_reasoning_in_alpaca_and_completion(tmp_path, tiny_model_dir, key):
    """{"instruction", "output", "reasoning"} (a common column layout) trained without its reasoning, and the
    doctor called the record clean; now the field is the final reply's reasoning, as in the messages format."""
    ref = _msgs(("q", ("r", "a")))
    for name, row in {"alpaca": {"instruction": "q", "output": "a", key: "r"},
                      "prompt_completion": {"prompt": "q", "completion": "a", key: "r"}}.items():
        got = _dump(tmp_path, tiny_model_dir, name, row, None)
        assert got == _dump(tmp_path, tiny_model_dir, name + "-ref", ref, None), name
        assert got != _dump(tmp_path, tiny_model_dir, name + "-plain", {k: v for k, v in row.items() if k != key}, None)
        res = run_doctor(_jsonl(tmp_path / f"{name}-doc.jsonl", [row]))
        assert res.findings == [] and res.stats["tools"]["turns_with_reasoning"] == 1, name
    with pytest.raises(FormatError, match="both in 'reasoning' and inline"):  # never both
        from_alpaca({"instruction": "q", "output": "<think>x</think>a", "reasoning": "r"})


BAD_ANSWERS = {  # a reply -> what prepare and the doctor both say of it
    "opened-in-answer": ("<think>r</think>\n\na <think> and more", "opens a <think> in its answer that is never closed"),
    "opened-without-reasoning": ("a <think> and more", "opens a <think> in its answer that is never closed"),
    "nested-in-answer": ("<think>r</think>a <think><think>b</think></think>", "has a <think> inside another in its answer"),
    "stray-close": ("<think>r</think>a</think>", "has a stray </think> after its reasoning"),
}


@pytest.mark.parametrize("name", sorted(BAD_ANSWERS))
def test_think_tags_the_doctor_calls_wrong_in_an_answer_are_refused_by_prepare(tmp_path, tiny_model_dir, capsys, name):
    """A <think> opened in the answer and never closed was trained as literal text by prepare (the model learns
    to open a block it never closes) while the doctor called it an error; now both say the same, once."""
    reply, what = BAD_ANSWERS[name]
    for fmt, (row, _) in _in_each_format(reply).items():
        data = _jsonl(tmp_path / f"{fmt}.jsonl", [_msgs(("hi", "hello")), row]) if fmt == "messages" else \
            _jsonl(tmp_path / f"{fmt}.jsonl", [row])
        line = 2 if fmt == "messages" else 1
        code = main(["prepare", "--model", str(tiny_model_dir), "--data", data, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1, (fmt, err)
        assert re.search(rf"{fmt}\.jsonl:{line}: .*{re.escape(what)}.*\(", err), (fmt, err)  # file:line, what, (the fix)
        assert "Traceback" not in err and not (tmp_path / "out").exists()
        res = run_doctor(data)
        assert [(f.rule, f.severity, f.where) for f in res.findings] == [("reasoning_unclosed", "error", f"{data}:{line}")]
        assert what in res.findings[0].message and res.findings[0].fixes[0]


@pytest.mark.parametrize("content, answer, reasoning", [
    ("no reasoning", "no reasoning", None),
    ("  <think>\nr\n</think>\n\na", "a", "r"),
    ("r\n</think>\n\na", "a", "r"),
    ("a</think>b<think>c</think>d", "b<think>c</think>d", "a"),  # the first tag closes: R1; a later block is text
    ("x <think>y</think> z", "x <think>y</think> z", None),  # a block mid-reply is no reasoning: literal, balanced
])
def test_split_reasoning_reads_the_first_think_tag(content, answer, reasoning):
    assert split_reasoning(content, "message 2") == (answer, reasoning)


def test_an_unclosed_think_in_the_answer_is_a_format_error_naming_the_reply():
    with pytest.raises(FormatError, match=r"^'output' opens a <think> in its answer that is never closed$") as exc:
        split_reasoning("<think>r</think>a<think>b", "'output'")
    assert exc.value.check == "reasoning_unclosed" and "</think>" in exc.value.fix
