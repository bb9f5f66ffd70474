"""Parsing generated tool calls in the four dialects, checking them against schemas, and the
valid-tool-call metric in the generation summary."""

from __future__ import annotations

import pytest
from tool_data import HERMES, TOOLS, call, tool_conv, weather_conv

from sftlab.data.reasoning import split_reasoning
from sftlab.data.roles import FormatError
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Conversation, Message
from sftlab.eval.generation import (
    Generation,
    reference_reply,
    render_prompt,
    split_reply,
)
from sftlab.eval.run import score_generations, tool_refs
from sftlab.eval.tool_calls import (
    check_tool_calls,
    expected_calls,
    parse_tool_calls,
    same_calls,
    typed_value,
)

PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
# Qwen3-Coder's XML form, as its chat template renders a call
XML_PARIS = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
             "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>")


@pytest.mark.parametrize("text,dialect,calls,content", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "hermes", [PARIS], ""),
    ('Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
     '<tool_call>{"name": "set_timer", "arguments": {"minutes": 5}}</tool_call>', "hermes",
     [PARIS, {"name": "set_timer", "arguments": {"minutes": 5}}], "Let me check."),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "mistral", [PARIS], ""),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "mistral", [PARIS], ""),
    ('[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Paris"}', "mistral", [PARIS], ""),
    ('Two calls.[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Paris"}'
     '[TOOL_CALLS]set_timer[CALL_ID]k9Lm2Np4Q[ARGS]{"minutes": 5}', "mistral",
     [PARIS, {"name": "set_timer", "arguments": {"minutes": 5}}], "Two calls."),
    (XML_PARIS, "qwen3_coder", [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}], ""),
    # values stay raw text until checked against the schema; one newline each side is the template's
    ("Let me check.\n<tool_call>\n<function=set_timer>\n<parameter=minutes>\n5\n</parameter>\n"
     "<parameter=label>\n\n  tea \n\n</parameter>\n</function>\n<function=get_weather>\n"
     "<parameter=city>Paris</parameter>\n</function>\n</tool_call>", "qwen3_coder",
     [{"name": "set_timer", "arguments": {"minutes": "5", "label": "\n  tea \n"}}, PARIS], "Let me check."),
    ("<tool_call><function=get_weather></function></tool_call>\n<tool_call>\n<function=set_timer>\n"
     "<parameter=minutes>\n5\n</parameter>\n</function>\n</tool_call>", "qwen3_coder",
     [{"name": "get_weather", "arguments": {}}, {"name": "set_timer", "arguments": {"minutes": "5"}}], ""),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "json", [PARIS], ""),
    ('  {"name": "get_weather", "parameters": {"city": "Paris"}}\n', "json", [PARIS], ""),
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', "json", [PARIS], ""),
    ('{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}', "json",
     [{"name": "get_weather", "arguments": '{"city": "Paris"}'}], ""),
])
def test_parse_each_dialect(text, dialect, calls, content):
    p = parse_tool_calls(text)
    assert (p.dialect, p.calls, p.error, p.content) == (dialect, calls, None, content)


@pytest.mark.parametrize("text,error", [
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Par', "a <tool_call> block is never closed"),
    ("<tool_call>{name: get_weather}</tool_call>", "a <tool_call> block is not JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'a call lacks a "name"'),
    ('<tool_call>{"name": "f"} trailing</tool_call>', "text after the JSON"),
    ("[TOOL_CALLS]get_weather[ARGS]{oops", "the [TOOL_CALLS] arguments are not JSON"),
    ("[TOOL_CALLS] hello", "followed by neither"),
    ('[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ{"city": "Paris"}', "followed by neither"),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
     "<function=get_weather> is never closed (no </function>)"),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
     "<parameter=city> in <function=get_weather> is never closed (no </parameter> before </function>)"),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=unit>\ncelsius\n</parameter>\n"
     "</function>\n</tool_call>",
     "<parameter=city> in <function=get_weather> is never closed (no </parameter> before the next <parameter=)"),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", "a <tool_call> block is never closed"),
    ("<tool_call>\n<function=get_weather>\nParis\n</function>\n</tool_call>",
     "<function=get_weather> holds text outside its <parameter=...> tags"),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=city>\nOslo\n"
     "</parameter>\n</function>\n</tool_call>", "<function=get_weather> has a <parameter=city> twice"),
    ("<tool_call>\n<function=>\n</function>\n</tool_call>", "a <function=> has no name"),
    ("<tool_call>\n<function=get_weather>\n</function>\nsee above\n</tool_call>",
     "text outside <function=...> inside a <tool_call> block"),
    (XML_PARIS + '<tool_call>{"name": "set_timer", "arguments": {"minutes": 5}}</tool_call>',
     "the <tool_call> blocks mix JSON and <function=...> calls"),
])
def test_broken_calls_say_why(text, error):
    p = parse_tool_calls(text)
    assert p.calls == [] and p.error and error in p.error


