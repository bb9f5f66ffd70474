"""check_template_consistency (the doctor's and export's template_consistency) on real templates: no finding
where prepare trains every turn as the model writes it after its inference prompt, a finding where it could not."""

import family_templates as fam
import pytest
import test_official_templates as off

from sftlab.data.consistency import check_template_consistency
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Conversation, Message

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
REASONING = [Message("user", "2+2?"), Message("assistant", "4", reasoning="two plus two"),
             Message("user", "3+3?"), Message("assistant", "6", reasoning="three")]
SYSTEM = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
          Message("user", "Capital of France?"), Message("assistant", "Paris.")]
CLEAN = {"deepseek-r1": fam.DEEPSEEK_R1, "deepseek-r1-short": off.DEEPSEEK_R1, "mistral-v3": off.MISTRAL_TOOLS,
         "mistral-v7": fam.MISTRAL_V7, "mistral-v11": fam.MISTRAL_V11, "gpt-oss": off.GPT_OSS,
         "gpt-oss-tools": fam.GPT_OSS_TOOLS, "cohere2": off.COHERE2, "glm4": off.GLM4, "qwen3": off.QWEN3,
         "qwen3-thinking-2507": off.QWEN3_THINKING_2507, "qwen2.5": fam.QWEN25, "llama3.2": fam.LLAMA32,
         "phi4-mini": fam.PHI4_MINI, "gemma3": fam.GEMMA3, "nemotron": off.NEMOTRON}


def tpl(source: str) -> ChatTemplate:
    return ChatTemplate("t", source, None, SPECIAL)


@pytest.mark.parametrize("name", CLEAN)
def test_real_templates_are_consistent_as_prepare_trains_them(name):
    """DeepSeek-R1's prompt opens <think> the rendered turn never shows (prepare trains the reasoning and
    </think> there); Mistral v3 writes the system prompt into the last user message only, so the inference
    prompt is no prefix of the chat through the turn (prepare trains each turn after its own prompt); GPT-OSS,
    Cohere2, GLM4 and Mistral open every reply with markup or a space the model writes. Each was a finding."""
    t = tpl(CLEAN[name])
    assert check_template_consistency(t) == []
    assert check_template_consistency(t, [REASONING, SYSTEM]) == []


def _edit(source: str, old: str, new: str) -> str:
    assert old in source
    return source.replace(old, new)


@pytest.mark.parametrize("name,source,conv,words", [
    # R1 with a new line the training render lacks before the <think> its prompt opens
    ("r1", _edit(fam.DEEPSEEK_R1, "{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>\\n<think>\\n'}}"), SYSTEM,
     "not a prefix"),
    # Mistral v3 whose last user message (the one the inference prompt ends with) is closed ' [/INST]', in
    # history '[/INST]': the turn's start is not found, user text would be trained
    ("mistral-v3", _edit(off.MISTRAL_TOOLS, "'\\n\\n' + message.content + '[/INST]'", "'\\n\\n' + message.content + ' [/INST]'"),
     SYSTEM, "not a prefix"),
    # GPT-OSS writing a word after the final channel's header: the model would learn to say it
    ("gpt-oss", _edit(off.GPT_OSS, "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}",
                      "{{- '<|start|>assistant<|channel|>final<|message|>Answer: ' + message.content + '<|return|>' }}"),
     SYSTEM, "verbatim"),
    # Phi-4 ignoring add_generation_prompt: the model would have to write <|im_start|>assistant<|im_sep|> itself
    ("phi4", _edit(fam.PHI4, "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}", ""),
     SYSTEM, "verbatim"),
    # Qwen3 with a blank line before its <think> block after a prompt that ends in a new line
    ("qwen3", _edit(off.QWEN3, "message.role + '\\n<think>", "message.role + '\\n\\n<think>"), REASONING, "verbatim"),
])
def test_a_real_mismatch_in_those_templates_is_still_found(name, source, conv, words):
    problems = check_template_consistency(tpl(source), [conv])
    assert problems and all(words in p for p in problems), problems


def test_a_tool_chat_under_mistral_v3_and_qwen25_is_consistent():
    from test_template_families import tool_chat

    for source in (off.MISTRAL_TOOLS, fam.QWEN25, fam.MISTRAL_V7):
        assert check_template_consistency(tpl(source), [tool_chat(calls=1), tool_chat()]) == []
    conv = Conversation(SYSTEM)
    assert check_template_consistency(tpl(off.MISTRAL_TOOLS), [conv]) == []


