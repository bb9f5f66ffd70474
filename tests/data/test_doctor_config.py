"""`sftlab doctor RUN.yaml`: the data checked as that run trains it (sources and weights, template, limit,
truncation, masking, reasoning), counts equal to prepare's real labels; every example dropped as one error;
a blank user turn."""

from __future__ import annotations

import json

import pytest
import yaml
from test_official_templates import QWEN3

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.core.errors import SftlabError
from sftlab.data.doctor import run_doctor
from sftlab.data.prepare import prepare


def _rows(n: int, offset: int = 0) -> list[dict]:
    """Two-turn chats with reasoning on both replies, one short chat each third (varied lengths)."""
    rows = []
    for i in range(offset, offset + n):
        msgs = [{"role": "user", "content": f"what is {i} plus {i}? " * (1 + i % 3)},
                {"role": "assistant", "content": f"it is {2 * i}", "reasoning_content": f"add {i} to {i} " * (1 + i % 2)},
                {"role": "user", "content": "and doubled?"},
                {"role": "assistant", "content": f"{4 * i}", "reasoning_content": "twice that"}]
        rows.append({"messages": msgs if i % 3 else msgs[:2]})
    return rows


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, tiny_model_dir, **kw) -> str:
    a, b = _jsonl(tmp_path / "a.jsonl", _rows(6)), _jsonl(tmp_path / "b.jsonl", _rows(4, offset=10))
    cfg = {"model": str(tiny_model_dir), "data": [{"path": a, "weight": 2}, {"path": b, "weight": 1}],
           "system_prompt": "Answer briefly.", "max_seq_length": 96, **kw}
    if cfg.get("template") == "qwen3":
        (tmp_path / "qwen3.jinja").write_text(QWEN3)
        cfg["template"] = str(tmp_path / "qwen3.jinja")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _doctor_json(capsys, *args) -> tuple[int, dict]:
    code = main(["doctor", *args, "--json"])
    out, err = capsys.readouterr()
    assert out, err
    return code, json.loads(out)


@pytest.mark.parametrize("template, masking, reasoning, truncation", [
    (None, "all_assistant", "per_turn", "cut_turns"),
    (None, "last_assistant", "drop", "truncate"),
    ("qwen3", "all_assistant", "per_turn", "cut_turns"),
    ("qwen3", "last_assistant", "keep", "drop"),
    ("qwen3", "all", "last", "truncate"),
    ("qwen3", "all_assistant", "drop", "cut_turns"),
])
def test_doctor_of_a_config_counts_what_prepare_trains(tmp_path, tiny_model_dir, capsys, template, masking, reasoning,
                                                       truncation):
    cfg_path = _config(tmp_path, tiny_model_dir, template=template, masking=masking, reasoning=reasoning,
                       truncation=truncation)
    prepared = prepare(load_config(cfg_path))
    _, stats = _doctor_json(capsys, cfg_path)
    stats = stats["stats"]
    assert (stats["masking"], stats["reasoning"]) == (masking, reasoning)
    m = stats["max_seq_length"]
    assert (m["limit"], m["truncation"]) == (96, truncation)
    # every usable example once (a weighted mixture's pool), with the labels prepare really made
    usable = prepared.usable
    assert stats["trained_tokens"]["total"] - m["lost_trained_tokens"] == sum(e.n_trained for e in usable)
    assert m["kept"] == len(usable)
    assert [s["weight"] for s in stats["sources"]] == [2.0, 1.0]
    assert stats["examples"] == len(prepared.mixture.conversations)


def test_the_settings_change_the_counts_and_flags_override_the_config(tmp_path, tiny_model_dir, capsys):
    """The plain DATA form takes --masking/--reasoning; a config's own settings are used, flags win over them."""
    cfg_path = _config(tmp_path, tiny_model_dir, masking="last_assistant", reasoning="drop", max_seq_length=4096)
    _, by_config = _doctor_json(capsys, cfg_path)
    _, by_default = _doctor_json(capsys, "--config", cfg_path, "--masking", "all_assistant", "--reasoning", "per_turn")
    assert by_config["stats"]["trained_tokens"]["total"] < by_default["stats"]["trained_tokens"]["total"]
    cfg = load_config(cfg_path, {"data": str(tmp_path / "a.jsonl"), "system_prompt": None})
    want = sum(e.n_trained for e in prepare(cfg).usable)
    _, plain = _doctor_json(capsys, str(tmp_path / "a.jsonl"), "--model", str(tiny_model_dir), "--max-seq-length", "4096",
                            "--masking", "last_assistant", "--reasoning", "drop")
    assert plain["stats"]["trained_tokens"]["total"] == want
    # DATA next to the config replaces its data; the config's system prompt still applies (more tokens)
    _, replaced = _doctor_json(capsys, cfg_path, str(tmp_path / "a.jsonl"))
    assert replaced["stats"]["data"] == str(tmp_path / "a.jsonl") and "sources" not in replaced["stats"]
    assert replaced["stats"]["length"]["mean"] > plain["stats"]["length"]["mean"]


