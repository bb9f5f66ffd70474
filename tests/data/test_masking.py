"""Exact response-only labels: decoding the trained tokens gives back exactly the replies."""

import json

import pytest
from conftest import COHERE_LIKE, random_conversations
from transformers import AutoTokenizer

from sftlab.core.errors import SftlabError
from sftlab.data.formats import load_conversations
from sftlab.data.masking import IGNORE, Labeler, trained_text
from sftlab.data.templates import ChatTemplate, resolve_template, template_names
from sftlab.data.types import Conversation, Message


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _records_in_format(fmt: str, conv: Conversation) -> dict:
    sys = [m.content for m in conv.messages if m.role == "system"]
    turns = [m for m in conv.messages if m.role != "system"]
    if fmt == "messages":
        return {"messages": [{"role": m.role, "content": m.content} for m in conv.messages]}
    if fmt == "sharegpt":
        out = {"conversations": [{"from": "human" if m.role == "user" else "gpt", "value": m.content} for m in turns]}
        if sys:
            out["system"] = sys[0]
        return out
    if fmt == "alpaca":
        out = {"instruction": turns[0].content, "input": "", "output": turns[1].content}
        if sys:
            out["system"] = sys[0]
        return out
    if fmt == "prompt_completion":
        return {"prompt": turns[0].content, "completion": turns[1].content}
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion"])
@pytest.mark.parametrize("template", ["tokenizer"] + template_names())
def test_decoded_trained_tokens_are_exactly_the_replies(tmp_path, tok, fmt, template):
    convs = random_conversations(seed=hash((fmt, template)) % 1000)
    if fmt in ("alpaca", "prompt_completion"):  # single-turn formats
        convs = [Conversation([m for m in c.messages if m.role != "system"][:2]) for c in convs]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(_records_in_format(fmt, c)) + "\n" for c in convs), encoding="utf-8")
    loaded = load_conversations(str(path))
    tpl = resolve_template(template, tok)
    examples, report = Labeler(tok, tpl).encode(loaded)
    assert report.n_kept == len(convs)
    eot = tpl.eot or "<|im_end|>"
    for conv, ex in zip(loaded, examples):
        expected = [r + eot for r in conv.replies()]
        assert trained_text(tok, ex) == expected
        # and nothing else: the untrained part never contains a reply's end-of-turn that is trained
        assert ex.n_trained == sum(len(tok(e, add_special_tokens=False)["input_ids"]) for e in expected)


def test_prompt_tokens_match_inference_rendering(tok):
    """The tokens before a reply are exactly what inference sees: the prompt with the generation prompt."""
    tpl = resolve_template("chatml", tok)
    conv = random_conversations(seed=3, n=1)[0]
    (ex,), _ = Labeler(tok, tpl).encode([conv])
    first = ex.labels.index(next(x for x in ex.labels if x != IGNORE))
    i = next(k for k, m in enumerate(conv.messages) if m.role == "assistant")
    prompt = tpl.render(conv.messages[:i], add_generation_prompt=True)
    assert ex.input_ids[:first] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_last_assistant_and_all_masking(tok):
    conv = Conversation([Message("user", "a"), Message("assistant", "first"), Message("user", "b"),
                         Message("assistant", "second")])
    tpl = resolve_template("chatml", tok)
    (last,), _ = Labeler(tok, tpl, masking="last_assistant").encode([conv])
    assert trained_text(tok, last) == ["second<|im_end|>"]
    (every,), _ = Labeler(tok, tpl, masking="all").encode([conv])
    assert every.labels == [IGNORE] + every.input_ids[1:]  # the first token: nothing predicts it


def test_eos_stays_trained_when_pad_equals_eos(tok):
    """The classic trap: pad == EOS and a collator that masks pad ids would mask the EOS too."""
    from sftlab.data.collate import PadCollator

    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.pad_token = tok2.eos_token
    tpl = resolve_template("chatml", tok2)
    convs = [Conversation([Message("user", "hi"), Message("assistant", "hello there")]),
             Conversation([Message("user", "x"), Message("assistant", "y")])]
    examples, _ = Labeler(tok2, tpl).encode(convs)
    batch = PadCollator(tok2.pad_token_id)(examples)
    eos = tok2.convert_tokens_to_ids("<|im_end|>")
    for r, ex in enumerate(examples):
        trained = batch["labels"][r][batch["labels"][r] != IGNORE].tolist()
        assert trained[-1] == eos
    # padding positions are masked by position even though the pad id is the EOS id
    short = 1
    n = len(examples[short].input_ids)
    assert (batch["labels"][short, n:] == IGNORE).all()
    assert (batch["input_ids"][short, n:] == eos).all()


