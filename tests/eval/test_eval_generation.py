"""Batched, left-padded, greedy generation that stops at the template's end-of-turn token."""

from __future__ import annotations

import pytest
import torch

from sftlab.core.errors import SftlabError
from sftlab.data.templates import resolve_template
from sftlab.data.types import Conversation, Message
from sftlab.eval.generation import (
    GenerationSettings,
    generate,
    generate_replies,
    generate_texts,
    prompt_messages,
    reference_reply,
    render_prompt,
    stop_token_ids,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _conv(*pairs):
    return Conversation([Message(r, c) for r, c in pairs])


class ScriptedModel(torch.nn.Module):
    """generate() appends a fixed continuation per prompt (found from the unpadded prompt ids)."""

    def __init__(self, scripts: dict[tuple, list[int]], pad: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.pad, self.calls = scripts, pad, []

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append((input_ids.clone(), attention_mask.clone(), generation_config))
        rows = []
        for ids, att in zip(input_ids, attention_mask):
            n = int(att.sum())
            assert att[-n:].all() and not att[:-n].any(), "prompts must be left-padded"
            rows.append(self.scripts[tuple(ids[-n:].tolist())])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_prompt_and_reference():
    c = _conv(("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"))
    assert [m.content for m in prompt_messages(c)] == ["s", "u1", "a1", "u2"]
    assert reference_reply(c) == "a2"
    assert reference_reply(Conversation(text="plain")) is None


def test_render_prompt_has_generation_prompt(tok):
    tpl = resolve_template(None, tok)
    text = render_prompt(tpl, _conv(("user", "hi"), ("assistant", "yo")))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(SftlabError, match="plain-text"):
        render_prompt(tpl, Conversation(text="x"))


def test_stop_token_ids(tok):
    # The tokenizer's own ChatML template: the end-of-turn token is read from the rendered text.
    assert stop_token_ids(tok, resolve_template(None, tok)) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert stop_token_ids(tok, resolve_template("chatml", tok)) == [2]
    assert stop_token_ids(tok, resolve_template("alpaca", tok)) == [tok.eos_token_id]


def test_cut_at_stop_order_and_left_padding(tok):
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    p1, p2, p3 = "<|im_start|>user\nhello<|im_end|>\n", "abc", "The quick brown fox jumps"
    hello, world = tok.encode("hello", add_special_tokens=False), tok.encode(" world", add_special_tokens=False)
    scripts = {
        tuple(tok.encode(p1, add_special_tokens=False)): hello + [stop] + world,  # stops: text after the stop is dropped
        tuple(tok.encode(p2, add_special_tokens=False)): hello + world,  # never stops: cut at max_new_tokens
        tuple(tok.encode(p3, add_special_tokens=False)): [stop],  # empty reply
    }
    model = ScriptedModel(scripts, pad=tok.pad_token_id)
    model.train()
    out = generate_texts(model, tok, [p1, p2, p3], GenerationSettings(max_new_tokens=5), batch_size=2, stop_ids=[stop])
    assert [g.text for g in out] == ["hello", "hello world", ""]
    assert [g.finished for g in out] == [True, False, True]
    assert [g.n_tokens for g in out] == [len(hello), len(hello + world), 0]
    assert model.training  # mode restored
    assert len(model.calls) == 2  # batches of 2
    cfg = model.calls[0][2]
    assert cfg.do_sample is False and cfg.max_new_tokens == 5 and list(cfg.eos_token_id) == [stop]


def _manual_greedy(model, ids: list[int], n: int, stop: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([out])).logits[0, -1].argmax())
            if nxt == stop:
                break
            out.append(nxt)
    return out[len(ids):]


def test_tiny_model_batched_equals_manual_greedy(tok):
    """Left padding in a batch gives the same greedy tokens as one unpadded prompt at a time."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tpl = resolve_template(None, tok)
    convs = [_conv(("user", "What is 2 + 2?"), ("assistant", "4")),
             _conv(("system", "You are a helpful assistant."), ("user", "Extract the fields as JSON: Maria Lopez, 34"),
                   ("assistant", "{}")),
             _conv(("user", "hi"), ("assistant", "hello"))]
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate(model, tok, tpl, convs, settings, batch_size=3)
    stop = stop_token_ids(tok, tpl)[0]
    for conv, g in zip(convs, batched):
        ids = tok.encode(render_prompt(tpl, conv), add_special_tokens=False)
        manual = _manual_greedy(model, ids, 8, stop)
        assert tok.decode(manual, skip_special_tokens=True) == g.text
        assert g.n_tokens == len(manual)
    assert len({g.text for g in batched}) > 1  # the prompts really produce different replies
    assert generate_replies(model, tok, tpl, convs, settings, batch_size=1) == [g.text for g in batched]


def test_sampling_is_seeded_and_leaves_global_rng(tok, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tpl = resolve_template(None, tok)
    convs = [_conv(("user", "hello"), ("assistant", "x"))]
    s = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5, seed=7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_replies(model, tok, tpl, convs, s)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_replies(model, tok, tpl, convs, s) == a


def test_settings_validation():
    assert GenerationSettings().do_sample is False
    assert GenerationSettings.from_dict({"max_new_tokens": 4}).max_new_tokens == 4
    with pytest.raises(SftlabError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(SftlabError, match="temperature"):
        GenerationSettings(temperature=0)
    with pytest.raises(SftlabError, match="top_p"):
        GenerationSettings(top_p=1.5)
    with pytest.raises(SftlabError, match="unknown generation setting 'beams'"):
        GenerationSettings.from_dict({"beams": 2})


def test_training_eval_row(tok, tiny_model_dir):
    """The trainer's hook: one metrics row with eval_*, general_loss and gen_* keys."""
    from transformers import AutoModelForCausalLM

    from sftlab.eval import encode_examples, evaluate_loss, training_eval

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    tpl = resolve_template(None, tok)
    convs = [_conv(("user", "Extract: Paris"), ("assistant", '{"city": "Paris"}')),
             _conv(("user", "Extract: Berlin"), ("assistant", '{"city": "Berlin"}'))]
    general = [_conv(("user", "hello"), ("assistant", "hello world"))]
    examples, _ = encode_examples(tok, tpl, convs)
    general_examples, _ = encode_examples(tok, tpl, general)
    row = training_eval(model, tok, examples, batch_size=2)
    assert set(row) == {"eval_loss", "eval_perplexity", "eval_tokens"}
    assert row["eval_loss"] == evaluate_loss(model, tok, examples)["loss"]
    row = training_eval(model, tok, examples, batch_size=2, general_examples=general_examples, template=tpl,
                        conversations=convs, settings=GenerationSettings(max_new_tokens=4), max_generate=1)
    assert row["general_loss"] == pytest.approx(evaluate_loss(model, tok, general_examples)["loss"])
    assert {"gen_nonempty_rate", "gen_repetition_rate", "gen_format_adherence", "gen_task_score"} <= set(row)
    assert all(isinstance(v, (int, float)) for v in row.values())
    assert model.training


def _prefix_model(tiny_model_dir, tokens: int = 6):
    """The tiny model with a prefix-tuning adapter whose (scaled random) prefix changes its predictions."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(30)
    return model.eval()


def test_a_prefix_model_generates_with_its_prefix(tok, tiny_model_dir):
    """Greedy generation (batched, left-padded; and chat's streamed path) of a prefix-tuning model is
    the greedy decode of its own forward logits, not the base model's reply."""
    from sftlab.chat import ChatSession

    model = _prefix_model(tiny_model_dir)
    tpl = resolve_template(None, tok)
    convs = [_conv(("user", "What is 2 + 2?"), ("assistant", "4")),
             _conv(("system", "You are a helpful assistant."), ("user", "Extract the fields as JSON: Maria Lopez, 34"),
                   ("assistant", "{}")),
             _conv(("user", "hi"), ("assistant", "hello"))]
    batched = generate(model, tok, tpl, convs, GenerationSettings(max_new_tokens=8), batch_size=3)
    stop = stop_token_ids(tok, tpl)[0]
    differs = 0
    for conv, g in zip(convs, batched):
        ids = tok.encode(render_prompt(tpl, conv), add_special_tokens=False)
        with torch.no_grad():
            manual = _manual_greedy(model, ids, 8, stop)
            with model.disable_adapter():
                base = _manual_greedy(model, ids, 8, stop)
        assert g.token_ids == manual
        differs += manual != base
    assert differs == len(convs)  # the prefix matters: the base model would have said something else
    session = ChatSession(model, tok, tpl, max_new_tokens=8)
    assert session.send("What is 2 + 2?") == batched[0].text


def test_a_reply_leaves_out_the_unknown_token_of_a_vocabulary_without_think():
    """A vocabulary without <think> converts it to the unknown token's id, itself special (SmolLM2's
    <|endoftext|>): decode_reply took that for <think> and kept every <|endoftext|> in the reply's text."""
    from conftest import build_tiny_tokenizer

    from sftlab.eval.generation import decode_reply, special_think_ids

    tok = build_tiny_tokenizer()
    assert tok.unk_token_id == 0 and special_think_ids(tok) == set()
    ids = tok("hi", add_special_tokens=False).input_ids
    assert decode_reply(tok, ids + [0, 0, 1]) == "hi"
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    think = tok("<think>hm</think>4", add_special_tokens=False).input_ids
    assert decode_reply(tok, think + [0]) == "<think>hm</think>4"