def test_doctor_config_mistakes_are_one_line(tmp_path, tiny_model_dir, capsys):
    cfg_path = _config(tmp_path, tiny_model_dir)
    other = tmp_path / "other.yaml"
    other.write_text(f"model: {tiny_model_dir}\n")
    for args, words in ([[cfg_path, str(other)], "several training configs"], [[str(other)], "names no training data"],
                        [[], "no data to check"], [[cfg_path, "--masking", "sideways"], "masking"]):
        assert main(["doctor", *args]) == 2, args
        out, err = capsys.readouterr()
        assert words in err and len(err.strip().splitlines()) == 1 and out == "", (args, err)


# --- every example dropped ------------------------------------------------------------------------------
def test_a_limit_that_drops_every_example_is_one_error_with_the_limit_that_keeps_one(tmp_path, tiny_model_dir, capsys):
    cfg_path = _config(tmp_path, tiny_model_dir, truncation="drop", max_seq_length=24)
    with pytest.raises(SftlabError, match="no example is left to train on"):
        prepare(load_config(cfg_path))
    code, res = _doctor_json(capsys, cfg_path)
    found = [f for f in res["findings"] if f["rule"] == "nothing_left"]
    assert code == 2 and len(found) == 1 and found[0]["severity"] == "error"
    assert "training would drop every example of the 10 conversations" in found[0]["message"]
    limit = int(found[0]["fixes"][0].split("raise max_seq_length to ")[1].split()[0])
    # exactly the limit that keeps one example: one less still keeps none
    assert prepare(load_config(cfg_path, {"max_seq_length": limit})).report.n_kept >= 1
    with pytest.raises(SftlabError, match="no example is left"):
        prepare(load_config(cfg_path, {"max_seq_length": limit - 1}))
    # some examples kept: no such error
    _, res = _doctor_json(capsys, cfg_path, "--max-seq-length", str(limit))
    assert not [f for f in res["findings"] if f["rule"] == "nothing_left"]


def test_without_a_model_every_example_surely_dropped_is_an_error(tmp_path):
    """Lengths of message text only (a lower bound): under `drop` every chat over the limit is surely dropped."""
    tok = _byte_tokenizer()
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x" * 30},
                                                       {"role": "assistant", "content": "y" * 30 + str(i)}]} for i in range(2)])
    res = run_doctor(path, length_tokenizer=tok, max_seq_length=40, truncation="drop")
    found = [f for f in res.findings if f.rule == "nothing_left"]
    assert len(found) == 1 and "raise max_seq_length above 62" in found[0].fixes[0], found
    assert not [f for f in run_doctor(path, length_tokenizer=tok, max_seq_length=40, truncation="truncate").findings
                if f.rule == "nothing_left"]
    # plain text under drop: its length (with the EOS) is exact, and each over the limit is dropped
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "z" * 50}, {"text": "w" * 45}])
    found = [f for f in run_doctor(text, length_tokenizer=tok, max_seq_length=40, truncation="drop").findings
             if f.rule == "nothing_left"]
    assert len(found) == 1 and "raise max_seq_length to 46 " in found[0].fixes[0]


