"""Every reply metric, task scorer and the before/after comparison against hand-computed values."""

from __future__ import annotations

import math

import pytest

from sftlab.core.errors import SftlabError
from sftlab.eval import metrics as m
from sftlab.eval.compare import compare, forgetting, format_comparison
from sftlab.eval.generation import Generation
from sftlab.eval.run import ToolRef, score_generations
from sftlab.eval.scorers import choose_scorer, format_check_name, format_ok, get_scorer


def test_nonempty_and_words():
    assert m.is_nonempty("x")
    assert not m.is_nonempty("  \n\t")
    assert not m.is_nonempty("")
    assert m.words(" a  b\nc ") == ["a", "b", "c"]


def test_ngrams():
    assert m.ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert m.ngrams(["a"], 2) == []
    with pytest.raises(ValueError):
        m.ngrams(["a"], 0)


def test_repetition_rate_hand_computed():
    # bigrams of "a b c a b c": ab bc ca ab bc -> 5 total, 3 distinct -> 1 - 3/5
    assert m.repetition_rate("a b c a b c", n=2) == pytest.approx(0.4)
    # trigrams of "x x x x x": 3 total, 1 distinct -> 2/3
    assert m.repetition_rate("x x x x x", n=3) == pytest.approx(2 / 3)
    assert m.repetition_rate("one two three four", n=3) == 0.0
    assert m.repetition_rate("too short", n=3) == 0.0
    assert m.repetition_rate("", n=3) == 0.0
    # token ids (seq-rep-4): 4-grams 1234 2341 3412 4123 1234 -> 5 total, 4 distinct -> 0.2
    assert m.repetition_rate([1, 2, 3, 4, 1, 2, 3, 4], n=4) == pytest.approx(0.2)
    assert m.repetition_rate([7, 7, 7], n=4) == 0.0


def test_distinct_n_hand_computed():
    # bigrams: (a b) (b a) | (a b) -> 3 total, 2 distinct
    assert m.distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)
    assert m.distinct_n(["x"], 2) == 0.0


def test_mean():
    assert m.mean([1, 2, 6]) == 3.0
    assert m.mean([]) == 0.0


def test_exact_match():
    assert m.exact_match("  Paris \n", "Paris")
    assert m.exact_match("the  big\ncat", "the big cat")
    assert not m.exact_match("paris", "Paris")
    assert m.exact_match("paris", "Paris", ignore_case=True)
    assert not m.exact_match("Paris.", "Paris")


def test_contains():
    assert m.contains("The capital is PARIS.", "paris")
    assert not m.contains("The capital is Lyon.", "paris")
    assert not m.contains("anything", "   ")
    assert not m.contains("PARIS", "paris", ignore_case=False)


def test_regex_match():
    assert m.regex_match("answer: 42", r"\d+")
    assert not m.regex_match("answer: forty-two", r"\d+")
    assert not m.regex_match("x 42", r"^\d+$")


def test_valid_json_and_object():
    assert m.valid_json('{"a": 1}')
    assert m.valid_json("  [1, 2]\n")
    assert m.valid_json("3")
    assert not m.valid_json('{"a": 1} trailing')
    assert not m.valid_json("")
    assert m.is_json_object(' {"a": 1} ')
    assert not m.is_json_object("[1]")
    assert not m.is_json_object('{"a": 1}{"b": 2}')


def test_json_fields_hand_computed():
    ref = '{"name": "Maria Lopez", "age": 34, "city": "Berlin"}'
    assert m.json_fields('{"name": "Maria Lopez", "age": 34, "city": "Berlin"}', ref) == (3, 3)
    assert m.json_fields('{"name": "Maria  Lopez ", "age": 34.0, "city": "Paris", "x": 1}', ref) == (2, 3)
    assert m.json_fields('{"name": "Maria Lopez"}', ref) == (1, 3)
    assert m.json_fields("not json", ref) == (0, 3)
    assert m.json_fields("[1, 2]", ref) == (0, 3)
    assert m.json_fields_score('{"age": 34}', ref) == pytest.approx(1 / 3)
    # booleans equal only booleans (True == 1 in Python, not in JSON)
    assert m.json_fields('{"ok": 1}', '{"ok": true}') == (0, 1)
    assert m.json_fields('{"ok": true}', '{"ok": true}') == (1, 1)
    assert m.json_fields_score("{}", "{}") == 1.0
    with pytest.raises(ValueError):
        m.json_fields("{}", "plain text")


