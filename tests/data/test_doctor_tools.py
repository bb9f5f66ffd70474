"""The doctor's tool-calling and reasoning checks, and the JSON-schema subset they share with eval."""

from __future__ import annotations

import pytest
from tool_data import HERMES, TOOLS, WEATHER, call, tool_conv, weather_conv

from sftlab.data.doctor_checks import CHECKS
from sftlab.data.doctor_tools import (
    argument_problems,
    function_schemas,
    parse_arguments,
    reasoning_checks,
    template_tool_check,
    tool_checks,
    type_ok,
)
from sftlab.data.templates import BUILTIN, ChatTemplate
from sftlab.data.types import Conversation, Message

SCHEMA = WEATHER["function"]["parameters"]


def findings_of(conv):
    out = []
    tool_checks(conv, out)
    reasoning_checks(conv, out)
    return out


def test_function_schemas_take_both_shapes():
    bare = {"name": "f", "parameters": {"type": "object"}}
    assert function_schemas([WEATHER, bare, {"type": "function"}]) == {"get_weather": SCHEMA, "f": {"type": "object"}}
    assert function_schemas(None) == {}


@pytest.mark.parametrize("value,schema,ok", [
    ("x", {"type": "string"}, True), (3, {"type": "string"}, False), (3, {"type": "integer"}, True),
    (3.0, {"type": "integer"}, True), (3.5, {"type": "integer"}, False), (3, {"type": "number"}, True),
    (True, {"type": "number"}, False), (True, {"type": "boolean"}, True), ([1], {"type": "array"}, True),
    ({}, {"type": "object"}, True), (None, {"type": ["string", "null"]}, True), ("c", {"enum": ["a", "b"]}, False),
    ("a", {"type": "string", "enum": ["a"]}, True), ("x", {}, True), ("x", {"type": "custom"}, True),
    # an enum compares as JSON does (Python's True == 1 and 0 == False passed a boolean as 1 and 0 as false)
    (True, {"enum": [1, 2]}, False), (0, {"enum": [False]}, False), (2.0, {"enum": [1, 2]}, True),
    ([True], {"enum": [[1]]}, False),
])
def test_type_ok(value, schema, ok):
    assert type_ok(value, schema) is ok


def test_argument_problems_name_unknown_missing_and_wrong_types():
    assert argument_problems({"city": "Paris", "unit": "celsius"}, SCHEMA) == []
    probs = argument_problems({"town": "Paris", "unit": "kelvin"}, SCHEMA)
    assert probs[0].startswith("unknown argument 'town'") and "city, unit" in probs[0]
    assert probs[1] == "missing required argument 'city'"
    assert "'unit' is \"kelvin\"" in probs[2] and "one of ['celsius', 'fahrenheit']" in probs[2]
    assert argument_problems({"anything": 1}, {}) == []  # no properties listed: names are free


def test_additional_properties_allow_names_beyond_the_listed_ones():
    """A schema with additionalProperties true (or a schema) accepts other names: a call using one was
    scored invalid and the doctor reported an unknown argument."""
    for extra in (True, {"type": "string"}):
        assert argument_problems({"city": "Paris", "note": "x"}, {**SCHEMA, "additionalProperties": extra}) == []
    assert argument_problems({"city": "Paris", "note": "x"}, {**SCHEMA, "additionalProperties": False})[0].startswith(
        "unknown argument 'note'")


def test_parse_arguments():
    assert parse_arguments('{"a": 1}') == ({"a": 1}, None)
    assert parse_arguments(None) == ({}, None)
    assert parse_arguments("{'a': 1}")[1].startswith("arguments are not valid JSON")
    assert parse_arguments("[1]") == (None, "arguments are a JSON array, not an object")


def test_a_clean_tool_conversation_has_no_findings():
    assert findings_of(weather_conv()) == []
    assert findings_of(weather_conv(answered=False)) == []  # ending at the call: the training target is the call
    two = tool_conv(Message("user", "both"),
                    Message("assistant", "", tool_calls=(call("get_weather", {"city": "Oslo"}, "a"),
                                                         call("set_timer", '{"minutes": 5}', "b"))),
                    Message("tool", "t2", tool_call_id="b"), Message("tool", "t1", tool_call_id="a"),
                    Message("assistant", "done"))
    assert findings_of(two) == []


