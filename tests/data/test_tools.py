"""Tool-calling and reasoning data: loading every dialect into Message, one clear line per malformed
record, the built-in chatml-tools template, and `prepare --show` marking the reasoning span."""

import json
import re

import pytest
from transformers import AutoTokenizer

from sftlab.cli import main
from sftlab.data.formats import load_conversations
from sftlab.data.masking import Labeler, trained_text
from sftlab.data.prepare import render_example
from sftlab.data.templates import resolve_template
from sftlab.data.types import Message

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _call(args, name="get_weather"):
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}


def _tool_chat(calls, result="sunny", **assistant):
    return {"tools": [{"type": "function", "function": WEATHER}], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": calls, **assistant},
        {"role": "tool", "tool_call_id": "c1", "content": result},
        {"role": "assistant", "content": "Sunny."}]}


def test_openai_tool_calls_load_with_arguments_as_dicts(tmp_path):
    rows = [_tool_chat([_call('{"city": "Paris"}')]), _tool_chat([_call({"city": "Paris"})])]
    for conv in load_conversations(_jsonl(tmp_path / "d.jsonl", rows)):
        assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
        call = conv.messages[1].tool_calls[0]
        assert call == {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        assert conv.messages[1].content == "" and conv.messages[2].tool_call_id == "c1"
        assert conv.tools == [{"type": "function", "function": WEATHER}]
        assert conv.messages[1].to_template()["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_sharegpt_function_calling_dialect(tmp_path):
    row = {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                                       {"name": "get_weather", "arguments": '{"city": "Rome"}'}])},
        {"from": "observation", "value": "cold"}, {"from": "observation", "value": "warm"},
        {"from": "gpt", "value": "Cold in Oslo, warm in Rome."}]}
    (conv,) = load_conversations(_jsonl(tmp_path / "s.jsonl", [row]))
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["arguments"] for c in conv.messages[1].tool_calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert conv.tools == [{"type": "function", "function": WEATHER}]


@pytest.mark.parametrize("assistant,reasoning,content", [
    ({"content": "<think>\nstep one\n</think>\n\nanswer"}, "step one", "answer"),
    ({"content": "answer", "reasoning_content": "why"}, "why", "answer"),
    ({"content": "answer", "reasoning": "why"}, "why", "answer"),
    ({"content": "no reasoning here"}, None, "no reasoning here"),
    # an empty or blank field (as exports write on every message) is no reasoning, and no clash with inline
    ({"content": "4", "reasoning_content": ""}, None, "4"),
    ({"content": "4", "reasoning": " \n", "thinking": ""}, None, "4"),
    ({"content": "<think>\nadd\n</think>\n\n4", "reasoning_content": ""}, "add", "4"),
    # DeepSeek-R1's raw reply: its prompt opened the block, so the first think tag is </think>
    ({"content": "step one\n</think>\n\nanswer"}, "step one", "answer"),
    ({"content": "</think>answer"}, "", "answer"),
])
def test_reasoning_inline_or_as_a_field_is_normalised(tmp_path, assistant, reasoning, content):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", **assistant}]}
    (conv,) = load_conversations(_jsonl(tmp_path / "r.jsonl", [row]))
    assert (conv.messages[1].reasoning, conv.messages[1].content) == (reasoning, content)