def test_scorers_by_name():
    assert get_scorer("exact")(" a ", "a") == 1.0
    assert get_scorer("contains")("it is Paris", "paris") == 1.0
    assert get_scorer("regex")("order 123", r"order \d+") == 1.0
    assert get_scorer("regex:^\\{")("{x", "ignored") == 1.0
    assert get_scorer("regex:^\\{")("x{", "ignored") == 0.0
    assert get_scorer("json_valid")("[1]", "whatever") == 1.0
    assert get_scorer("json_fields")('{"a": 1, "b": 3}', '{"a": 1, "b": 2}') == 0.5
    with pytest.raises(SftlabError, match="unknown scorer"):
        get_scorer("bleu")
    with pytest.raises(SftlabError, match="not a valid regular expression"):
        get_scorer("regex:(")
    with pytest.raises(SftlabError, match="JSON-object reference"):
        get_scorer("json_fields")("{}", "plain")


def test_choose_scorer_and_format_check():
    objs = ['{"a": 1}', ' {"b": "x"} ']
    assert choose_scorer(objs) == "json_fields"
    assert format_check_name(objs) == "json_object"
    assert choose_scorer(["[1]", '{"a": 1}']) == "exact"
    assert format_check_name(["[1]", '{"a": 1}']) == "json"
    assert choose_scorer(["Paris", '{"a": 1}']) == "exact"
    assert format_check_name(["Paris"]) == "finished"
    assert choose_scorer(objs, "contains") == "contains"
    with pytest.raises(SftlabError):
        choose_scorer(objs, "nope")


def test_format_ok():
    assert format_ok("json_object", '{"a": 1}', finished=False)
    assert not format_ok("json_object", "[1]", finished=True)
    assert format_ok("json", "[1]", finished=True)
    assert format_ok("finished", "hi", finished=True)
    assert not format_ok("finished", "hi", finished=False)
    assert not format_ok("finished", " ", finished=True)