@pytest.mark.parametrize("text", ["It is sunny in Paris.", '{"answer": 42}', '{"name": "Alice", "age": 3}', "[1, 2]", "", "{not json"])
def test_plain_text_and_other_json_are_no_call(text):
    p = parse_tool_calls(text)
    assert (p.calls, p.dialect, p.error) == ([], None, None)


@pytest.mark.parametrize("text,valid,why", [
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>', True, None),
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', True, None),
    ("It is sunny.", False, "no tool call in the reply"),
    ('<tool_call>{"name": "get_news", "arguments": {}}</tool_call>', False, "not one of the tools (get_weather, set_timer)"),
    ('<tool_call>{"name": "get_weather", "arguments": {"town": "Oslo"}}</tool_call>', False, "unknown argument 'town'"),
    ('<tool_call>{"name": "set_timer", "arguments": {"minutes": "five"}}</tool_call>', False,
     "argument 'minutes' is \"five\" but the schema wants integer"),
    ('<tool_call>{"name": "set_timer", "arguments": "{bad"}</tool_call>', False, "arguments are not valid JSON"),
    ('<tool_call>{"name": "set_timer", "arguments": {"minutes": 1}}</tool_call><tool_call>{"name": "x"}</tool_call>',
     False, "call 'x': not one of the tools"),
])
def test_check_against_the_schemas(text, valid, why):
    res = check_tool_calls(text, TOOLS)
    assert res.valid is valid
    assert (why is None and res.why is None) or (why in res.why)


def _xml(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}, "limit": {"type": "integer"}, "score": {"type": ["number", "null"]},
    "exact": {"type": "boolean"}, "filters": {"type": "object"}, "tags": {"type": "array"}, "any": {}}}}}


def test_qwen3_coder_values_are_typed_by_the_schema():
    """The XML form writes every value as text; Qwen3-Coder's parser types it by the function's schema."""
    text = _xml("search", query="42", limit="10", score="0.5", exact="True", filters='{"lang": "en"}',
                tags='["a", "b"]', any="[1, 2]")
    res = check_tool_calls(text, [SEARCH])
    assert (res.valid, res.why, res.dialect) == (True, None, "qwen3_coder")
    assert res.calls == [{"name": "search", "arguments": {"query": "42", "limit": 10, "score": 0.5, "exact": True,
                                                           "filters": {"lang": "en"}, "tags": ["a", "b"],
                                                           "any": [1, 2]}}]
    assert check_tool_calls(_xml("set_timer", minutes="5", label="tea"), TOOLS).calls == [
        {"name": "set_timer", "arguments": {"minutes": 5, "label": "tea"}}]
    # text that does not convert stays text, and the schema check says so
    for params, why in [({"limit": "ten"}, "argument 'limit' is \"ten\" but the schema wants integer"),
                        ({"exact": "yes"}, "argument 'exact' is \"yes\" but the schema wants boolean"),
                        ({"filters": "{lang: en}"}, "argument 'filters' is \"{lang: en}\" but the schema wants object"),
                        ({"limit": "NaN"}, "argument 'limit' is \"NaN\" but the schema wants integer")]:
        res = check_tool_calls(_xml("search", **params), [SEARCH])
        assert not res.valid and why in res.why, res.why
    assert typed_value("null", {"type": "integer"}) is None
    assert typed_value("celsius", {"enum": ["celsius"]}) == "celsius" and typed_value("3", None) == 3
    assert typed_value(" 7 ", {"type": "number"}) == 7 and typed_value("false", {"type": "boolean"}) is False
    assert typed_value("true", {"type": "string"}) == "true" and typed_value("1e999", {"type": "number"}) == "1e999"
    assert typed_value("1" + "0" * 400, {"type": "integer"}) == 10 ** 400