# (bad record, what the one error line must say: the problem and the fix)
MALFORMED = {
    "tool_calls-not-a-list": ({**_tool_chat([])} | {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": _call({})},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "ok"}]},
        r"message 2 'tool_calls' must be a list of calls, got dict \(wrap the call in a list"),
    "call-without-name": (_tool_chat([{"type": "function", "function": {"arguments": {}}}]),
                          r"message 2 tool call 1 has no function name \(give each call"),
    "arguments-not-json": (_tool_chat([_call('{"city": Paris}')]),
                           r"message 2 tool call 1 'arguments' is not valid JSON .*\(write the arguments as a JSON object"),
    "arguments-not-an-object": (_tool_chat([_call("[1, 2]")]),
                                r"'arguments' must be an object or a JSON-object string, got the string \"\[1, 2\]\" \(a JSON array\) \(write"),
    "arguments-the-string-null": (_tool_chat([_call("null")]),
                                  r"'arguments' must be an object or a JSON-object string, got the string \"null\" \(a JSON null\) \(write"),
    "result-without-call": ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                                          {"role": "assistant", "content": "a"}]},
                            r"message 2 has role 'tool' where 'assistant' was expected \(a tool result must follow an assistant "
                            r"message with tool_calls"),
    # the doctor's rule (sftlab.data.roles.answered_call): an error there, so refused here too
    "result-id-matches-no-call": ({**_tool_chat([_call({"city": "Paris"})])} | {"messages": [
        *_tool_chat([_call({"city": "Paris"})])["messages"][:2], {"role": "tool", "tool_call_id": "c9", "content": "r"},
        {"role": "assistant", "content": "ok"}]},
        r"message 3 \(tool\): a tool result, but tool_call_id 'c9' matches no open call \(their ids: 'c1'\) "
        r"\(set the result's tool_call_id to the id of the call it answers"),
    "more-results-than-calls": ({**_tool_chat([_call({})])} | {"messages": [
        *_tool_chat([_call({})])["messages"][:3], {"role": "tool", "content": "again"}, {"role": "assistant", "content": "ok"}]},
        r"message 4 \(tool\): a tool result, but every call before it already has its result"),
    "ends-with-result": ({"messages": _tool_chat([_call({})])["messages"][:3]},
                         r"conversation ends with a tool message; the last message must be the assistant's reply"),
    "calls-on-user": ({"messages": [{"role": "user", "content": "q", "tool_calls": [_call({})]},
                                    {"role": "assistant", "content": "a"}]},
                      r"message 1 is a user message with 'tool_calls'.*\(move the calls to the assistant message"),
    "tools-bad-json": ({**GOOD, "tools": "[{not json"}, r"'tools' \(a string\) is not valid JSON .*\(give 'tools' as a list"),
    "tool-without-name": ({**GOOD, "tools": [{"description": "x"}]}, r"tool 1 in 'tools' has no function name"),
    "sharegpt-call-not-json": ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(x)"},
                                                  {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]},
                               r"turn 2 \(function_call\) is not valid JSON .*\(write the value as"),
    "unclosed-think": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hmm, 42"}]},
                       r"message 2 opens <think> but never closes it \(add </think> after the reasoning"),
    "nested-think": ({"messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "<think>a<think>b</think></think>4"}]},
                     r"message 2 has a <think> inside its <think> block \(remove the inner <think>"),
    "think-tags-in-field": ({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "4", "reasoning_content": "<think>a</think>"}]},
                           r"message 2 'reasoning_content' holds <think> tags; .*\(remove the <think> and </think> tags"),
    "stray-close-after-reasoning": ({"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "<think>a</think>b</think>c"}]},
                                    r"message 2 has a stray </think> after its reasoning.*\(remove the stray </think>"),
    "stray-close-after-unopened-reasoning": ({"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a\n</think>\n\nb</think>c"}]},
                                             r"message 2 has a stray </think> after its reasoning.*\(remove the stray"),
    "stray-close-after-a-later-block": ({"messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "<think>a</think>b <think>c</think>d</think>"}]},
                                       r"message 2 has a stray </think> after its reasoning"),
    "empty-after-reasoning": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>"}]},
                              r"message 2 \(assistant\) is empty after its reasoning .*\(write the reply, or remove the example\)"),
    "reasoning-twice": ({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "a"}]},
                        r"message 2 has reasoning both in 'reasoning_content' and inline <think> \(keep the reasoning in one place"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_tool_and_reasoning_records_are_one_line_with_the_fix(tmp_path, tiny_model_dir, capsys, name):
    bad, message = MALFORMED[name]
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]} \
        if "conversations" in bad else GOOD
    data = _jsonl(tmp_path / "d.jsonl", [good, bad])
    code = main(["prepare", "--model", str(tiny_model_dir), "--data", data, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert re.search(r"d\.jsonl:2: .*" + message, err), err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_deepseek_r1_reply_without_its_opening_think_trains_as_the_same_reply_with_it(tiny_model_dir, tmp_path):
    """DeepSeek-R1's generation prompt opens <think>, so its raw replies are "reasoning</think>answer". Read as
    content, chatml trained the reasoning and a stray </think> with no <think>, `reasoning: drop` kept it all,
    and R1's own template refused the reply; read as reasoning, it is the same example as with <think> added."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    replies = ("add them\n</think>\n\n4", "<think>\nadd them\n</think>\n\n4")
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": c}]} for c in replies]
    rows += [{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": c}]} for c in replies]
    data = _jsonl(tmp_path / "r1.jsonl", rows[:2])
    r1, opened = load_conversations(data)
    assert r1.messages == opened.messages and (r1.messages[1].reasoning, r1.messages[1].content) == ("add them", "4")
    assert r1.messages[1].reasoning_unopened and not opened.messages[1].reasoning_unopened  # for the doctor's note
    r1_gpt, opened_gpt = load_conversations(_jsonl(tmp_path / "r1s.jsonl", rows[2:]), "sharegpt")
    assert r1_gpt.messages == opened_gpt.messages == r1.messages
    for template in ("chatml", "chatml-tools"):
        for reasoning in ("per_turn", "drop"):
            labeler = Labeler(tok, resolve_template(template, tok), reasoning=reasoning)
            (a, b), _ = labeler.encode([r1, opened])
            assert (a.input_ids, a.labels) == (b.input_ids, b.labels), (template, reasoning)
    (ex,), _ = Labeler(tok, resolve_template("chatml", tok), reasoning="drop").encode([r1])
    assert trained_text(tok, ex) == ["4<|im_end|>"]  # drop drops it: it is reasoning, not the answer
    dump = tmp_path / "dump.jsonl"
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", data, "--template", "chatml", "--dump", str(dump)]) == 0
    a, b = [json.loads(line) for line in dump.read_text().splitlines()]
    assert (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])


def test_legacy_functions_list_is_the_tools_offered(tmp_path):
    row = {"functions": [WEATHER], "messages": [
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    (conv,) = load_conversations(_jsonl(tmp_path / "d.jsonl", [row]))
    assert conv.tools == [{"type": "function", "function": WEATHER}]
    assert conv.messages[1].tool_calls[0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_a_call_without_an_id_takes_a_result_with_any_id(tmp_path):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
    (conv,) = load_conversations(_jsonl(tmp_path / "d.jsonl", [_tool_chat([call])]))  # the result says "c1"
    assert conv.messages[2].tool_call_id == "c1"


def test_template_without_tool_support_is_refused_and_chatml_tools_renders_them(tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "t.jsonl", [GOOD, _tool_chat([_call({"city": "Paris"})])])
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", data, "--template", "chatml"]) == 2
    err = capsys.readouterr().err.strip()
    assert "t.jsonl:2: the chat template 'chatml' does not render the tool calls of assistant turn 1" in err
    assert "--template chatml-tools" in err
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", data, "--template", "chatml-tools", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert '«<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>»' in out
    assert "<tool_response>\nsunny\n</tool_response>" in out and "«sunny" not in out
    assert "labels: each turn trained as the model produces it: 2 chats as one example each" in out


def test_show_marks_the_reasoning_span(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}]}]
    (conv,) = load_conversations(_jsonl(tmp_path / "d.jsonl", rows))
    (ex,), _ = Labeler(tok, resolve_template("chatml-tools", tok)).encode([conv])
    assert render_example(tok, ex, color=False).endswith("assistant\n«‹<think>\nadd\n</think>›\n\n4<|im_end|>»\n")
    colored = render_example(tok, ex, color=True)
    assert "\x1b[43;30m<think>\nadd\n</think>\x1b[42;30m" in colored


def test_empty_reasoning_field_trains_no_empty_think_block(tiny_model_dir, tmp_path):
    """A template without reasoning support inlines reasoning as <think>; an empty field must not
    teach the model to open every reply with an empty <think>\n\n</think>."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": ""}]}
    convs = load_conversations(_jsonl(tmp_path / "e.jsonl", [row]))
    (ex,), _ = Labeler(tok, resolve_template("chatml", tok)).encode(convs)
    assert trained_text(tok, ex) == ["4<|im_end|>"]


def test_template_without_reasoning_gets_it_inline(tiny_model_dir):
    """SmolLM2-style ChatML knows no reasoning_content: the reasoning goes back into the content."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tpl = resolve_template("chatml", tok)
    text = tpl.render([Message("user", "q"), Message("assistant", "4", reasoning="add")])
    assert text.endswith("<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n")
    assert not tpl.renders_reasoning and resolve_template("chatml-tools", tok).renders_reasoning