def test_score_generations_hand_computed():
    gens = [Generation('{"a": 1, "b": 2}', True, 9), Generation('{"a": 1}', True, 5),
            Generation("oops oops oops oops", False, 12), Generation("", True, 0)]
    refs = ['{"a": 1, "b": 2}'] * 4
    summary, rows = score_generations(gens, refs)
    assert summary["n"] == 4
    assert summary["task_score"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert summary["format_adherence"] == pytest.approx(2 / 4)
    assert summary["nonempty_rate"] == pytest.approx(3 / 4)
    assert summary["finished_rate"] == pytest.approx(3 / 4)
    assert summary["mean_reply_tokens"] == pytest.approx((9 + 5 + 12 + 0) / 4)
    assert summary["mean_reply_words"] == pytest.approx((4 + 2 + 4 + 0) / 4)
    # "oops oops oops oops": trigrams 2 total, 1 distinct -> 0.5; the others have no repeats
    assert summary["repetition_rate"] == pytest.approx(0.5 / 4)
    assert [r["score"] for r in rows] == [1.0, 0.5, 0.0, 0.0]
    # with token ids the repetition is over token 4-grams: 9 x the same id -> 6 grams, 1 distinct
    summary, _ = score_generations([Generation("ParParPar", False, 9, [5] * 9)], ['{"a": 1}'])
    assert summary["repetition_rate"] == pytest.approx(5 / 6)


def test_forgetting():
    f = forgetting(2.0, 2.3, threshold=0.1)
    assert f["delta"] == pytest.approx(0.3) and f["relative"] == pytest.approx(0.15) and f["flagged"]
    assert not forgetting(2.0, 2.1, threshold=0.1)["flagged"]
    assert not forgetting(2.0, 1.5)["flagged"]
    assert forgetting(2.0, float("nan"))["flagged"]
    assert forgetting(None, 2.0) is None


def test_compare_table():
    before = {"metrics": {"loss": 2.0, "task_score": 0.2, "general_loss": 1.0, "mean_reply_tokens": 30.0},
              "samples": [{"prompt": "p", "reference": "r", "reply": "b", "score": 0.0}]}
    after = {"metrics": {"loss": 1.5, "task_score": 0.1, "general_loss": 1.2, "mean_reply_tokens": 20.0},
             "samples": [{"prompt": "p", "reference": "r", "reply": "a", "score": 1.0, "where": "f:1"}]}
    cmp = compare(before, after, threshold=0.1)
    rows = {r["metric"]: r for r in cmp["table"]}
    assert rows["loss"]["delta"] == pytest.approx(-0.5) and rows["loss"]["improved"] is True
    assert rows["task_score"]["delta"] == pytest.approx(-0.1) and rows["task_score"]["improved"] is False
    assert rows["mean_reply_tokens"]["improved"] is None
    assert "perplexity" not in rows
    assert cmp["forgetting"]["flagged"] and cmp["forgetting"]["relative"] == pytest.approx(0.2)
    assert cmp["samples"] == [{"where": "f:1", "prompt": "p", "reference": "r", "before": "b", "after": "a",
                               "before_score": 0.0, "after_score": 1.0}]
    text = format_comparison(cmp)
    assert "loss" in text and "-0.500" in text and "FORGETTING" in text
    assert not math.isnan(rows["general_loss"]["delta"])


def test_format_eval_single():
    from sftlab.eval.compare import format_eval

    out = {"kind": "single", "target": "run", "data": "eval.jsonl",
           "result": {"metrics": {"loss": 1.25, "perplexity": math.exp(1.25), "tokens": 40, "task_score": 0.5,
                                  "format_adherence": 1.0},
                      "scorer": "json_fields", "format_check": "json_object",
                      "samples": [{"prompt": "p", "reference": "r", "reply": "x " * 80}]}}
    text = format_eval(out)
    assert "eval run on eval.jsonl" in text and "task score (json_fields)" in text
    assert "format adherence (json_object)" in text and "scored tokens                    40" in text
    assert "1.250" in text and "reply:     x x" in text and text.rstrip().endswith("...")


def test_format_result_keeps_one_column_with_long_scorer_names():
    """With tool-call references the labels ("task score (exact+tool_call_match)") outgrew the 32-wide
    column and pushed their values out of line with the rest."""
    from sftlab.eval.compare import format_result

    res = {"metrics": {"loss": 0.5, "task_score": 0.8, "format_adherence": 0.8, "valid_tool_call_rate": 1.0,
                       "tokens": 402}, "task_score_by": "exact+tool_call_match", "format_check": "finished+tool_call"}
    lines = format_result(res).splitlines()
    assert lines[1].startswith("task score (exact+tool_call_match)")
    assert len({len(line) - len(line.split()[-1]) for line in lines}) == 1  # every value starts in one column


def test_compare_table_says_what_the_task_score_is():
    """A single eval labels "task score (json_fields)"; the before/after table said only "task score",
    whether exact match, json fields or tool-call match."""
    base = {"metrics": {"task_score": 0.0, "format_adherence": 0.0}, "task_score_by": "exact+tool_call_match",
            "scorer": "exact", "format_check": "finished+tool_call"}
    text = format_comparison(compare(base, {**base, "metrics": {"task_score": 0.8, "format_adherence": 0.8}}))
    assert "task score (exact+tool_call_match)" in text and "format adherence (finished+tool_call)" in text
    assert len({line.index("0.000") for line in text.splitlines()[1:]}) == 1  # the base column stays aligned


def test_a_reply_of_reasoning_alone_is_empty():
    """A reply that only reasons (its <think> never closed, or nothing after </think>) gives the user no
    answer, and is scored on none; the non-empty rate counted it as a reply."""
    gens = [Generation("<think>\nlet me see, 2 and 2", False, 12), Generation("<think>\nhm\n</think>\n\n", True, 6),
            Generation("<think>\nhm\n</think>\n\n4", True, 7), Generation("4", True, 1)]
    summary, rows = score_generations(gens, ["4"] * 4)
    assert summary["nonempty_rate"] == pytest.approx(2 / 4)
    assert [r["score"] for r in rows] == [0.0, 0.0, 1.0, 1.0]


def test_a_sample_that_reasons_shows_its_answer_first():
    """A reply that reasons first was printed from its <think> block, cut at 100 characters: the answer it
    was scored on never showed."""
    from sftlab.eval.compare import format_eval

    long = "<think>\n" + "let me add these numbers carefully " * 5 + "\n</think>\n\n42"
    gens = [Generation(long, True, 40), Generation("<think>\nhm", False, 3)]
    _, rows = score_generations(gens, ["42", "42"])
    samples = [{"prompt": "p", **r} for r in rows]
    out = {"kind": "single", "target": "run", "data": "d", "result": {"metrics": {}, "samples": samples}}
    text = format_eval(out)
    assert "reply:     42 [after reasoning: let me add these numbers carefully le...]" in text
    assert "reply:     (no answer) [after reasoning: hm]" in text
    cmp = compare({"samples": samples}, {"samples": [{"prompt": "p", **r} for r in rows[::-1]]})
    text = format_eval({"kind": "compare", "target": "run", "data": "d", "base": "b", **cmp})
    assert "before:    42 [after reasoning:" in text and "after:     (no answer) [after reasoning: hm]" in text
    plain = compare({"samples": [{"reply": "a"}]}, {"samples": [{"reply": "b"}]})["samples"][0]
    assert "before_answer" not in plain and format_eval({"kind": "compare", "target": "r", "data": "d", "base": "b",
                                                         **compare({"samples": [{"reply": "a"}]}, {"samples": [{"reply": "b"}]})}).endswith("after:     b")


def test_eval_says_what_the_loss_leaves_out():
    """Examples longer than max_seq_length were left out of the loss (or cut) without a word: the loss
    read as over the whole data set."""
    from sftlab.eval.compare import format_eval, format_result

    res = {"metrics": {"loss": 0.5, "tokens": 332},
           "prepare": {"n_input": 5, "n_kept": 4, "n_dropped_too_long": 1, "n_truncated": 0, "n_turns_cut": 2}}
    note = ("note: of 5 examples, 1 left out of the loss (longer than max_seq_length), 2 had earlier turns cut to "
            "fit (max_seq_length: the run's, or --max-seq-length)")
    assert format_result(res).splitlines()[-1] == note
    whole = {"metrics": {"loss": 0.5}, "prepare": {"n_input": 5, "n_kept": 5, "n_dropped_too_long": 0}}
    assert "note" not in format_result(whole)
    text = format_eval({"kind": "compare", "target": "r", "data": "d", "base": "b", **compare(res, res)})
    assert note in text


def test_a_tool_call_sample_says_how_its_call_was_judged():
    """A sample whose reference is a call showed the reply alone: not whether its call parsed, why not, or
    whether it was the reference's call (the JSON had it, the printed samples did not)."""
    from sftlab.eval.compare import format_eval

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    ref = ToolRef(tools, [{"name": "f", "arguments": {}}])
    gens = [Generation('<tool_call>{"name": "f", "arguments": {}}</tool_call>', True, 9),
            Generation('<tool_call>{"name": "f"', False, 5)]
    _, rows = score_generations(gens, ["r", "r"], tool_refs=[ref, ref])
    samples = [{"prompt": "p", **r} for r in rows]
    text = format_eval({"kind": "single", "target": "t", "data": "d", "result": {"metrics": {}, "samples": samples}})
    assert "(tool call valid, the reference's call)" in text
    assert "(tool call invalid: a <tool_call> block is never closed)" in text
    cmp = compare({"samples": samples[::-1]}, {"samples": samples})
    text = format_eval({"kind": "compare", "target": "t", "data": "d", "base": "b", **cmp})
    assert text.index("before:") < text.index("(tool call invalid") < text.index("after:") < text.index("(tool call valid")


def test_per_source_lines_say_a_call_match_is_part_of_the_task_score():
    """With several --data sources, a source of tool-call turns printed "task_score (exact) 0.800": the
    0.8 was mostly the call match, as the totals' "(exact+tool_call_match)" said."""
    from sftlab.data.types import Conversation, Message
    from sftlab.eval.run import _per_source, format_sources

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
    convs = [Conversation([Message("user", "q"), Message("assistant", "", tool_calls=(call,))], tools=tools),
             Conversation([Message("user", "q"), Message("assistant", "4")]),
             Conversation([Message("user", "q"), Message("assistant", "4")])]
    gens = [Generation('<tool_call>{"name": "f", "arguments": {}}</tool_call>', True, 9), Generation("4", True, 1),
            Generation("5", True, 1)]
    ref = ToolRef(tools, [{"name": "f", "arguments": {}}])
    _, rows = score_generations(gens, ["x", "4", "4"], tool_refs=[ref, None, None])
    per = _per_source(None, None, convs, ["tools", "tools", "text"], [], rows, 8)
    assert per["tools"]["task_score_by"] == "exact+tool_call_match" and per["text"]["task_score_by"] == "exact"
    text = format_sources({"result": {"sources": per}})
    assert "tools: 2 examples, task_score (exact+tool_call_match) 1.000" in text
    assert "text: 1 example, task_score (exact) 0.000" in text
