"""The data doctor: every check on a small file that triggers it, a clean file, the CLI and its JSON."""

from __future__ import annotations

import json

import pytest

from sftlab.cli import main
from sftlab.data.doctor import CHECKS, run_doctor
from sftlab.data.templates import BUILTIN


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer without merges: one token per UTF-8 byte, one per special token.

    That makes token counts computable by hand. ChatML template, as the shared tiny model has.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = BUILTIN["chatml"][0]
    return tokenizer


def chat(user: str, reply: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


CLEAN = [chat("What is the capital of France?", "Paris."),
         chat("Name a primary colour.", "Red is one.", system="Be brief."),
         chat("How many legs does a spider have?", "Eight legs.")]


def write(tmp_path, rows, name="data.jsonl") -> str:
    """One line per row: dicts as JSON, str and bytes as they are."""
    path = tmp_path / name
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def only(result, check):
    return [f for f in result.findings if f.rule == check]


def the_one(result, check):
    found = only(result, check)
    assert len(found) == 1, result.format_text()
    assert found[0].severity == CHECKS[check][0]
    return found[0]


# --- clean ---------------------------------------------------------------------------------------------
def test_clean_file_has_no_findings(tmp_path, tok):
    path = write(tmp_path, CLEAN)
    for kwargs in ({}, {"tokenizer": tok}):
        result = run_doctor(path, **kwargs)
        assert result.findings == [] and result.exit_code == 0, result.format_text()
    assert "verdict: clean (exit 0)" in result.format_text()


def test_clean_file_with_clean_eval(tmp_path, tok):
    train = write(tmp_path, CLEAN)
    evl = write(tmp_path, [chat("Which planet is largest?", "Jupiter.")], "eval.jsonl")
    result = run_doctor(train, eval_data=evl, tokenizer=tok)
    assert result.findings == [] and result.exit_code == 0
    assert result.stats["eval"]["exact_overlap"] == result.stats["eval"]["near_overlap"] == 0


# --- structure -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, check", [
    ("not json at all", "parse"),
    ('["a", "list"]', "parse"),
    ({"messages": "hello"}, "fields"),
    ({"foo": 1}, "fields"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}, "role_order"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "role_order"),  # no reply at all
    (chat("hi", "   "), "empty_reply"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "encoding"),  # latin-1 byte
])
def test_structural_errors_name_their_line(tmp_path, bad, check):
    path = write(tmp_path, [CLEAN[0], CLEAN[1], bad, CLEAN[2]])
    result = run_doctor(path)
    f = the_one(result, check)
    assert (f.severity, f.data["line"], f.data["file"]) == ("error", 3, path)
    assert len(result.findings) == 1 and result.exit_code == 2


def test_invalid_utf8_in_csv_names_the_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"prompt,completion\nhi,there\nbad,caf\xe9\n")
    f = the_one(run_doctor(str(path)), "encoding")
    assert f.data["line"] == 3


def test_cut_character_and_deep_nesting_are_findings_not_crashes(tmp_path, tok):
    # "\ud83d" is half an emoji: valid JSON, but no UTF-8 (and no tokenizer) takes the string.
    surrogate = '{"messages": [{"role": "user", "content": "hi \\ud83d"}, {"role": "assistant", "content": "yo"}]}'
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    result = run_doctor(write(tmp_path, [CLEAN[0], surrogate, deep, CLEAN[1]]), tokenizer=tok)
    f = the_one(result, "encoding")
    assert f.data["line"] == 2 and "messages[0].content holds an unpaired UTF-16 surrogate \\ud83d" in f.message
    assert "remove or complete the cut character" in f.fixes[0]
    assert the_one(result, "parse").data["line"] == 3 and "nested too deeply" in only(result, "parse")[0].message
    assert result.stats["examples"] == 2


def test_image_part_is_an_error_naming_the_type(tmp_path):
    image = {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"}]},
                          {"role": "assistant", "content": "A dog."}]}
    f = the_one(run_doctor(write(tmp_path, [CLEAN[0], image])), "non_text")
    assert f.data["line"] == 2 and "part of type 'image'" in f.message and "text-only data" in f.fixes[0]