@pytest.mark.parametrize("conv,rule,words", [
    (weather_conv('{"city": "Paris",}'), "tool_arguments", "message 2 (assistant): call 'get_weather': arguments are not valid JSON"),
    (weather_conv("[1, 2]"), "tool_arguments", "arguments are a JSON array, not an object"),
    (tool_conv(Message("user", "u"), Message("assistant", "", tool_calls=(call("get_news", {}),))),
     "tool_unknown_function", "call 'get_news': not one of the record's tools (get_weather, set_timer)"),
    (Conversation([Message("user", "u"), Message("assistant", "", tool_calls=(call("get_weather", {"city": "x"}),))]),
     "tool_unknown_function", "the record offers no tools"),
    (weather_conv({"town": "Paris"}), "tool_schema", "unknown argument 'town'"),
    (weather_conv({"unit": "celsius"}), "tool_schema", "missing required argument 'city'"),
    (tool_conv(Message("user", "u"), Message("tool", "42"), Message("assistant", "a")),
     "tool_orphan_result", "message 2 (tool): a tool result, but no assistant tool call comes before it"),
    (tool_conv(Message("user", "u"), Message("assistant", "", tool_calls=(call("get_weather", {"city": "x"}),)),
               Message("tool", "42", tool_call_id="call_9"), Message("assistant", "a")),
     "tool_orphan_result+tool_unanswered", "tool_call_id 'call_9' matches no open call"),
    (tool_conv(Message("user", "u"), Message("assistant", "", tool_calls=(call("get_weather", {"city": "x"}),)),
               Message("user", "never mind"), Message("assistant", "ok")),
     "tool_unanswered", "message 2 (assistant): call 'get_weather' gets no tool result before the user turn at message 3"),
    (tool_conv(Message("user", "u"), Message("assistant", "<think>hmm"), Message("user", "u2"), Message("assistant", "b")),
     "reasoning_unclosed", "message 2 (assistant): a <think> is never closed"),
    (tool_conv(Message("user", "u"), Message("assistant", "done</think> ok")),
     "reasoning_unclosed", "a </think> with no <think> before it"),
    (tool_conv(Message("user", "<think>plan</think> hi"), Message("assistant", "a")),
     "reasoning_in_user", "message 1 (user): holds </think>/<think> tags"),
])
def test_each_problem_is_one_finding_with_file_line_and_a_fix(conv, rule, words):
    found = findings_of(conv)
    assert [f.rule for f in found] == rule.split("+")  # a wrong id also leaves the call unanswered
    f, rule = found[0], found[0].rule
    assert f.where == "data.jsonl:1" or (f.where == "<memory>" and rule == "tool_unknown_function")
    assert words in f.message, f.message
    assert f.severity == CHECKS[rule][0] and f.fixes and f.fixes[0]


def test_reasoning_share_counts_inline_and_separate_reasoning():
    conv = tool_conv(Message("user", "a"), Message("assistant", "<think>x</think>y"), Message("user", "b"),
                     Message("assistant", "z", reasoning="because"), Message("user", "c"), Message("assistant", "w"))
    assert reasoning_checks(conv, []) == (3, 2)


def test_template_that_ignores_tools_and_calls_is_named():
    chatml = ChatTemplate("chatml", BUILTIN["chatml"][0], "<|im_end|>", {})
    convs = [Conversation([Message("user", "plain"), Message("assistant", "a")], source="d.jsonl", line=1),
             weather_conv(line=2)]
    found = []
    template_tool_check(convs, chatml, found)
    assert [(f.rule, f.where) for f in found] == [("template_tools", "data.jsonl:2")] * 2
    assert "ignores the record's tools" in found[0].message
    assert "ignores tool_calls: message 2's call renders without 'get_weather'" in found[1].message
    assert "--set template=" in found[0].fixes[0]


def test_template_that_renders_tools_and_calls_passes():
    hermes = ChatTemplate("hermes", HERMES, "<|im_end|>", {})
    found = []
    template_tool_check([weather_conv(city="Zürich <it's>")], hermes, found)
    assert found == []
    text = hermes.render(weather_conv().messages, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in text


def test_doctor_on_a_file_names_lines_and_exits_2(tmp_path, capsys):
    import json

    from sftlab.cli import main
    from sftlab.data.doctor import run_doctor

    def rec(call_args, *, answered=True):
        msgs = [{"role": "user", "content": f"weather? {call_args}"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                                    "function": {"name": "get_weather", "arguments": call_args}}]}]
        if answered:
            msgs += [{"role": "tool", "tool_call_id": "c1", "content": "21"}, {"role": "assistant", "content": "21 degrees."}]
        return {"messages": msgs, "tools": TOOLS}

    rows = [rec({"city": "Paris"}), rec({"town": "Oslo"}), rec('{"city": "Rome"}'),
            {"messages": [{"role": "user", "content": "<think>x</think> hi"}, {"role": "assistant", "content": "a"}]}]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_doctor(path)
    assert [(f.rule, f.where) for f in res.findings] == [("tool_schema", f"{path}:2"), ("reasoning_in_user", f"{path}:4")]
    assert res.stats["tools"]["tool_calls"] == 3 and res.stats["tools"]["examples_with_tools"] == 3
    assert main(["doctor", str(path)]) == 1  # warnings only
    out = capsys.readouterr().out
    assert "unknown argument 'town'" in out and "tools: 3 examples offer tools; 3 calls, 3 tool results" in out