def test_a_qwen3_coder_call_matches_the_openai_reference():
    """A correct XML call is the reference call once its values are typed: valid and a match."""
    conv = weather_conv(answered=False)  # the reference: an OpenAI-format call, arguments a dict
    timer = tool_conv(Message("user", "Tea timer"),
                      Message("assistant", "", tool_calls=(call("set_timer", '{"minutes": 5, "label": "tea"}'),)))
    replies = [XML_PARIS, _xml("set_timer", minutes="5", label="tea"), _xml("get_weather", city="Oslo"),
               XML_PARIS.replace("</function>", "")]
    gens = [Generation(r, True, 9, [1], raw=r) for r in replies]
    convs = [conv, timer, conv, conv]
    summary, rows = score_generations(gens, [reference_reply(c) for c in convs], tool_refs=tool_refs(convs))
    assert [r["tool_call"]["match"] for r in rows] == [True, True, False, False]
    assert [r["tool_call"]["valid"] for r in rows] == [True, True, True, False]
    assert rows[0]["tool_call"]["calls"] == [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]
    assert rows[3]["tool_call"]["why"] == "<function=get_weather> is never closed (no </function>)"
    assert summary["tool_call_match_rate"] == 0.5 and summary["valid_tool_call_rate"] == 0.75
    mistral = '[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Paris", "unit": "celsius"}'
    summary, _ = score_generations([Generation(mistral, True, 9, [1], raw=mistral)], [reference_reply(conv)],
                                   tool_refs=tool_refs([conv]))
    assert summary["tool_call_match_rate"] == 1.0


def test_no_tools_offered_means_no_valid_call():
    assert not check_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "x"}}</tool_call>', None).valid


def test_same_calls_compares_json_values_in_any_order():
    a = [{"name": "f", "arguments": {"n": 34}}, {"name": "g", "arguments": {}}]
    assert same_calls(a, [{"name": "g", "arguments": {}}, {"name": "f", "arguments": {"n": 34.0}}])
    assert not same_calls(a, [{"name": "f", "arguments": {"n": 35}}, {"name": "g", "arguments": {}}])
    assert not same_calls([{"name": "f", "arguments": {"b": True}}], [{"name": "f", "arguments": {"b": 1}}])
    assert not same_calls(a, a[:1])


def test_reference_of_a_call_turn_and_the_prompt_with_tools():
    conv = weather_conv(answered=False)
    assert reference_reply(conv) == '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]'
    assert expected_calls(conv.messages[-1].tool_calls) == [{"name": "get_weather",
                                                             "arguments": {"city": "Paris", "unit": "celsius"}}]
    prompt = render_prompt(ChatTemplate("hermes", HERMES, "<|im_end|>", {}), conv)
    assert '"name": "set_timer"' in prompt and prompt.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                                                                  "<|im_start|>assistant\n")


def test_valid_tool_call_rate_in_the_summary():
    convs = [weather_conv(answered=False, city=c) for c in ("Paris", "Oslo", "Rome")]
    convs.append(Conversation([Message("user", "hi"), Message("assistant", "hello")]))
    replies = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>',
               '<tool_call>{"name": "get_weather", "arguments": {"city": "Bergen"}}</tool_call>',  # valid, wrong city
               "I can not check the weather.",
               "hello"]
    gens = [Generation(r, True, 3, [1, 2, 3]) for r in replies]
    summary, rows = score_generations(gens, [reference_reply(c) for c in convs], tool_refs=tool_refs(convs))
    assert summary["n_tool_calls_expected"] == 3
    assert summary["valid_tool_call_rate"] == pytest.approx(2 / 3)
    assert summary["tool_call_match_rate"] == pytest.approx(1 / 3)
    assert [r["score"] for r in rows] == [1.0, 0.0, 0.0, 1.0]  # the plain reply is scored by `exact`
    assert rows[2]["tool_call"]["why"] == "no tool call in the reply"
    assert summary["format_adherence"] == pytest.approx(3 / 4)