def test_folder_says_which_files_were_read(tmp_path):
    (tmp_path / "ds").mkdir()
    write(tmp_path, CLEAN, "ds/train.jsonl")
    write(tmp_path, [chat("held-out question", "held-out answer")], "ds/test.jsonl")
    result = run_doctor(str(tmp_path / "ds"))
    assert result.stats["examples"] == 3 and result.stats["files"] == {"read": ["train.jsonl"], "skipped": ["test.jsonl"]}
    assert "read 1 file: train.jsonl; skipped (not the train split): test.jsonl" in result.format_text()


def test_json_array_points_at_the_line_where_the_item_starts(tmp_path):
    path = tmp_path / "data.json"
    items = [CLEAN[0], {"messages": [{"role": "assistant", "content": "x"}]}]
    path.write_text("[\n" + ",\n".join(json.dumps(i) for i in items) + "\n]\n")
    assert the_one(run_doctor(str(path)), "role_order").data["line"] == 3


def test_majority_format_wins_over_an_odd_first_line(tmp_path):
    path = write(tmp_path, [{"instruction": "x", "output": "y"}] + CLEAN)
    result = run_doctor(path)
    assert result.stats["format"] == "messages"
    f = the_one(result, "mixed_formats")
    assert f.data["line"] == 1 and "the file mixes formats: 3 records look like messages, 1 like alpaca" in f.message


# --- encoding and tokens in text ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["CafÃ© au lait", "it\u00e2\u20ac\u2122s here", "broken \ufffd char",
                                  "Brandâ„¢", "ÐŸÑ€Ð¸Ð²ÐµÑ‚", "æ—¥æœ¬èªž"])
def test_mojibake_is_a_warning(tmp_path, text):
    path = write(tmp_path, [CLEAN[0], chat("Say it.", text)])
    result = run_doctor(path)
    f = the_one(result, "mojibake")
    assert f.data["line"] == 2 and "message 2 (assistant)" in f.message
    assert result.exit_code == 1


def test_real_accents_are_not_mojibake(tmp_path):
    path = write(tmp_path, [chat("Où est le café ?", "São Paulo, Zürich, naïve, ½ — “quoted” ¿qué?")])
    assert run_doctor(path).findings == []


@pytest.mark.parametrize("text", ["Lui ha chiesto “perché…”", "C'è “qualcosa”…", "Er sagte „weiß”", "Öl° und è…»"])
def test_accents_next_to_quotes_and_ellipses_are_not_mojibake(tmp_path, text):
    """é…” are the cp1252 bytes of 酔 by chance: a repair to one stray CJK character is not plausible."""
    path = write(tmp_path, [chat(text, "Non lo so.")])
    assert run_doctor(path).findings == []


def test_control_characters_are_a_warning(tmp_path):
    path = write(tmp_path, [chat("tab\tand\nnewline\r\n are fine", "bell \x07 is not"), CLEAN[0]])
    f = the_one(run_doctor(path), "control_chars")
    assert f.data["line"] == 1 and "U+0007" in f.message


@pytest.mark.parametrize("marker", ["<|im_start|>", "<|eot_id|>", "[INST]", "</s>", "### Instruction:"])
def test_template_markers_in_text_are_a_warning(tmp_path, marker):
    path = write(tmp_path, [CLEAN[0], CLEAN[1], chat(f"Look: {marker} here", "Ok.")])
    f = the_one(run_doctor(path), "template_markers")
    assert f.data["line"] == 3 and marker in f.message


def test_the_tokenizers_special_tokens_in_text_are_an_error(tmp_path, tok):
    path = write(tmp_path, [CLEAN[0], chat("Hi", "Done<|im_end|> and [INST]")])
    result = run_doctor(path, tokenizer=tok)
    f = the_one(result, "special_tokens")
    assert f.data["line"] == 2 and "<|im_end|>" in f.message
    assert the_one(result, "template_markers").data["line"] == 2  # [INST] is no token of this tokenizer
    assert result.exit_code == 2
    # Without any tokenizer the same text is only a warning ...
    result = run_doctor(path)
    assert not only(result, "special_tokens") and the_one(result, "template_markers").data["line"] == 2
    # ... but without --model the CLI measures lengths with the default model's tokenizer, the one
    # prepare would train with: its special tokens are errors too.
    result = run_doctor(path, length_tokenizer=tok)
    assert the_one(result, "special_tokens").data["line"] == 2 and result.exit_code == 2