def test_records_the_loader_rejects_are_errors_under_the_tool_and_reasoning_rule_names(tmp_path):
    """A record that cannot be read (bad JSON arguments, a call with no name, an unclosed <think>, a result
    with no call, a call the user answers instead of a tool) is named by the rule that says what is
    wrong, as an error with file:line and the loader's fix, not under the generic 'fields' rule."""
    import json

    from sftlab.data.doctor import run_doctor

    def asst_call(fn):
        return {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": fn}]}

    user = {"role": "user", "content": "weather?"}
    result = {"role": "tool", "tool_call_id": "c1", "content": "21"}
    done = {"role": "assistant", "content": "21 degrees."}
    rows = [
        {"messages": [user, asst_call({"name": "get_weather", "arguments": "{city: Paris}"}), result, done], "tools": TOOLS},
        {"messages": [user, asst_call({"arguments": {"city": "Paris"}}), result, done], "tools": TOOLS},
        {"messages": [user, {"role": "assistant", "content": "<think>hmm, the answer is 4"}]},
        {"messages": [user, result, done], "tools": TOOLS},
        {"messages": [user, asst_call({"name": "get_weather", "arguments": {"city": "Paris"}}),
                      {"role": "user", "content": "well?"}, done], "tools": TOOLS},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_doctor(path)
    got = [(f.rule, f.severity, f.where) for f in res.findings]
    assert got == [("tool_arguments", "error", f"{path}:1"), ("tool_arguments", "error", f"{path}:2"),
                   ("reasoning_unclosed", "error", f"{path}:3"), ("tool_orphan_result", "error", f"{path}:4"),
                   ("tool_unanswered", "error", f"{path}:5")]
    first = res.findings[0]
    assert "not valid JSON" in first.message and first.fixes and "JSON object" in first.fixes[0]
    assert "</think>" in res.findings[2].fixes[0]


def test_a_deepseek_r1_reply_with_no_opening_think_is_a_note_not_an_error(tmp_path, capsys):
    """A reply whose first think tag is </think> (DeepSeek-R1's raw output: its prompt opens <think>) is read
    as reasoning by prepare, so the doctor says so (info) instead of calling the tag stray (an error); a
    second </think> after it still closes nothing, an error in both."""
    import json

    from sftlab.cli import main
    from sftlab.data.doctor import run_doctor

    def rec(reply):
        return {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": reply}]}

    path = tmp_path / "r1.jsonl"
    path.write_text("".join(json.dumps(rec(r)) + "\n" for r in ("add them\n</think>\n\n4", "add\n</think>\n\n4</think>5",
                                                                "<think>add</think>4</think>5")))
    res = run_doctor(path)
    got = [(f.rule, f.severity, f.where) for f in res.findings]
    assert got == [("reasoning_unopened", "info", f"{path}:1"), ("reasoning_unclosed", "error", f"{path}:2"),
                   ("reasoning_unclosed", "error", f"{path}:3")]
    assert "the text before its </think> is read as reasoning" in res.findings[0].message
    assert "a stray </think> after its reasoning (it closes no <think>)" in res.findings[1].message
    assert res.stats["tools"]["turns_with_reasoning"] == 1
    path.write_text(json.dumps(rec("add them\n</think>\n\n4")) + "\n")
    assert main(["doctor", str(path)]) == 0  # a note: no error, no warning
    out = capsys.readouterr().out
    assert "[info] reasoning_unopened" in out and "verdict: clean (1 note) (exit 0)" in out


def test_a_result_id_no_call_has_is_one_error_in_the_doctor_and_refused_by_prepare(tmp_path):
    """The doctor and prepare share the rule (sftlab.data.roles): the record is one error, named once."""
    import json

    from sftlab.core.errors import SftlabError
    from sftlab.data.doctor import run_doctor
    from sftlab.data.formats import load_conversations

    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                                "function": {"name": "get_weather", "arguments": {}}}]},
            {"role": "tool", "tool_call_id": "c9", "content": "21"}, {"role": "assistant", "content": "21 degrees."}]
    path = tmp_path / "orphan.jsonl"
    path.write_text(json.dumps({"messages": msgs, "tools": TOOLS}) + "\n")
    res = run_doctor(path)
    assert [(f.rule, f.severity, f.where) for f in res.findings] == [("tool_orphan_result", "error", f"{path}:1")]
    with pytest.raises(SftlabError, match=rf"{path}:1: message 3 \(tool\): .*'c9' matches no open call"):
        load_conversations(str(path))


@pytest.mark.parametrize("order, warned", [(("call_1", "call_2"), False), (("call_2", "call_1"), True)])
def test_tool_results_out_of_call_order_are_a_warning(order, warned):
    """Most templates (chatml-tools) render results without their ids, in the order given: answered out of
    call order, the model reads Rome's result as the one for Paris."""
    calls = (call("get_weather", {"city": "Paris"}, "call_1"), call("get_weather", {"city": "Rome"}, "call_2"))
    results = [Message("tool", {"call_1": "sun", "call_2": "rain"}[i], tool_call_id=i) for i in order]
    conv = tool_conv(Message("user", "Paris and Rome?"), Message("assistant", "", tool_calls=calls), *results,
                     Message("assistant", "Sun in Paris, rain in Rome."))
    found = [(f.rule, f.severity, f.message) for f in findings_of(conv)]
    assert found == ([("tool_result_order", "warning", "message 3 (tool): answers call 'call_2' (get_weather) of message 2 "
                       "before call 'call_1' (get_weather); a template that does not render tool_call_id (chatml-tools, "
                       "most) shows the results in this order, pairing them with the wrong calls")] if warned else [])