def test_the_raw_text_is_parsed_when_the_call_marker_is_a_special_token():
    conv = weather_conv(answered=False)
    body = '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]'
    gen = Generation(body, True, 3, [1], raw="[TOOL_CALLS]" + body)
    summary, _ = score_generations([gen], [reference_reply(conv)], tool_refs=tool_refs([conv]))
    assert summary["valid_tool_call_rate"] == 1.0 and summary["tool_call_match_rate"] == 1.0


def test_no_tool_metrics_without_call_references():
    conv = Conversation([Message("user", "hi"), Message("assistant", "hello")], tools=TOOLS)
    summary, _ = score_generations([Generation("hello", True, 1)], ["hello"], tool_refs=tool_refs([conv]))
    assert "valid_tool_call_rate" not in summary and summary["task_score"] == 1.0
    assert call("f", {})["function"] == {"name": "f", "arguments": {}}


def test_evaluate_renders_tools_and_reports_the_rate(tiny_model_dir):
    from sftlab.eval.generation import GenerationSettings
    from sftlab.eval.run import evaluate
    from sftlab.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu", tokenizer=tok)
    tpl = ChatTemplate("hermes", HERMES, "<|im_end|>", {"eos_token": tok.eos_token})
    convs = [weather_conv(answered=False, city=c) for c in ("Paris", "Oslo")]
    res = evaluate(model, tok, tpl, convs, settings=GenerationSettings(max_new_tokens=4), max_seq_length=512)
    mt = res["metrics"]
    assert mt["n_tool_calls_expected"] == 2 and 0.0 <= mt["valid_tool_call_rate"] <= mt["format_adherence"] <= 1.0
    assert res["format_check"] == "tool_call"
    # every reference calls a tool: the task score is the call match, not the text scorer "exact"
    from sftlab.eval.compare import format_result

    assert res["task_score_by"] == "tool_call_match" and res["scorer"] is None
    assert "task score (tool_call_match)" in format_result(res) and "(exact)" not in format_result(res)
    mixed = evaluate(model, tok, tpl, [*convs, Conversation([Message("user", "hi"), Message("assistant", "hello")])],
                     settings=GenerationSettings(max_new_tokens=2), max_seq_length=512)
    assert mixed["task_score_by"] == "exact+tool_call_match"
    assert "<tools>" in res["samples"][0]["prompt_text"] and res["samples"][0]["tool_call"]["valid"] is False


