"""Exact labels on the chat templates of more model families (family_templates.py), on the conversations
that break label rules: two tool calls in one turn with empty content, their results in parallel, a
system prompt, reasoning in several turns, and a last turn without reasoning.

The invariant, per template: decoding the trained tokens gives back exactly each assistant turn as the
model writes it at inference (+ its end-of-turn token), nothing else is trained (no tool result, user or
system text), and an example of a split chat is exactly that turn's inference prompt before the reply.
"""

import family_templates as fam
import pytest
import test_official_templates as off
import torch
from transformers import AutoTokenizer

from sftlab.core.errors import SftlabError
from sftlab.core.loss import IGNORE
from sftlab.data.collate import PackedCollator
from sftlab.data.masking import Labeler
from sftlab.data.packing import pack
from sftlab.data.templates import ChatTemplate
from sftlab.data.turns import NOTE_WHOLE
from sftlab.data.types import Conversation, Message

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SEARCH = {"type": "function", "function": {"name": "brave_search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}}}}
R1_EOS = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.add_special_tokens({"additional_special_tokens": off.SPECIALS + fam.SPECIALS}, replace_extra_special_tokens=False)
    return t


def tpl(tok, source: str, **kwargs) -> ChatTemplate:
    return ChatTemplate("t", source, None, {"bos_token": tok.bos_token, "eos_token": tok.eos_token}, kwargs or None)


def call(name: str, args: dict, cid: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def tool_chat(content: str = "", reasoning: tuple = (None, None), calls: int = 2) -> Conversation:
    """A system prompt; ``calls`` calls in one turn; their results in parallel; the answer; a new question
    answered without reasoning."""
    cities = ["Paris", "Rome"][:calls]
    ids = ["abcdefghi", "bcdefghij"]
    return Conversation([
        Message("system", "You report the weather."),
        Message("user", "Weather in " + " and ".join(cities) + "?"),
        Message("assistant", content, reasoning=reasoning[0],
                tool_calls=tuple(call("get_weather", {"city": c}, i) for c, i in zip(cities, ids))),
        *[Message("tool", f'{{"temp": {21 + 4 * k}}}', tool_call_id=ids[k], name="get_weather") for k in range(calls)],
        Message("assistant", "Paris 21, Rome 25." if calls == 2 else "21 degrees in Paris.", reasoning=reasoning[1]),
        Message("user", "Thanks!"),
        Message("assistant", "You're welcome.")], tools=[WEATHER])


PLAIN = Conversation([Message("system", "Be brief."), Message("user", "Hi there"), Message("assistant", "Hello!"),
                      Message("user", "Capital of France?"), Message("assistant", "Paris.")])


def trained(tok, ex) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def labelled(tok, t: ChatTemplate, conv: Conversation, want: list[str], **kw):
    """Label ``conv`` (skeletons on and off must agree) and check the invariant against ``want``, each
    assistant turn's trained text in order."""
    exs, report = Labeler(tok, t, **kw).encode([conv])
    exact, _ = Labeler(tok, t, skeletons=False, **kw).encode([conv])
    assert [(e.input_ids, e.labels) for e in exs] == [(e.input_ids, e.labels) for e in exact]
    assert [r for ex in exs for r in trained(tok, ex)] == want
    for ex in exs:
        text = "".join(trained(tok, ex))
        assert not [m.content for m in conv.messages if m.role != "assistant" and m.content in text]
    if kw.get("reasoning") == "drop":  # the inference prompts of the chat without its reasoning
        conv = Conversation([Message(m.role, m.content, m.tool_calls, None, m.tool_call_id, m.name) for m in conv.messages],
                            tools=conv.tools)
    msgs, turns = conv.messages, [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    if report.n_split:  # each example is the turn's inference prompt, then the turn
        assert len(exs) == len(turns)
        for ex, i in zip(exs, turns):
            first = next(k for k, lab in enumerate(ex.labels) if lab != IGNORE)
            assert tok.decode(ex.input_ids[:first]) == t.render(msgs[:i], add_generation_prompt=True, tools=conv.tools)
    else:
        assert len(exs) == 1 and tok.decode(exs[0].input_ids).startswith(t.render(msgs, tools=conv.tools).rstrip())
    return exs, report


def _qwen_calls(cities=("Paris", "Rome")) -> str:
    return "\n".join(f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call>' for c in cities)


@pytest.mark.parametrize("content", ["", "Let me check."])
def test_qwen25_two_calls_in_one_turn_and_results_in_one_user_turn(tok, content):
    head = content + "\n" if content else ""
    labelled(tok, tpl(tok, fam.QWEN25), tool_chat(content),
             [head + _qwen_calls() + "<|im_end|>", "Paris 21, Rome 25.<|im_end|>", "You're welcome.<|im_end|>"])


def test_qwen3_reasoning_in_several_tool_turns_each_in_its_inference_context(tok):
    """Reasoning kept in history after the last user query (a multi-step tool turn), dropped before it:
    one example per turn, each with the history the template renders at inference."""
    conv = tool_chat(reasoning=("Two cities: call both.", "Compare them."))
    exs, report = labelled(tok, tpl(tok, off.QWEN3), conv, [
        "<think>\nTwo cities: call both.\n</think>\n\n" + _qwen_calls() + "<|im_end|>",
        "<think>\nCompare them.\n</think>\n\nParis 21, Rome 25.<|im_end|>",
        "<think>\n\n</think>\n\nYou're welcome.<|im_end|>"])
    assert report.n_split == 1
    assert "Two cities" in tok.decode(exs[1].input_ids[:-12])  # the tool turn's reasoning, seen before the answer
    assert "Two cities" not in tok.decode(exs[2].input_ids) and "Compare them" not in tok.decode(exs[2].input_ids)


def test_qwen3_with_thinking_off_refuses_reasoning_it_would_train_after_the_closed_block(tok):
    """enable_thinking=false closes <think></think> in the prompt: trained after it, the reasoning would
    teach the model to think after its thinking is closed. A clear error; reasoning: drop trains the answers."""
    conv = tool_chat(reasoning=("Two cities: call both.", "Compare them."))
    t = tpl(tok, off.QWEN3, enable_thinking=False)
    with pytest.raises(SftlabError, match=r"assistant turn 1 has reasoning, but .* closes the thinking block.*reasoning: drop"):
        Labeler(tok, t).encode([conv])
    labelled(tok, t, conv, [_qwen_calls() + "<|im_end|>", "Paris 21, Rome 25.<|im_end|>", "You're welcome.<|im_end|>"],
             reasoning="drop")


def test_llama32_tool_call_and_ipython_result(tok):
    conv = tool_chat(calls=1)
    labelled(tok, tpl(tok, fam.LLAMA32), conv, ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                                "21 degrees in Paris.<|eot_id|>", "You're welcome.<|eot_id|>"])
    with pytest.raises(SftlabError, match="only supports single tool-calls"):
        Labeler(tok, tpl(tok, fam.LLAMA32)).encode([tool_chat()])


def test_llama31_builtin_tool_call_ends_with_eom(tok):
    """A call to a built-in tool ends <|eom_id|> (the model waits for the result), the answer <|eot_id|>."""
    conv = Conversation([Message("user", "Search cats"),
                         Message("assistant", "", tool_calls=(call("brave_search", {"query": "cats"}, "c1"),)),
                         Message("tool", "Cats are great.", tool_call_id="c1", name="brave_search"),
                         Message("assistant", "They are.")], tools=[SEARCH])
    labelled(tok, tpl(tok, fam.LLAMA31_BUILTIN, builtin_tools=["brave_search", "wolfram_alpha"]), conv,
             ['<|python_tag|>brave_search.call(query="cats")<|eom_id|>', "They are.<|eot_id|>"])


def test_mistral_v7_parallel_calls_with_ids(tok):
    """Tools are written before the last user message, so history changes: one example per turn."""
    e = tok.eos_token
    _, report = labelled(tok, tpl(tok, fam.MISTRAL_V7), tool_chat(), [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "bcdefghij"}]' + e, "Paris 21, Rome 25." + e,
        "You're welcome." + e])
    assert report.n_split == 1


def test_mistral_v11_calls_as_name_and_args(tok):
    e = tok.eos_token
    labelled(tok, tpl(tok, fam.MISTRAL_V11), tool_chat(), [
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}' + e,
        "Paris 21, Rome 25." + e, "You're welcome." + e])


@pytest.mark.parametrize("name,end", [("GEMMA3", "<end_of_turn>"), ("PHI4", "<|im_end|>"), ("PHI3", "<|end|>"),
                                      ("LLAMA32", "<|eot_id|>"), ("QWEN25", "<|im_end|>")])
def test_plain_chat_with_a_system_prompt(tok, name, end):
    labelled(tok, tpl(tok, getattr(fam, name)), PLAIN, ["Hello!" + end, "Paris." + end])


def test_gemma2_refuses_a_system_prompt_in_one_line(tok):
    with pytest.raises(SftlabError, match="System role not supported .*fold them into the first user message"):
        Labeler(tok, tpl(tok, fam.GEMMA2)).encode([PLAIN])
    labelled(tok, tpl(tok, fam.GEMMA2), Conversation(PLAIN.messages[1:]), ["Hello!<end_of_turn>", "Paris.<end_of_turn>"])


def test_phi4_mini_end_of_document_eos_is_not_trained_and_the_chat_stays_one_example(tok):
    """Phi-4-mini writes EOS right after the last turn's <|end|> (no generation prompt), not after a turn
    that more follows: it closes the document, and generation stops at <|end|>. Trained, it also made
    every chat look re-rendered (history without it) and split into one example per turn."""
    exs, report = labelled(tok, tpl(tok, fam.PHI4_MINI), PLAIN, ["Hello!<|end|>", "Paris.<|end|>"])
    assert report.n_single == 1 and report.eos_trained is True and "untrained" not in report.summary()
    assert tok.decode(exs[0].input_ids).endswith("Paris.<|end|>" + tok.eos_token)


def test_deepseek_r1_trains_the_reasoning_and_the_close_of_the_think_block_its_prompt_opens(tok):
    """R1's prompt ends <think>\\n and its template renders every turn without reasoning: the model writes
    its reasoning, </think>, then the reply. Trained from the prompt's end alone, the reply was learnt
    inside the thinking block, never closed (and reasoning was refused)."""
    conv = Conversation([Message("system", "Be brief."), Message("user", "2+3?"), Message("assistant", "5", reasoning="Add."),
                         Message("user", "times 4?"), Message("assistant", "20", reasoning="Multiply."),
                         Message("user", "Thanks!"), Message("assistant", "You're welcome.")])
    exs, report = labelled(tok, tpl(tok, fam.DEEPSEEK_R1), conv, [
        "Add.\n</think>\n\n5" + R1_EOS, "Multiply.\n</think>\n\n20" + R1_EOS, "\n</think>\n\nYou're welcome." + R1_EOS])
    assert report.n_split == 1 and report.summary().startswith("3 examples kept from 1 input,")
    for ex in exs:
        first = next(k for k, lab in enumerate(ex.labels) if lab != IGNORE)
        assert tok.decode(ex.input_ids[:first]).endswith("<｜Assistant｜><think>\n")
    assert "Add." not in tok.decode(exs[1].input_ids) and "Multiply." not in tok.decode(exs[2].input_ids)


def test_deepseek_r1_tool_calls_are_refused_in_one_line(tok):
    """R1's template joins a call's arguments as a string; they are dicts (the HF convention): the
    TypeError inside the template is one clear error, not a traceback."""
    with pytest.raises(SftlabError, match=r"<memory>: chat template 't' failed to render: TypeError: .*with tojson"):
        Labeler(tok, tpl(tok, fam.DEEPSEEK_R1)).encode([tool_chat()])


def test_gpt_oss_tool_call_on_the_commentary_channel(tok):
    """The call turn's analysis is shown when the model answers after the result (no final answer yet),
    dropped once it exists: one example per turn, each in its inference context."""
    conv = tool_chat(reasoning=("Need the weather.", "It is warm."), calls=1)
    exs, report = labelled(tok, tpl(tok, fam.GPT_OSS_TOOLS), conv, [
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        "<|channel|>analysis<|message|>It is warm.<|end|><|start|>assistant<|channel|>final<|message|>21 degrees in Paris.<|return|>",
        "<|channel|>final<|message|>You're welcome.<|return|>"])
    assert report.n_split == 1
    assert "Need the weather." in tok.decode(exs[1].input_ids) and "Need the weather." not in tok.decode(exs[2].input_ids)


def test_gpt_oss_two_calls_in_one_turn_are_refused_not_half_trained(tok):
    """GPT-OSS's template renders only a turn's first call: the second call was silently lost."""
    with pytest.raises(SftlabError, match=r"renders 1 of the 2 calls to 'get_weather' in assistant turn 1.*own assistant message"):
        Labeler(tok, tpl(tok, fam.GPT_OSS_TOOLS)).encode([tool_chat()])


def test_packed_split_and_single_examples_keep_their_labels_and_stay_apart(tok):
    """Qwen3's per-turn examples (sharing their history) and a Qwen2.5 chat packed together: each segment
    carries its example's labels (its first masked), positions restart, and no token sees another segment."""
    q3, _ = Labeler(tok, tpl(tok, off.QWEN3)).encode([tool_chat(reasoning=("Two cities: call both.", "Compare them."))])
    q25, _ = Labeler(tok, tpl(tok, fam.QWEN25)).encode([tool_chat()])
    exs = q3 + q25
    rows = pack(exs, sum(len(e.input_ids) for e in exs))
    assert len(rows) == 1
    batch = PackedCollator(tok.pad_token_id, mode="mask")(rows)
    flat = PackedCollator(tok.pad_token_id, mode="flash")(rows)
    seg = torch.cat([torch.full((n,), k) for k, n in enumerate(rows[0].seq_lens)])
    mask = batch["attention_mask"][0, 0, :len(seg), :len(seg)]
    assert torch.equal(mask, (seg[:, None] == seg[None, :]) & torch.ones_like(mask).tril())
    pos, by_segment = 0, {}
    for k, n in zip(range(len(exs)), rows[0].seq_lens):
        ex = next(e for e in exs if e.input_ids == rows[0].input_ids[pos:pos + n] and id(e) not in by_segment.values())
        by_segment[k] = id(ex)
        assert batch["labels"][0, pos:pos + n].tolist() == [IGNORE] + ex.labels[1:]
        assert batch["position_ids"][0, pos:pos + n].tolist() == list(range(n)) == flat["position_ids"][0, pos:pos + n].tolist()
        pos += n
    assert len(set(by_segment.values())) == len(exs)


@pytest.mark.parametrize("source,split", [(off.QWEN3, True), (fam.QWEN25, False), (fam.GPT_OSS_TOOLS, True)])
def test_cut_turns_drops_whole_tool_exchanges_and_keeps_the_inference_context(tok, source, split):
    """Over max_seq_length, cut_turns drops the first exchange with its calls and results: the kept
    example is the last turn in the inference prompt of the shortened chat, no orphan tool result."""
    conv = tool_chat(reasoning=("Need the weather.", "It is warm.") if split else (None, None), calls=1)
    t = tpl(tok, source)
    full, _ = Labeler(tok, t).encode([conv])
    limit = len(full[-1].input_ids) - 4  # more than the untrained new line after the last turn
    exs, report = Labeler(tok, t, max_seq_length=limit).encode([conv])
    assert report.n_turns_cut >= 1 and all(len(e.input_ids) <= limit for e in exs)
    last = exs[-1]
    short = [conv.messages[0], *conv.messages[-2:]]  # system, "Thanks!", the answer
    first = next(k for k, lab in enumerate(last.labels) if lab != IGNORE)
    context, text = tok.decode(last.input_ids[:first]), "".join(trained(tok, last))
    assert context == t.render(short[:-1], add_generation_prompt=True, tools=conv.tools)
    assert "temp" not in tok.decode(last.input_ids) and "You're welcome." in text
    assert not any(m.content in text for m in conv.messages if m.role != "assistant")


def test_cut_turns_on_a_per_turn_example_trains_only_its_own_turn(tok):
    """Nemotron splits a chat only because turn 1's thinking leaves history. Cutting turn 3's example
    (turn 1 goes) leaves a chat that renders as one example: trained whole, turn 2 was trained twice,
    once in its own example and again in turn 3's."""
    conv = Conversation([Message("user", "Question one " * 3), Message("assistant", "Answer one.", reasoning="think " * 5),
                         Message("user", "Question two " * 3), Message("assistant", "Answer two."),
                         Message("user", "Question three " * 3), Message("assistant", "Answer three.")])
    t = tpl(tok, off.NEMOTRON)
    full, _ = Labeler(tok, t).encode([conv])
    assert len(full) == 3
    exs, report = Labeler(tok, t, max_seq_length=len(full[-1].input_ids) - 3).encode([conv])
    assert report.n_turns_cut == 1
    assert [trained(tok, e) for e in exs] == [["<think>\n" + "think " * 5 + "\n</think>\n\nAnswer one.<SPECIAL_12>"],
                                              ["Answer two.<SPECIAL_12>"], ["Answer three.<SPECIAL_12>"]]


@pytest.mark.parametrize("mode", ["keep", "last"])
def test_one_example_reasoning_modes_train_a_tool_call_turn_through_its_end(tok, mode):
    """reasoning: keep|last train the turns as the full render shows them. Qwen3 renders the call turn
    there without its reasoning (before the last query), so it is found anew in the full render: it was
    trained only up to the first special token after its (empty) text, `<tool_call>`, leaving the call
    itself and <|im_end|> untrained. GPT-OSS's call turn likewise stopped at <|channel|>."""
    conv = tool_chat(reasoning=("Two cities: call both.", "Compare them."))
    exs, report = Labeler(tok, tpl(tok, off.QWEN3), reasoning=mode).encode([conv])
    assert report.n_single == 1 and [trained(tok, e) for e in exs] == [[
        _qwen_calls() + "<|im_end|>", "Paris 21, Rome 25.<|im_end|>", "<think>\n\n</think>\n\nYou're welcome.<|im_end|>"]]
    exs, report = Labeler(tok, tpl(tok, fam.GPT_OSS_TOOLS), reasoning=mode).encode(
        [tool_chat(reasoning=("Need the weather.", "It is warm."), calls=1)])
    assert [trained(tok, e) for e in exs][0][0] == (' to=functions.get_weather<|channel|>commentary json<|message|>'
                                                     '{"city": "Paris"}<|call|>')
    assert list(report.rule_notes) == [NOTE_WHOLE]  # one example: no note about per-turn examples
    # not "each turn trained as the model produces it" (reasoning is lost, prompts differ): as the full render has it
    assert report.rule() == ("labels: 1 chat trained as one example, the assistant turns as the full render shows "
                             "them (reasoning: keep|last or masking: all)")


R_CHAT = Conversation([Message("user", "2+3?"), Message("assistant", "5", reasoning="Add."),
                       Message("user", "times 4?"), Message("assistant", "20", reasoning="Multiply.")])


@pytest.mark.parametrize("source,keep,last", [(off.QWEN3, 1, 0), (fam.DEEPSEEK_R1, 2, 1), (fam.GPT_OSS_TOOLS, 1, 0),
                                              (fam.QWEN25, 0, 0)])
def test_one_example_modes_count_the_turns_whose_reasoning_the_full_render_drops(tok, source, keep, last):
    """reasoning: keep|last train one example from the full render: Qwen3 drops the reasoning of turns before
    the last user message, R1 every turn's, GPT-OSS a turn's once a final answer follows; those turns trained
    without it and nothing said so. per_turn trains each with its reasoning: nothing lost."""
    for mode, n in (("keep", keep), ("last", last), ("per_turn", 0)):
        _, report = Labeler(tok, tpl(tok, source), reasoning=mode).encode([R_CHAT, R_CHAT])
        assert report.n_reasoning_lost == 2 * n, mode
        assert report.to_dict()["n_reasoning_lost"] == 2 * n
    _, report = Labeler(tok, tpl(tok, source), masking="all").encode([R_CHAT])  # one example too
    assert report.n_reasoning_lost == keep
    _, report = Labeler(tok, tpl(tok, source), masking="last_assistant", reasoning="keep").encode([R_CHAT])
    assert report.n_reasoning_lost == last  # only the last turn is trained: the others' loss costs nothing


def test_lost_reasoning_is_one_warning_in_prepare_doctor_and_train_check(tmp_path, tiny_model_dir, capsys):
    import json

    from sftlab.cli import main

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "4", "reasoning_content": "two"},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "three"}]}
            for q in ("2+2?", "two plus two?", "2 + 2?")]
    data, q3 = tmp_path / "d.jsonl", tmp_path / "qwen3.jinja"
    data.write_text("\n".join(map(json.dumps, rows)) + "\n")
    q3.write_text(off.QWEN3)
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--template", str(q3)]
    assert main(["prepare", *common, "--reasoning", "keep"]) == 0
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: 3 assistant turns with reasoning are trained without it: reasoning: keep trains each chat "
                      "as one example from its full render, and the chat template drops that reasoning there; set "
                      "reasoning: per_turn to train each turn with its reasoning in its own inference context"]
    assert main(["prepare", *common]) == 0 and "warning:" not in capsys.readouterr().out  # per_turn: each turn keeps it
    assert main(["prepare", *common, "--reasoning", "keep", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [warned[0][len("warning: "):]]
    main(["doctor", str(data), "--model", str(tiny_model_dir), "--template", str(q3), "--reasoning", "keep", "--json"])
    found = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["rule"] == "reasoning_lost"]
    assert len(found) == 1 and "3 assistant turns" in found[0]["message"] and "(this chat and 2 more)" in found[0]["message"]
    assert "reasoning: per_turn" in found[0]["fixes"][0]
    assert main(["train", *common[:4], "--set", f"template={q3}", "--set", "reasoning=keep", "--output-dir",
                 str(tmp_path / "run"), "--check", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)["findings"]
    assert [f["message"] for f in checks if f["rule"] == "reasoning_lost"] == [warned[0][len("warning: "):].split("; set")[0]]


def test_show_marks_the_reasoning_of_the_think_block_r1s_prompt_opens(tok):
    """R1's <think> is in the untrained prompt, so the trained run holds only the reasoning and </think>:
    --show marked no reasoning there (‹…› needed a whole <think>…</think> inside the trained run)."""
    from sftlab.data.prepare import render_example

    exs, _ = Labeler(tok, tpl(tok, fam.DEEPSEEK_R1)).encode([R_CHAT])
    shown = [render_example(tok, ex, color=False) for ex in exs]
    assert shown[0].endswith("<｜Assistant｜><think>\n«‹Add.\n</think>›\n\n5" + R1_EOS + "»")
    assert shown[1].endswith("<｜Assistant｜><think>\n«‹Multiply.\n</think>›\n\n20" + R1_EOS + "»")
    assert "\x1b[43;30mAdd.\n</think>\x1b[42;30m" in render_example(tok, exs[0], color=True)
    # a whole block in the trained run (Qwen3) is marked as before; no block, nothing marked
    q3, _ = Labeler(tok, tpl(tok, off.QWEN3)).encode([R_CHAT])
    assert render_example(tok, q3[-1], color=False).endswith("«‹<think>\nMultiply.\n</think>›\n\n20<|im_end|>»")
    q25, _ = Labeler(tok, tpl(tok, fam.QWEN25)).encode([PLAIN])
    assert "‹" not in render_example(tok, q25[0], color=False)


def test_deepseek_and_cohere_markers_are_added_as_tokens_so_the_reply_ends_at_r1s_eos(tiny_model_dir):
    """missing_tokens knew only lower-case <|...|>: with DeepSeek-R1's template file on a model without its
    tokens, <｜end▁of▁sentence｜> stayed text, no end-of-turn token was found, and the tokenizer's EOS was
    appended after it (and trained); Cohere2's <|START_RESPONSE|> stayed text too."""
    from sftlab.data.templates import missing_tokens

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    r1 = missing_tokens(tpl(t, fam.DEEPSEEK_R1), t)
    assert {"<｜Assistant｜>", "<｜User｜>", R1_EOS, "<｜tool▁sep｜>"} <= set(r1)
    assert "<|START_RESPONSE|>" in missing_tokens(tpl(t, off.COHERE2), t)
    t.add_special_tokens({"additional_special_tokens": r1}, replace_extra_special_tokens=False)
    exs, report = Labeler(t, tpl(t, fam.DEEPSEEK_R1)).encode([R_CHAT])
    assert not report.eos_appended and trained(t, exs[0]) == ["Add.\n</think>\n\n5" + R1_EOS]