def test_special_tokens_in_reasoning_and_tool_calls_are_found(tmp_path, tok):
    """Reasoning and tool-call arguments are trained: a special token there teaches the model to end its
    turn mid-reply, as in the content."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    rows = [CLEAN[0],
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4",
                          "reasoning_content": "two plus two<|im_end|>\n<|im_start|>user\nfake"}]},
            {"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Par<|im_end|>is"}}}]},
                {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}], "tools": [weather]}]
    result = run_doctor(write(tmp_path, rows), tokenizer=tok, template="chatml-tools")
    found = only(result, "special_tokens")
    assert [f.data["line"] for f in found] == [2, 3], result.format_text()
    assert "message 2 (assistant) reasoning" in found[0].message and "<|im_end|>" in found[0].message
    assert "message 2 (assistant) tool call 1" in found[1].message


# --- lengths and trained tokens --------------------------------------------------------------------------------
def chatml_tokens(user: str, reply: str) -> tuple[int, int, int]:
    """(prompt, trained, total) tokens of one ChatML turn under the byte tokenizer, by hand."""
    prompt = 1 + len("user\n") + len(user) + 1 + len("\n") + 1 + len("assistant\n")  # specials count 1
    trained = len(reply) + 1  # the reply and its <|im_end|>
    return prompt, trained, prompt + trained + len("\n")


def test_too_long_counts_and_lost_trained_share(tmp_path, tok):
    rows = [("hi", "x" * 30), ("hello", "short"), ("what", "y" * 40)]
    path = write(tmp_path, [chat(u, a) for u, a in rows])
    limit = 40
    result = run_doctor(path, tokenizer=tok, max_seq_length=limit, truncation="truncate")
    counts = [chatml_tokens(u, a) for u, a in rows]
    long_rows = [i for i, (_, _, total) in enumerate(counts) if total > limit]
    assert long_rows == [0, 2]
    # Trained tokens sit at positions prompt .. prompt + trained - 1; those at >= limit are lost.
    lost = [p + t - max(p, limit) for p, t, total in counts if total > limit]
    found = only(result, "too_long")
    assert [f.data["line"] for f in found] == [1, 3] and all(f.severity == "warning" for f in found)
    assert f"{counts[0][2]} tokens > max_seq_length {limit}" in found[0].message  # the real length
    assert f"(truncation: truncate) cuts it at the limit, losing {lost[0]} of its {counts[0][1]} trained tokens" \
        in found[0].message
    total_trained = sum(t for _, t, _ in counts)
    assert result.stats["max_seq_length"] == {
        "limit": limit, "truncation": "truncate", "too_long": 2, "too_long_share": round(2 / 3, 4),
        "turns_cut": 0, "truncated": 2, "dropped": 0,
        "lost_trained_tokens": sum(lost), "lost_trained_share": round(sum(lost) / total_trained, 4), "kept": 3,
        # the limits that keep the shortest long example whole (its last trained token), or truncated to its first
        "keeps_one_whole": min(p + t for p, t, total in counts if total > limit),
        "truncate_keeps_one": min(p + 1 for p, t, total in counts if total > limit)}
    assert result.stats["trained_tokens"] == {
        "total": total_trained, "mean": round(total_trained / 3, 2), "min": min(t for _, t, _ in counts),
        "max": max(t for _, t, _ in counts), "share": round(total_trained / sum(c[2] for c in counts), 4)}
    length = result.stats["length"]
    totals = [c[2] for c in counts]
    assert (length["unit"], length["min"], length["max"]) == ("tokens", min(totals), max(totals))
    assert sum(h["count"] for h in length["histogram"]) == 3
    assert result.exit_code == 1
    # training's default (cut_turns) has no earlier turn to cut from a one-turn chat: it drops them whole
    result = run_doctor(path, tokenizer=tok, max_seq_length=limit)
    found = only(result, "too_long")
    assert [f.data["line"] for f in found] == [1, 3]
    assert f"(truncation: cut_turns) drops it, losing {counts[0][1]} of its {counts[0][1]} trained tokens (100%)" \
        in found[0].message
    m = result.stats["max_seq_length"]
    assert (m["too_long"], m["turns_cut"], m["truncated"], m["dropped"]) == (2, 0, 0, 2)
    assert m["lost_trained_tokens"] == counts[0][1] + counts[2][1]
    assert "training (truncation: cut_turns): 2 dropped, losing" in result.format_text()


@pytest.mark.parametrize("truncation", ["cut_turns", "truncate", "drop"])
def test_too_long_report_is_what_prepare_does(tmp_path, tok, truncation):
    from sftlab.config import Config
    from sftlab.data.prepare import prepare

    long_chat = {"messages": [{"role": "user", "content": "a" * 30}, {"role": "assistant", "content": "b" * 30},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d" * 5}]}
    rows = [long_chat, chat("hi", "x" * 60), chat("what", "p" * 30), chat("hi", "ok"), {"text": "z" * 70}, {"text": "zz"}]
    path = write(tmp_path, rows[:4])
    text_path = write(tmp_path, rows[4:], "text.jsonl")
    for p in (path, text_path):
        result = run_doctor(p, tokenizer=tok, max_seq_length=48, truncation=truncation)
        full = prepare(Config(model="unused", data=p, max_seq_length=4096), tok).report
        cut = prepare(Config(model="unused", data=p, max_seq_length=48, truncation=truncation), tok).report
        m = result.stats["max_seq_length"]
        # an example cut at the limit with no trained token left is dropped (prepare counts it both ways)
        assert (m["turns_cut"], m["truncated"], m["dropped"]) == (
            cut.n_turns_cut, cut.n_truncated - cut.n_dropped_no_trained, cut.n_dropped_too_long + cut.n_dropped_no_trained)
        assert m["too_long"] == m["turns_cut"] + m["truncated"] + m["dropped"] > 0
        assert result.stats["trained_tokens"]["total"] == full.n_trained_tokens
        assert m["lost_trained_tokens"] == full.n_trained_tokens - cut.n_trained_tokens
        assert result.stats["length"]["max"] > 48  # lengths are the real ones, not cut at the limit


def test_reply_entirely_past_the_limit_has_no_trained_token(tmp_path, tok):
    path = write(tmp_path, [CLEAN[0], chat("p" * 80, "ok")])
    assert chatml_tokens(CLEAN[0]["messages"][0]["content"], "Paris.")[2] <= 64 < chatml_tokens("p" * 80, "ok")[0]
    result = run_doctor(path, tokenizer=tok, max_seq_length=64, truncation="truncate")
    f = the_one(result, "no_trained")
    assert f.data["line"] == 2 and f.severity == "error"
    assert the_one(result, "too_long").data["line"] == 2
    assert result.exit_code == 2
    # the default policy drops the example as too long: a warning that says so, not "trains on nothing"
    result = run_doctor(path, tokenizer=tok, max_seq_length=64)
    assert not only(result, "no_trained") and "drops it" in the_one(result, "too_long").message


def test_template_that_cannot_place_replies_is_an_error(tmp_path, tok):
    tpl = tmp_path / "upper.jinja"
    tpl.write_text("{% for m in messages %}{{ m.role }}: {{ m.content | upper }}\n{% endfor %}")
    path = write(tmp_path, [chat("hi", "there")])
    f = the_one(run_doctor(path, tokenizer=tok, template=str(tpl)), "template")
    assert f.data["line"] == 1 and "verbatim" in f.message


NO_SYSTEM = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_that_refuses_a_conversation_is_one_error_with_a_fix(tmp_path, tok):
    tpl = tmp_path / "nosys.jinja"
    tpl.write_text(NO_SYSTEM)
    path = write(tmp_path, [CLEAN[0], CLEAN[1]])  # the second has a system message
    result = run_doctor(path, tokenizer=tok, template=str(tpl))
    f = the_one(result, "template")  # once: not again as a template_consistency warning
    assert [x.rule for x in result.findings] == ["template"]
    assert f.data["line"] == 2 and f.message == "chat template 'nosys.jinja' failed to render: System role not supported"
    assert "refuses system messages" in f.fixes[0] and "--template chatml" in f.fixes[0]


def test_builtin_template_tokens_are_added_on_a_copy(tmp_path, tok):
    n = len(tok)
    result = run_doctor(write(tmp_path, CLEAN), tokenizer=tok, template="llama3")
    assert "<|eot_id|>" in result.stats["added_tokens"] and len(tok) == n
    assert result.findings == []


def test_lengths_without_a_model_are_characters(tmp_path):
    result = run_doctor(write(tmp_path, [chat("ab", "cde"), chat("x", "y")]))
    length = result.stats["length"]
    # the messages' text joined by newlines (as the token measure): "x\ny", "ab\ncde"
    assert (length["unit"], length["min"], length["max"]) == ("characters", 3, 6)
    assert result.stats["trained_tokens"] is None and "characters" in result.format_text()


# --- duplicates -----------------------------------------------------------------------------------------------
def test_exact_duplicate_names_both_lines(tmp_path):
    path = write(tmp_path, [CLEAN[0], CLEAN[1], CLEAN[0]])
    result = run_doctor(path)
    f = the_one(result, "duplicate")
    assert f.data["line"] == 3 and f"{path}:1" in f.message
    assert result.stats["duplicates"] == {"exact": 1, "near": 0} and result.exit_code == 1


def test_near_duplicate_by_case_and_punctuation(tmp_path):
    rows = [chat("Hello, World! How are you?", "Fine, thanks."), CLEAN[0],
            chat("hello world how are you", "fine thanks!")]
    f = the_one(run_doctor(write(tmp_path, rows)), "near_duplicate")
    assert f.data["line"] == 3 and ":1" in f.message


def test_different_sentences_are_not_near_duplicates(tmp_path):
    rows = [chat("The cat sat on the mat.", "Yes it did."), chat("The dog ran in the park.", "Yes it did.")]
    assert run_doctor(write(tmp_path, rows)).findings == []


def test_near_duplicate_by_shingles(tmp_path):
    words = [f"word{i}" for i in range(200)]
    changed = list(words)
    changed[100] = "different"
    rows = [chat("Summarise.", " ".join(words)), CLEAN[0], chat("Summarise.", " ".join(changed))]
    f = the_one(run_doctor(write(tmp_path, rows)), "near_duplicate")
    assert f.data["line"] == 3 and "Jaccard" in f.message


def test_duplicates_inside_the_eval_data_are_found(tmp_path):
    train = write(tmp_path, CLEAN)
    extra = chat("Which planet is largest?", "Jupiter.")
    evl = write(tmp_path, [extra, chat("Is water wet?", "Yes."), extra], "eval.jsonl")
    result = run_doctor(train, eval_data=evl)
    f = the_one(result, "duplicate")  # counted twice in every eval metric
    assert (f.data["file"], f.data["line"]) == (evl, 3) and f"{evl}:1" in f.message
    assert result.stats["eval"]["duplicates"] == {"exact": 1, "near": 0} and result.stats["duplicates"]["exact"] == 0


# --- train/eval overlap ------------------------------------------------------------------------------------------
def test_eval_overlap_exact_prompt_and_near(tmp_path):
    train = write(tmp_path, CLEAN)
    evl = write(tmp_path, [
        chat("Which planet is largest?", "Jupiter."),  # 1: clean
        CLEAN[2],  # 2: identical to train line 3
        chat("What is the capital of France?", "It is Paris."),  # 3: same prompt as train line 1
        chat("how many legs does a SPIDER have", "Eight legs!"),  # 4: near train line 3
    ], "eval.jsonl")
    result = run_doctor(train, eval_data=evl)
    exact = only(result, "eval_overlap")
    assert [(f.data["file"], f.data["line"], f.severity) for f in exact] == [(evl, 2, "error"), (evl, 3, "error")]
    assert f"{train}:3" in exact[0].message and "identical" in exact[0].message
    assert f"{train}:1" in exact[1].message and "same prompt" in exact[1].message
    near = the_one(result, "eval_near_overlap")
    assert (near.data["file"], near.data["line"]) == (evl, 4) and f"{train}:3" in near.message
    assert result.stats["eval"]["exact_overlap"] == 2 and result.stats["eval"]["near_overlap"] == 1
    assert result.exit_code == 2


def test_eval_file_gets_the_line_checks_too(tmp_path):
    train = write(tmp_path, CLEAN)
    evl = write(tmp_path, [chat("Other question?", "Answer."), "{broken"], "eval.jsonl")
    f = the_one(run_doctor(train, eval_data=evl), "parse")
    assert (f.data["file"], f.data["line"]) == (evl, 2)


# --- the command ---------------------------------------------------------------------------------------------------
def run_cli(capsys, *args):
    code = main(["doctor", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes(tmp_path, capsys):
    assert run_cli(capsys, write(tmp_path, CLEAN, "clean.jsonl"))[0] == 0
    assert run_cli(capsys, write(tmp_path, CLEAN + [CLEAN[0]], "warn.jsonl"))[0] == 1
    code, out, _ = run_cli(capsys, write(tmp_path, CLEAN + ["{oops"], "err.jsonl"))
    assert code == 2 and "parse (1)" in out and "err.jsonl:4" in out


def test_cli_json_shape(tmp_path, capsys):
    path = write(tmp_path, [CLEAN[0], "nope", CLEAN[0]])
    code, out, _ = run_cli(capsys, path, "--json")
    data = json.loads(out)
    assert code == 2 and set(data) >= {"findings", "stats"}
    assert [(f["rule"], f["severity"], f["data"]["line"]) for f in data["findings"]] == [("parse", "error", 2),
                                                                                       ("duplicate", "warning", 3)]
    assert all(set(f) == {"rule", "severity", "message", "where", "evidence", "fixes", "data"} for f in data["findings"])
    assert data["findings"][0]["where"] == f"{path}:2" and data["findings"][0]["data"]["file"] == path
    stats = data["stats"]
    assert stats["records"] == 3 and stats["examples"] == 2 and stats["format"] == "messages"
    # no --model: lengths are tokens by the default model's tokenizer, and the stats say so
    assert stats["length"]["unit"] == "tokens" and stats["length"]["histogram"]
    assert "smollm2-135m-instruct tokenizer" in stats["note"] and stats["max_seq_length"]["limit"] == 2048
    assert stats["checks"] == {"parse": 1, "duplicate": 1}


def test_cli_with_model_folder(tmp_path, capsys, tok):
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    tok.save_pretrained(model_dir)
    LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2).save_pretrained(model_dir)
    path = write(tmp_path, [chat("hi", "x" * 50), CLEAN[0]])
    code, out, _ = run_cli(capsys, path, "--model", str(model_dir), "--max-seq-length", "64", "--json")
    data = json.loads(out)
    assert code == 1 and [(f["rule"], f["data"]["line"]) for f in data["findings"]] == [("too_long", 1)]
    assert data["stats"]["length"]["unit"] == "tokens" and data["stats"]["trained_tokens"]["total"] > 0
    assert "(truncation: cut_turns) drops it" in data["findings"][0]["message"]
    code, out, _ = run_cli(capsys, path, "--model", str(model_dir), "--max-seq-length", "64", "--truncation", "truncate")
    assert code == 1 and "(truncation: truncate) cuts it at the limit, losing" in out
    assert "1 cut at the limit, losing" in out
    code, _, err = run_cli(capsys, path, "--truncation", "sideways")
    assert code == 2 and "sideways" in err and "\n" not in err.strip()


def test_without_a_model_too_long_says_what_training_does(tmp_path, tok):
    path = write(tmp_path, [chat("hi", "x" * 50), CLEAN[0]])
    result = run_doctor(path, length_tokenizer=tok, length_tokenizer_name="byte", max_seq_length=40, truncation="drop")
    assert "(truncation: drop) drops it" in the_one(result, "too_long").message
    assert result.stats["max_seq_length"]["truncation"] == "drop"
    assert "1 example (50.0%); training (truncation: drop) drops them" in result.format_text()
    result = run_doctor(path, length_tokenizer=tok, max_seq_length=40)  # cut_turns: one exchange, nothing to cut
    assert "(truncation: cut_turns) drops it (no earlier turn to cut)" in the_one(result, "too_long").message
    # plain text is trained with the EOS appended: 40 bytes of text is 41 tokens, over a limit of 40
    text = write(tmp_path, [{"text": "y" * 40}, {"text": "z" * 39}], "text40.jsonl")
    assert "41 tokens (with the EOS training appends" in the_one(run_doctor(text, length_tokenizer=tok, max_seq_length=40),
                                                                  "too_long").message
    text = write(tmp_path, [{"text": "y" * 50}], "text.jsonl")
    assert "cuts it at the limit" in the_one(run_doctor(text, length_tokenizer=tok, max_seq_length=20), "too_long").message


@pytest.mark.parametrize("args, words", [
    (["missing.jsonl"], "not found"),
    (["DATA", "--format", "nonsense"], "unknown format"),
    (["DATA", "--template", "nonsense"], "unknown template"),
])
def test_cli_user_mistakes_are_one_line_exit_2(tmp_path, capsys, args, words):
    data = write(tmp_path, CLEAN)
    args = [data if a == "DATA" else str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and out == ""


def test_template_consistency_flags_a_generation_prompt_that_differs(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from sftlab.data.doctor import run_doctor

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    res = run_doctor(str(data), tokenizer=tok, template=str(bad))
    found = [f for f in res.findings if f.rule == "template_consistency"]
    assert len(found) == 1 and found[0].data["line"] == 1
    clean = run_doctor(str(data), tokenizer=tok)
    assert not [f for f in clean.findings if f.rule == "template_consistency"]
    assert found[0].message.count(str(data)) == 0 and "assistant turn 1" in found[0].message  # where: once, as the finding's


def test_trained_tokens_count_every_per_turn_example_as_prepare_does(tmp_path, tiny_model_dir):
    """A Qwen3-style template splits a multi-turn chat into one example per assistant turn: the doctor's
    token and trained-token totals are prepare's, not only each chat's last example."""
    from test_official_templates import QWEN3, SPECIALS
    from transformers import AutoTokenizer

    from sftlab.data.formats import load_conversations
    from sftlab.data.masking import Labeler
    from sftlab.data.templates import ChatTemplate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS}, replace_extra_special_tokens=False)
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "two"},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "three"}]},
            chat("hi", "hello")]
    data, qwen3 = write(tmp_path, rows), tmp_path / "qwen3.jinja"
    qwen3.write_text(QWEN3)
    examples, report = Labeler(tok, ChatTemplate("qwen3.jinja", QWEN3)).encode(load_conversations(data))
    assert len(examples) == 3  # the two-turn chat is two examples
    stats = run_doctor(data, tokenizer=tok, template=str(qwen3)).stats
    assert stats["trained_tokens"]["total"] == report.n_trained_tokens
    assert round(stats["length"]["mean"] * 3) == report.n_tokens


def test_template_consistency_judges_with_prepares_rule(tmp_path, tiny_model_dir):
    """Reasoning (inlined as <think> where the template has no field for it) and a Qwen3-style template
    (one example per turn, an empty <think> block on the turn it renders last) are clean: prepare
    trains both as the model produces them. A template that adds a new line before the reply is not."""
    from test_official_templates import QWEN3, SPECIALS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS}, replace_extra_special_tokens=False)
    rows = [{"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "reasoning_content": "two plus two is four"},
                          {"role": "user", "content": "3+3?"},
                          {"role": "assistant", "content": "<think>\nthree plus three\n</think>\n\n6"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}]
    data = write(tmp_path, rows)
    qwen3 = tmp_path / "qwen3.jinja"
    qwen3.write_text(QWEN3)
    for template in (None, "chatml", "chatml-tools", str(qwen3)):
        res = run_doctor(data, tokenizer=tok, template=template)
        assert not [f for f in res.findings if f.rule in ("template_consistency", "template")], template
    shifted = tmp_path / "shifted.jinja"
    shifted.write_text(QWEN3.replace("message.role + '\\n<think>", "message.role + '\\n\\n<think>"))
    assert shifted.read_text() != QWEN3
    found = [f for f in run_doctor(data, tokenizer=tok, template=str(shifted)).findings if f.rule == "template_consistency"]
    assert len(found) == 2 and all("does not follow the inference prompt verbatim" in f.message for f in found)


def test_examples_that_differ_only_in_their_calls_or_reasoning_are_not_duplicates(tmp_path):
    """The duplicate checks read message content only, so calls with other arguments (whose content is
    empty) and answers with other reasoning were reported as "same text as ..." though they train other text."""
    from tool_data import TOOLS

    def calling(city: str, call_id: str) -> dict:
        return {"tools": TOOLS, "messages": [
            {"role": "user", "content": "What is the weather like?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."}]}

    def reasoning(thought: str) -> dict:
        return {"messages": [{"role": "user", "content": "Is 7 prime?"},
                             {"role": "assistant", "content": "Yes.", "reasoning_content": thought}]}

    rows = [calling("Paris", "a"), calling("Oslo", "b"), reasoning("7 has no divisor but 1 and 7."),
            reasoning("Check 2, 3: neither divides 7.")]
    result = run_doctor(write(tmp_path, rows))
    assert only(result, "near_duplicate") == [], result.format_text()
    # the same call under another call id is still a duplicate
    assert only(run_doctor(write(tmp_path, [calling("Paris", "a"), calling("Paris", "b")], "dup.jsonl")), "near_duplicate")


def test_csv_row_with_more_cells_than_the_header_is_a_parse_finding(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\nhi,there\nname three colors,red, green, blue\n", encoding="utf-8")
    result = run_doctor(str(path))
    f = the_one(result, "parse")
    assert f.data["line"] == 3 and "row has 4 cells, the header 2" in f.message
    assert result.stats["examples"] == 1 and result.exit_code == 2


def test_folder_as_eval_data_says_it_read_the_held_out_split(tmp_path):
    (tmp_path / "ds").mkdir()
    write(tmp_path, CLEAN, "ds/train.jsonl")
    write(tmp_path, [chat("held-out question", "held-out answer")], "ds/validation.jsonl")
    text = run_doctor(str(tmp_path / "ds"), eval_data=str(tmp_path / "ds")).format_text()
    assert "read 1 file: train.jsonl; skipped (not the train split): validation.jsonl" in text
    assert "read 1 file: validation.jsonl; skipped (not the validation split): train.jsonl" in text
    assert "validation.jsonl; skipped (not the train split)" not in text


def _loss_trained_tokens(examples, pad_id: int) -> int:
    """Positions the training loss computes (core.loss after the collator), for ``examples``."""
    import torch

    from sftlab.core.loss import per_token_losses
    from sftlab.data.collate import PadCollator

    batch = PadCollator(pad_id)(examples)
    hidden = torch.zeros(*batch["labels"].shape, 4)
    _, mask = per_token_losses(hidden, torch.nn.Linear(4, 300), batch["labels"])
    return int(mask.sum())


def test_plain_text_trained_tokens_are_those_the_loss_uses(tmp_path, tok):
    from sftlab.config import Config
    from sftlab.data.prepare import prepare

    texts = ["hello world", "The quick brown fox.", "alpha beta gamma"]
    path = write(tmp_path, [{"text": t} for t in texts])
    doctor = run_doctor(path, tokenizer=tok).stats["trained_tokens"]["total"]
    prepared = prepare(Config(model="unused", data=path), tok)
    used = _loss_trained_tokens(prepared.examples, tok.pad_token_id)
    # every byte and the EOS, but the first token: nothing predicts it
    assert used == sum(len(t) + 1 - 1 for t in texts)
    assert doctor == used == prepared.report.n_trained_tokens
    assert sum(e.n_trained for e in prepared.examples) == used


def test_max_seq_length_below_trainings_minimum_is_refused_up_front(tmp_path, tok):
    from sftlab.core.errors import SftlabError

    path = write(tmp_path, [chat("hi", "x" * 50)])
    for kw in ({"tokenizer": tok}, {"length_tokenizer": tok}, {}):  # training refuses it too: not a checked limit
        with pytest.raises(SftlabError, match="max_seq_length 4 is too small"):
            run_doctor(path, max_seq_length=4, **kw)


def test_a_file_listed_twice_is_not_a_duplicate_of_itself(tmp_path):
    path = write(tmp_path, CLEAN)
    result = run_doctor([path, path])
    found = only(result, "duplicate")
    assert len(found) == 3 and all("listed as two sources" in f.message for f in found)
    assert not any(f"duplicate of {f.where}" in f.message for f in found)