def test_a_reply_that_reasons_first_is_scored_on_its_answer():
    """A model trained on reasoning writes <think>...</think> before its answer; the reference holds the
    answer alone. Scored on the whole text, a right answer scored 0 and its JSON failed the format check,
    and reasoning that mentions <tool_call> made a right call invalid."""
    plain = [Conversation([Message("user", "2+2?"), Message("assistant", "4", reasoning="2 and 2 make 4")]),
             Conversation([Message("user", "json"), Message("assistant", '{"a": 1}', reasoning="fields")])]
    gens = [Generation("<think>\n2 and 2 make 4\n</think>\n\n4", True, 9, [1]),
            Generation('<think>\nfields\n</think>\n\n{"a": 1}', True, 9, [1])]
    summary, rows = score_generations(gens[:1], [reference_reply(plain[0])])
    assert summary["task_score"] == 1.0 and rows[0]["answer"] == "4" and rows[0]["reasoning"] == "2 and 2 make 4"
    summary, _ = score_generations(gens[1:], [reference_reply(plain[1])], scorer="json_fields")
    assert summary["task_score"] == 1.0 and summary["format_adherence"] == 1.0
    conv = weather_conv(answered=False)
    text = ('<think>\nI answer with <tool_call> tags.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    llama = '<think>\nok\n</think>\n\n{"name": "get_weather", "parameters": {"unit": "celsius", "city": "Paris"}}'
    summary, rows = score_generations([Generation(text, True, 9, [1], raw=text), Generation(llama, True, 9, [1])],
                                      [reference_reply(conv)] * 2, tool_refs=tool_refs([conv, conv]))
    assert summary["valid_tool_call_rate"] == 1.0 and summary["tool_call_match_rate"] == 1.0, rows
    # the prompt opened the block (R1-style): only </think> is generated; a block never closed has no answer
    assert split_reply("hm\n</think>\n\n4") == ("4", "hm")
    assert split_reply("<think>\nstill thinking") == ("", "still thinking")
    assert split_reply("no reasoning") == ("no reasoning", None)
    # Qwen3 trains an empty <think> block before every answer of data without reasoning: scored on the answer
    summary, _ = score_generations([Generation("<think>\n\n</think>\n\nHello!", True, 5, [1])], ["Hello!"])
    assert summary["task_score"] == 1.0


def test_eval_per_source_lines_give_each_sources_tool_call_rates(tiny_model_dir, tmp_path, capsys):
    """With several --data sources, a source of tool-calling conversations has its valid tool call and
    tool call match rates (over its call turns) in its per-source line; a plain source has none."""
    import json

    from conftest import chat_data, make_lora_run
    from tool_data import TOOLS

    from sftlab.cli import main

    run = make_lora_run(tmp_path / "run", tiny_model_dir, template="chatml-tools")
    calls = tmp_path / "calls.jsonl"
    calls.write_text("".join(json.dumps({"tools": TOOLS, "messages": [
        {"role": "user", "content": f"weather in {c}?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": c}}}]}]}) + "\n" for c in ("Oslo", "Lima", "Rome")))
    plain = chat_data(tmp_path / "plain.jsonl", 2)
    assert main(["eval", str(run), "--data", str(calls), "--data", plain, "--max-new-tokens", "4", "--json"]) == 0
    sources = json.loads(capsys.readouterr().out)["result"]["sources"]
    assert sources["calls"]["n_tool_calls_expected"] == 3 and 0 <= sources["calls"]["valid_tool_call_rate"] <= 1
    assert "valid_tool_call_rate" not in sources["plain"]
    assert main(["eval", str(run), "--data", str(calls), "--data", plain, "--max-new-tokens", "4"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  calls:") or x.startswith("  plain:")]
    assert "valid_tool_call" in lines[0] and "(3 call turns)" in lines[0] and "valid_tool_call" not in lines[1]


def test_think_tags_a_tokenizer_makes_special_survive_decoding(tiny_model_dir, tmp_path):
    """Some reasoning models' tokenizers make <think> and </think> special tokens: decoded with special
    tokens skipped, the reply lost its tags and its reasoning was scored as the answer."""
    from transformers import AutoTokenizer

    from sftlab.eval.generation import decode_reply, split_reply

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = "<think>\nadd them\n</think>\n\n42"
    plain_ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert decode_reply(tok, plain_ids) == text  # tags as plain text: as before
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert tok.convert_tokens_to_ids("<think>") in ids and "<think>" not in tok.decode(ids, skip_special_tokens=True)
    assert decode_reply(tok, ids) == text and split_reply(decode_reply(tok, ids)) == ("42", "add them")


@pytest.mark.parametrize("text, answer, reasoning", [
    ("a</think>b<think>c</think>d", "b<think>c</think>d", "a"),  # first tag </think>: R1, though a <think> follows
    ("a</think>b</think>c", "b</think>c", "a"),  # a second </think> stays in the answer (training refuses it)
    ("x <think>y</think> z", "x <think>y</think> z", None),  # a block mid-reply is not reasoning
    ("  <think>r</think>\n\na", "a", "r"),
    ("</think>a", "a", ""),
    ("<think>a<think>b</think>c", "c", "a<think>b"),  # nested: cut at the first </think>, as training reads it
])
def test_split_reply_finds_reasoning_by_training_rule(text, answer, reasoning):
    """Training reads a reply whose FIRST think tag is </think> as R1-style; split_reply asked for no <think>
    anywhere, so a reply that thinks again after its first </think> was scored with its reasoning in the answer.
    Where training accepts the text, both split it the same (the answer as scored: leading space trimmed)."""
    assert split_reply(text) == (answer, reasoning)
    try:
        trained = split_reasoning(text, "reply")
    except FormatError:
        return
    assert (trained[0].lstrip(), trained[1]) == (answer, reasoning)