def test_template_without_end_of_turn_gets_eos_appended(tok):
    tpl = ChatTemplate("bare", "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    conv = Conversation([Message("user", "q"), Message("assistant", "answer")])
    lab = Labeler(tok, tpl)
    (ex,), report = lab.encode([conv])
    assert trained_text(tok, ex) == ["answer" + tok.eos_token]
    assert report.eos_appended


def test_template_that_rewrites_content_is_a_clear_error(tok):
    tpl = ChatTemplate("upper", "{% for m in messages %}{{ m.content | upper }}<|im_end|>{% endfor %}")
    conv = Conversation([Message("user", "q"), Message("assistant", "answer")], source="d.jsonl", line=7)
    with pytest.raises(SftlabError, match=r"d.jsonl:7: .*does not render assistant reply 1 verbatim"):
        Labeler(tok, tpl).encode([conv])


def test_trimming_template_is_matched_on_trimmed_text(tok):
    tpl = ChatTemplate("trim", "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    conv = Conversation([Message("user", "q"), Message("assistant", "  spaced reply \n")])
    (ex,), _ = Labeler(tok, tpl).encode([conv])
    assert trained_text(tok, ex) == ["spaced reply<|im_end|>"]


def test_truncation_policies_are_reported(tok):
    tpl = resolve_template("chatml", tok)
    long_turn = "word " * 60
    conv = Conversation([Message("system", "s"), Message("user", long_turn), Message("assistant", long_turn),
                         Message("user", "short"), Message("assistant", "ok")], source="f.jsonl", line=3)
    full_len = len(Labeler(tok, tpl).encode([conv])[0][0].input_ids)
    assert full_len > 64
    (cut,), rep = Labeler(tok, tpl, max_seq_length=64, truncation="cut_turns").encode([conv])
    assert rep.n_turns_cut == 1 and trained_text(tok, cut) == ["ok<|im_end|>"]
    assert tok.decode(cut.input_ids).startswith("<|im_start|>system\ns<|im_end|>")
    dropped, rep = Labeler(tok, tpl, max_seq_length=64, truncation="drop").encode([conv])
    assert dropped == [] and rep.n_dropped_too_long == 1 and rep.dropped[0][0] == "f.jsonl:3"
    long_reply = Conversation([Message("user", "q"), Message("assistant", long_turn)])
    (trunc,), rep = Labeler(tok, tpl, max_seq_length=64, truncation="truncate").encode([long_reply])
    assert len(trunc.input_ids) == 64 and rep.n_truncated == 1 and trunc.n_trained > 0


@pytest.mark.parametrize("truncation", ["cut_turns", "drop", "truncate"])
def test_example_over_the_limit_by_its_untrained_tail_only_is_kept_whole(tok, truncation):
    # chatml ends each turn "<|im_end|>\n": at max_seq_length = length - 1 only the "\n" is over, untrained;
    # cut_turns and drop dropped the whole example, though cutting that "\n" loses nothing trained
    tpl = resolve_template("chatml", tok)
    conv = Conversation([Message("user", "q"), Message("assistant", "the reply")], source="h.jsonl", line=1)
    (full,), _ = Labeler(tok, tpl).encode([conv])
    assert full.labels[-1] == IGNORE and tok.decode(full.input_ids[-1:]) == "\n"
    (ex,), rep = Labeler(tok, tpl, max_seq_length=len(full.input_ids) - 1, truncation=truncation).encode([conv])
    assert ex.input_ids == full.input_ids[:-1] and ex.labels == full.labels[:-1]
    assert trained_text(tok, ex) == ["the reply<|im_end|>"]
    assert (rep.n_kept, rep.n_dropped_too_long, rep.n_turns_cut, rep.n_truncated) == (1, 0, 0, 0)
    # one token less and the reply's end-of-turn token is over: the policy applies as before
    _, rep = Labeler(tok, tpl, max_seq_length=len(full.input_ids) - 2, truncation=truncation).encode([conv])
    assert (rep.n_dropped_too_long, rep.n_truncated) == ((0, 1) if truncation == "truncate" else (1, 0))


def test_example_left_without_trained_token_is_dropped_and_reported(tok):
    tpl = resolve_template("chatml", tok)
    conv = Conversation([Message("user", "word " * 80), Message("assistant", "ok")], source="g.jsonl", line=2)
    examples, rep = Labeler(tok, tpl, max_seq_length=32, truncation="truncate").encode([conv])
    assert examples == [] and rep.n_dropped_no_trained == 1
    assert rep.dropped == [("g.jsonl:2", "no trained token left")]
    with pytest.raises(SftlabError, match="no trained token"):
        Labeler(tok, tpl, max_seq_length=32, truncation="truncate").encode([conv], strict_empty=True)


def test_plain_text_trains_every_predicted_token_and_eos(tok):
    conv = Conversation(text="just some text")
    (ex,), _ = Labeler(tok, None).encode([conv])
    assert ex.labels == [-100] + ex.input_ids[1:]  # the first token: nothing predicts it
    assert tok.decode(ex.input_ids) == "just some text" + tok.eos_token


def test_builtin_templates_need_their_tokens(tok):
    from sftlab.data.templates import missing_tokens

    assert missing_tokens(resolve_template("chatml", tok), tok) == []
    assert "<|eot_id|>" in missing_tokens(resolve_template("llama3", tok), tok)


def test_unknown_template_and_masking_are_clear_errors(tok):
    with pytest.raises(SftlabError, match="unknown template 'nope'"):
        resolve_template("nope", tok)
    with pytest.raises(SftlabError, match="unknown masking"):
        Labeler(tok, None, masking="bogus")


def test_sentencepiece_style_tokenizer_pieces_get_no_extra_space():
    """Tokenizers that prepend '▁' to every encode call must not add it to each reply piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz[]/INST ▁"))
    t.train_from_iterator(["the quick brown fox [INST] jumps [/INST] over the lazy dog"] * 10, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tpl = resolve_template("mistral", tok)
    conv = Conversation([Message("user", "the fox"), Message("assistant", "jumps over")])
    lab = Labeler(tok, tpl)
    assert lab._prepends
    (ex,), _ = lab.encode([conv])
    trained = [i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE]
    pieces = tok.convert_ids_to_tokens(trained)
    assert not pieces[0].startswith("▁"), pieces  # the reply follows "[/INST]" directly, as rendered
    assert pieces[-1] == "</s>"


# Cohere2-style: a reply ends with two tokens, and generation stops at the second (the tokenizer's EOS).
@pytest.fixture(scope="module")
def cohere_tok(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.add_special_tokens({"additional_special_tokens": ["<|START_OF_TURN_TOKEN|>", "<|END_RESPONSE|>",
                                                        "<|END_OF_TURN_TOKEN|>"]})
    t.eos_token = "<|END_OF_TURN_TOKEN|>"
    return t


@pytest.mark.parametrize("masking", ["all_assistant", "last_assistant", "all"])
@pytest.mark.parametrize("skeletons", [True, False])
def test_eos_trained_on_chatml(tok, masking, skeletons):
    convs = random_conversations(seed=3, n=60)
    _, report = Labeler(tok, resolve_template("chatml", tok), masking=masking, skeletons=skeletons).encode(convs)
    replies = sum(len(c.replies()) for c in convs)
    trained_replies = replies if masking != "last_assistant" else len(convs)
    assert report.eos_trained is True
    # under masking=all the user turns' <|im_end|> follow trained text too
    assert report.n_reply_ends == report.n_reply_ends_trained >= trained_replies
    assert "end-of-turn token untrained" not in report.summary()


@pytest.mark.parametrize("skeletons", [True, False])
def test_cohere_turn_trains_both_end_tokens(cohere_tok, skeletons):
    """The turn ends `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>` at inference: both are trained (the label
    rule trains through the turn's last end-of-turn token), and the report says every end is trained."""
    tpl = ChatTemplate("tokenizer", COHERE_LIKE, None, {})
    convs = random_conversations(seed=4, n=60)
    lab = Labeler(cohere_tok, tpl, skeletons=skeletons)
    examples, report = lab.encode(convs)
    for ex, conv in zip(examples, convs):
        runs = trained_text(cohere_tok, ex)
        assert len(runs) == len(conv.replies())
        assert all(r.endswith("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>") for r in runs)
    replies = sum(len(c.replies()) for c in convs)
    assert (report.n_reply_ends, report.n_reply_ends_trained) == (2 * replies, 2 * replies)
    assert report.eos_trained is True and "end-of-turn token untrained" not in report.summary()


def test_eos_trained_is_none_without_any_end_token(tok):
    class NoEos:
        """The tiny tokenizer with neither an EOS nor a template end-of-turn token."""

        def __getattr__(self, name):
            return None if name == "eos_token" else getattr(tok, name)

        def __call__(self, *a, **k):
            return tok(*a, **k)

    (_, report) = Labeler(NoEos(), None).encode([Conversation(text="plain text")])
    assert report.eos_trained is None and report.n_reply_ends == 0