def test_the_doctor_finds_no_template_consistency_problem_with_r1_or_mistral_v3(tmp_path, tiny_model_dir):
    import json

    from transformers import AutoTokenizer

    from sftlab.data.doctor import run_doctor

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": off.SPECIALS + fam.SPECIALS}, replace_extra_special_tokens=False)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "reasoning_content": "two plus two"},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)) + "\n")
    for name, source in (("r1", fam.DEEPSEEK_R1), ("mistral-v3", off.MISTRAL_TOOLS)):
        path = tmp_path / f"{name}.jinja"
        path.write_text(source)
        res = run_doctor(str(data), tokenizer=tok, template=str(path))
        assert not [f.message for f in res.findings if f.rule in ("template_consistency", "template")], name


def test_the_doctor_reports_a_refused_tool_chat_as_one_finding_not_an_abort(tmp_path, tiny_model_dir):
    """Llama 3.2 refuses two calls in one turn, R1 concatenates the arguments dict (GPT-OSS renders only the first
    call, which prepare refuses): the token checks report it as a
    'template' finding with its line, but template_tool_check rendered the same chat again unguarded and the
    doctor stopped with one error line and no report. And a file whose every chat the template refuses said
    'each with no trained token' as well (prepare stops on the template error, not on that)."""
    import json

    from test_template_families import tool_chat
    from transformers import AutoTokenizer

    from sftlab.data.doctor import run_doctor

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    conv = tool_chat()
    row = {"tools": conv.tools, "messages": [
        {"role": m.role, "content": m.content, **({"tool_calls": list(m.tool_calls)} if m.tool_calls else {}),
         **({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})} for m in conv.messages]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row) + "\n")
    for name, source in (("llama32", fam.LLAMA32), ("r1", fam.DEEPSEEK_R1), ("gpt-oss", fam.GPT_OSS_TOOLS)):
        path = tmp_path / f"{name}.jinja"
        path.write_text(source)
        res = run_doctor(str(data), tokenizer=tok, template=str(path), max_seq_length=4096)
        found = [(f.rule, f.data["line"]) for f in res.findings if f.severity == "error"]
        assert ("template", 1) in found and "nothing_left" not in dict(found), name


def test_reasoning_the_run_drops_is_left_out_as_prepare_leaves_it_out(tmp_path, tiny_model_dir):
    """reasoning: drop renders Qwen3 with enable_thinking false (the prompt closes an empty block) and trains
    the answers without reasoning; the doctor checked the chats with their reasoning and reported each turn
    as 'the inference prompt is not a prefix'."""
    import json

    from transformers import AutoTokenizer

    from sftlab.data.doctor import run_doctor

    off_thinking = ChatTemplate("t", off.QWEN3, None, SPECIAL, {"enable_thinking": False})
    assert check_template_consistency(off_thinking, [REASONING], reasoning="drop") == []
    assert "not a prefix" in check_template_consistency(off_thinking, [REASONING])[0]  # kept, it would be trained
    # last: the earlier turns' reasoning is left out (here the full render drops it anyway), the last turn's kept
    assert check_template_consistency(tpl(off.QWEN3), [REASONING], reasoning="last") == []
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": off.SPECIALS}, replace_extra_special_tokens=False)
    data, q3 = tmp_path / "d.jsonl", tmp_path / "qwen3.jinja"
    data.write_text(json.dumps({"messages": [{"role": m.role, "content": m.content, "reasoning_content": m.reasoning}
                                             for m in REASONING]}) + "\n")
    q3.write_text(off.QWEN3)
    res = run_doctor(str(data), tokenizer=tok, template=str(q3), reasoning="drop")
    assert not [f.message for f in res.findings if f.rule in ("template_consistency", "template")]


def test_export_checks_the_run_conversations_with_the_reasoning_the_run_kept():
    """An export of a reasoning: drop run (Qwen3, enable_thinking false as the exported default) reported every
    run conversation with reasoning as inconsistent: the check saw the reasoning training had left out."""
    from sftlab.export import _check_export_template, template_with_defaults

    kwargs = {"enable_thinking": False}
    trained = ChatTemplate("t", off.QWEN3, None, SPECIAL, kwargs)
    exported = ChatTemplate("t", template_with_defaults(off.QWEN3, kwargs), None, SPECIAL)
    convs = [Conversation(list(REASONING), source="d.jsonl", line=1)]
    assert _check_export_template(trained, exported, None, convs, "drop") == []
    assert any("not a prefix" in p for p in _check_export_template(trained, exported, None, convs))