def _byte_tokenizer():
    """One token per UTF-8 byte (as test_doctor's): the message text "x"*30 + "\n" + "y"*30 + "0" is 62 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>")


# --- a blank user turn ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content, what", [("   \n", "only whitespace"), ("", "empty")])
def test_a_blank_user_turn_is_a_warning(tmp_path, content, what):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": content},
                                                       {"role": "assistant", "content": "yo"}]},
                                         {"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]}])
    res = run_doctor(path)
    assert [(f.rule, f.severity, f.data["line"], f.message) for f in res.findings] == [
        ("empty_user", "warning", 1, f"message 1 (user) is {what}")]


def test_a_weighted_source_left_without_examples_is_an_error_as_in_prepare(tmp_path, tiny_model_dir, capsys):
    """A weighted mixture draws from every source each epoch: prepare refuses one that tokenization left
    empty; the doctor says so (with the limit that keeps one). Without weights it only loses those examples."""
    long = _jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "tell me " * 20},
                                                          {"role": "assistant", "content": "a long answer " * 12}]}])
    short = _jsonl(tmp_path / "short.jsonl", _rows(3)[:1])
    cfg = {"model": str(tiny_model_dir), "max_seq_length": 64, "data": [{"path": long, "weight": 1}, {"path": short, "weight": 1}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cfg_path = str(tmp_path / "run.yaml")
    with pytest.raises(SftlabError, match="source 'long'"):
        prepare(load_config(cfg_path))
    code, res = _doctor_json(capsys, cfg_path)
    found = [f for f in res["findings"] if f["rule"] == "nothing_left"]
    assert code == 2 and [f["where"] for f in found] == [long] and "source 'long'" in found[0]["message"]
    need = int(found[0]["fixes"][0].split("raise max_seq_length to ")[1].split()[0])
    assert prepare(load_config(cfg_path, {"max_seq_length": need})).report.n_kept == 2
    with pytest.raises(SftlabError, match="source 'long'"):
        prepare(load_config(cfg_path, {"max_seq_length": need - 1}))
    # the same sources without weights: every usable example once, the long one dropped, no error
    plain = load_config(cfg_path, {"data": [long, short]})
    assert prepare(plain).report.n_kept == 1
    code, res = _doctor_json(capsys, cfg_path, long, short)
    assert code == 1 and not [f for f in res["findings"] if f["rule"] == "nothing_left"]


def test_the_tools_stats_line_says_example_and_examples(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    row = {"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
           "messages": [{"role": "user", "content": "1+?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "assistant", "content": "1"}]}
    text = run_doctor(_jsonl(tmp_path / "d.jsonl", [row])).format_text()
    assert "tools: 1 example offers tools; 1 call, 1 tool result; reasoning in 0 of 2 assistant turns" in text


def test_the_configs_eval_data_is_checked_for_overlap(tmp_path, tiny_model_dir, capsys):
    cfg_path = _config(tmp_path, tiny_model_dir, eval_data=_jsonl(tmp_path / "eval.jsonl", _rows(2)))
    _, res = _doctor_json(capsys, cfg_path)
    assert res["stats"]["eval"]["exact_overlap"] == 2  # the eval rows are a.jsonl's first two
    _, res = _doctor_json(capsys, cfg_path, "--eval", _jsonl(tmp_path / "other.jsonl", _rows(1, offset=50)))
    assert res["stats"]["eval"]["exact_overlap"] == 0


@pytest.mark.parametrize("reasoning, length", [("per_turn", 2 + 1 + 60 + 1 + 2), ("last", 66), ("keep", 66), ("drop", 5)])
def test_without_a_model_lengths_count_the_reasoning_training_keeps_and_tool_calls(tmp_path, reasoning, length):
    """Message text alone missed a reply's reasoning: a chat with 60 bytes of <think> measured 5 tokens and
    passed a limit of 40 that prepare then dropped it at. Lengths by the byte tokenizer: one token per byte."""
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "reasoning_content": "r" * 60}]}
    res = run_doctor(_jsonl(tmp_path / "d.jsonl", [row]), length_tokenizer=_byte_tokenizer(), max_seq_length=40,
                     reasoning=reasoning)
    assert res.stats["length"]["max"] == length
    assert [f.rule for f in res.findings] == ([] if length <= 40 else ["nothing_left", "too_long"])
    call = {"id": "c", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    row = {"tools": tools, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                                        {"role": "tool", "tool_call_id": "c", "content": "1"}, {"role": "assistant", "content": "1"}]}
    res = run_doctor(_jsonl(tmp_path / "t.jsonl", [row]), length_tokenizer=_byte_tokenizer(), reasoning=reasoning)
    assert res.stats["length"]["max"] == len('hi\n\nadd {"a": 1}\n1\n1')


def test_set_overrides_the_configs_keys_as_in_prepare(tmp_path, tiny_model_dir, capsys):
    cfg_path = _config(tmp_path, tiny_model_dir, max_seq_length=4096)
    _, res = _doctor_json(capsys, cfg_path, "--set", "max_seq_length=24", "--set", "truncation=drop")
    assert [f["rule"] for f in res["findings"]][0] == "nothing_left"
    assert main(["doctor", str(tmp_path / "a.jsonl"), "--set", "masking=all"]) == 2
    out, err = capsys.readouterr()
    assert "--set overrides a training config, and none is given" in err and len(err.strip().splitlines()) == 1


def test_a_key_a_typo_away_from_one_training_reads_is_a_warning(tmp_path):
    """'contents', 'reasoning_contents', 'tool_call', 'tool' are read as nothing: their text is silently left out."""
    ok = {"role": "assistant", "content": "yo"}
    rows = [{"messages": [{"role": "user", "content": "hi"}, {**ok, "reasoning_contents": "hmm"}]},
            {"messages": [{"role": "user", "content": "hi2"}, {**ok, "tool_call": [{"id": "a"}]}]},
            {"tool": [{"name": "f"}], "messages": [{"role": "user", "content": "hi3"}, ok]},
            {"messages": [{"role": "user", "content": "hi4", "reasoning_content": "secret"}, ok]},
            # extra keys that are no near miss (a per-message flag, an id) are nobody's business
            {"id": 7, "messages": [{"role": "user", "content": "hi5", "train": False}, {**ok, "loss": True}]}]
    res = run_doctor(_jsonl(tmp_path / "d.jsonl", rows))
    assert [(f.rule, f.severity, f.data["line"], f.message) for f in res.findings] == [
        ("unread_keys", "warning", 1, "message 2: key 'reasoning_contents' is not read (did you mean 'reasoning_content'?): "
                                      "its value is ignored"),
        ("unread_keys", "warning", 2, "message 2: key 'tool_call' is not read (did you mean 'tool_calls'?): its value is ignored"),
        ("unread_keys", "warning", 3, "key 'tool' is not read (did you mean 'tools'?): its value is ignored"),
        ("unread_keys", "warning", 4, "message 1 (user): 'reasoning_content' is read on assistant messages only: it is ignored")]


@pytest.mark.parametrize("rows,expected", [
    pytest.param([{"instruction": "q1", "inptu": "the text", "output": "a"},
                  {"instruction": "q2", "output": "b", "sytem": "Be brief."},
                  {"instruction": "q3", "output": "c", "histroy": [["h", "i"]]},
                  {"instruction": "q4", "outptu": "d"},  # not alpaca without 'output': the error says what is missing
                  {"instruction": "q5", "output": "e", "id": 5, "source": "web", "instruction_id": 5}],
                 [(1, "key 'inptu' is not read (did you mean 'input'?)"), (2, "key 'sytem' is not read (did you mean 'system'?)"),
                  (3, "key 'histroy' is not read (did you mean 'history'?)"),
                  (4, "key 'outptu' is not read (did you mean 'output'?)")], id="alpaca"),
    pytest.param([{"conversations": [{"from": "human", "vaule": "hi"}, {"from": "gpt", "value": "yo"}]},
                  {"conversations": [{"from": "human", "value": "hi2"}, {"from": "gpt", "value": "yo"}], "sytem": "x"},
                  {"conversations": [{"from": "human", "value": "hi3", "reasoning_content": "secret"},
                                     {"from": "gpt", "value": "yo"}]},
                  {"conversations": [{"from": "human", "value": "hi4"}, {"from": "gpt", "value": "yo", "thinkng": "r"}]},
                  {"convresations": [{"from": "human", "value": "hi5"}, {"from": "gpt", "value": "yo"}]},
                  {"conversations": [{"from": "human", "value": "hi6", "train": False}, {"from": "gpt", "value": "yo"}],
                   "conversation_id": "c6"}],  # a key near one the record holds is a key of its own, no typo
                 [(1, "turn 1: key 'vaule' is not read (did you mean 'value'?)"),
                  (2, "key 'sytem' is not read (did you mean 'system'?)"),
                  (3, "turn 1 (human): 'reasoning_content' is read on assistant messages only"),
                  (4, "turn 2: key 'thinkng' is not read (did you mean 'thinking'?)"),
                  (5, "key 'convresations' is not read (did you mean 'conversations'?)")], id="sharegpt"),
    pytest.param([{"prompt": "q", "completion": "a", "wieght": 2},
                  {"prompt": [{"role": "user", "content": "q2"}], "completion": [{"role": "assistant", "contnet": "a"}]},
                  {"prompt": "q3", "completion": "c", "id": 3, "prompt_id": "p3"}],
                 [(1, "key 'wieght' is not read (did you mean 'weight'?)"),
                  (2, "completion message 1: key 'contnet' is not read (did you mean 'content'?)")], id="prompt_completion"),
    pytest.param([{"text": "hello", "weigth": 0.5}, {"text": "world", "meta": {"url": "x"}}, {"texts": "again"}],
                 [(1, "key 'weigth' is not read (did you mean 'weight'?)"), (3, "key 'texts' is not read (did you mean 'text'?)")],
                 id="text"),
])
def test_a_key_a_typo_away_is_a_warning_in_every_format(tmp_path, rows, expected):
    """Not only the messages format: alpaca's 'inptu', sharegpt's 'vaule', a completion's 'wieght', text's
    'weigth' were read as nothing, the text or weight they hold silently left out of training."""
    res = run_doctor(_jsonl(tmp_path / "d.jsonl", rows))
    got = [(f.data["line"], f.message) for f in res.findings if f.rule == "unread_keys"]
    assert [line for line, _ in got] == [line for line, _ in expected], got
    for (_, msg), (_, want) in zip(got, expected):
        assert msg.startswith(want), msg
    assert all(f.severity == "warning" and f.fixes for f in res.findings if f.rule == "unread_keys")


def test_data_may_follow_the_options(tmp_path, tiny_model_dir, capsys):
    """`sftlab doctor RUN.yaml --max-seq-length 64 a.jsonl` was refused ("unrecognized arguments: a.jsonl"):
    argparse filled DATA only up to the first option. Options and DATA now mix in any order."""
    cfg_path = _config(tmp_path, tiny_model_dir)
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    _, res = _doctor_json(capsys, cfg_path, "--max-seq-length", "64", a)
    assert res["stats"]["data"] == a and res["stats"]["max_seq_length"]["limit"] == 64  # DATA replaces the config's
    assert res["stats"]["run"]["model"] == str(tiny_model_dir)
    _, res = _doctor_json(capsys, a, "--model", str(tiny_model_dir), b, "--max-seq-length", "64")
    assert [s["path"] for s in res["stats"]["sources"]] == [a, b] and res["stats"]["max_seq_length"]["limit"] == 64
    with pytest.raises(SystemExit, match="2"):  # an unknown option is still refused, as argparse refuses it
        main(["doctor", a, "--bogus", b])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_report_names_the_runs_model_template_and_label_settings(tmp_path, tiny_model_dir, capsys):
    cfg_path = _config(tmp_path, tiny_model_dir, template="chatml", masking="last_assistant", reasoning="keep")
    main(["doctor", cfg_path])
    out = capsys.readouterr().out
    assert f"  as the run trains it: model {tiny_model_dir}, template chatml\n" in out
    assert "trained tokens (masking: last_assistant, reasoning: keep): " in out


def test_nothing_left_offers_truncate_only_where_truncating_keeps_an_example(tmp_path):
    tok = _byte_tokenizer()
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "x" * 50}]}])
    for limit, offered in ((40, True), (12, False)):  # the prompt alone is over 12 tokens: truncating keeps nothing
        found = [f for f in run_doctor(path, tokenizer=tok, template="chatml", max_seq_length=limit, truncation="drop").findings
                 if f.rule == "nothing_left"]
        assert len(found) == 1 and any("truncation: truncate" in x for x in found[0].fixes) == offered, found
        kept = [f for f in run_doctor(path, tokenizer=tok, template="chatml", max_seq_length=limit,
                                      truncation="truncate").findings if f.rule == "nothing_left"]
        assert bool(kept) != offered


def test_plain_data_with_reasoning_drop_renders_as_prepare_does(tmp_path, tiny_model_dir, capsys):
    """Under reasoning: drop prepare renders with enable_thinking=False (a Qwen3 template then writes an empty
    <think> block into the prompt); the plain DATA form with --reasoning drop must count the same."""
    cfg_path = _config(tmp_path, tiny_model_dir, template="qwen3", reasoning="drop", max_seq_length=4096)
    cfg = load_config(cfg_path, {"data": str(tmp_path / "a.jsonl"), "system_prompt": None})
    prepared = prepare(cfg)
    _, res = _doctor_json(capsys, str(tmp_path / "a.jsonl"), "--model", str(tiny_model_dir), "--template", cfg.template,
                          "--reasoning", "drop", "--max-seq-length", "4096")
    assert res["stats"]["trained_tokens"]["total"] == sum(e.n_trained for e in prepared.usable)
    assert round(res["stats"]["length"]["mean"] * len(prepared.usable)) == sum(len(e.input_ids) for e in prepared.usable)
