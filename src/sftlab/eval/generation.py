"""Batched generation from conversations: left padding, greedy by default, stops at end-of-turn.

Each conversation's prompt is its messages before the last assistant reply, rendered with the chat
template and the generation prompt, exactly as at inference. Generation stops at the template's
end-of-turn token(s) and the tokenizer's EOS; the returned reply is the decoded text before the
stop token. Used by `sftlab eval`, the training-time eval, and `sftlab generate` / `chat`.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from sftlab.core.errors import SftlabError
from sftlab.data.reasoning import THINK_CLOSE, THINK_OPEN, locate_reasoning
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Conversation, Message

_PROBE = "\x00sftlab-reply\x00"


@dataclass
class GenerationSettings:
    """How replies are generated. The default is greedy decoding: deterministic, no randomness."""

    max_new_tokens: int = 128  # longest reply in tokens
    do_sample: bool = False  # False: greedy (temperature and top_p are then unused)
    temperature: float = 1.0  # sampling temperature (> 0), only with do_sample
    top_p: float = 1.0  # nucleus sampling mass in (0, 1], only with do_sample
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens (1.0: off)
    seed: int = 0  # random seed for sampling; the caller's RNG state is left untouched

    def __post_init__(self):
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature > 0 and math.isfinite(self.temperature), "must be > 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty), "must be > 0"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise SftlabError(f"generation setting '{key}': {getattr(self, key)!r} {why}")

    @classmethod
    def from_dict(cls, values: dict | None) -> "GenerationSettings":
        """Settings from a mapping (e.g. a config section); unknown keys are one clear error."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SftlabError(f"unknown generation setting '{unknown[0]}'", hint=f"use: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """One generated reply. ``finished``: it ended at a stop token (not cut at max_new_tokens)."""

    text: str
    finished: bool
    n_tokens: int  # generated tokens before the stop token
    token_ids: list[int] = field(default_factory=list)  # those tokens
    raw: str = ""  # those tokens decoded with special tokens kept (a tool call may be marked by one)


def prompt_messages(conv: Conversation) -> list[Message]:
    """The messages before the conversation's final assistant reply (the whole chat when it does not end
    with one: a prompt awaiting the reply)."""
    return list(conv.messages[:-1] if reference_message(conv) is not None else conv.messages)


def reference_reply(conv: Conversation) -> str | None:
    """The conversation's last assistant reply: what the model should have said.

    A reply that calls tools reads as its calls in JSON (``[{"name", "arguments"}]``) after its text.
    """
    last = reference_message(conv)
    if last is None:
        return None
    if not last.tool_calls:
        return last.content
    calls = [c.get("function", c) if isinstance(c, dict) else c for c in last.tool_calls]
    calls = [{"name": c.get("name"), "arguments": c.get("arguments")} if isinstance(c, dict) else c for c in calls]
    return (last.content + " " if last.content.strip() else "") + json.dumps(calls, ensure_ascii=False)


def split_reply(text: str) -> tuple[str, str | None]:
    """(answer, reasoning) of a generated reply; reasoning None when the reply has none.

    Training's rule of where reasoning is (:func:`sftlab.data.reasoning.locate_reasoning`): a reply that opens
    with ``<think>`` (as a model trained on reasoning writes it), or whose first think tag is ``</think>``
    (DeepSeek-R1's generation prompt ends with ``<think>``), holds reasoning up to its first ``</think>``. Unlike
    training data, nothing is refused: a block never closed (cut at max_new_tokens) is all reasoning and no
    answer, and tags after the reasoning stay in the answer. The answer is what task scores and tool calls
    are judged on: the reference reply holds no reasoning.
    """
    rest, reasoning, _ = locate_reasoning(text)
    if reasoning is None:
        return text, None
    return rest.lstrip(), reasoning.strip("\n")


def special_think_ids(tokenizer) -> set[int]:
    """The ids of ``<think>``/``</think>`` where the tokenizer makes them special tokens (some reasoning
    models do), which a reply's text keeps: :func:`split_reply` needs them; empty otherwise."""
    return special_ids_of(tokenizer, (THINK_OPEN, THINK_CLOSE))


def special_ids_of(tokenizer, tokens) -> set[int]:
    """The ids of those of ``tokens`` that are special tokens of ``tokenizer``. A token not in the vocabulary
    converts to the unknown token's id, itself special (SmolLM2's <|endoftext|>): that one is no match."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    ids = {x: tokenizer.convert_tokens_to_ids(x) for x in tokens}
    return {t for x, t in ids.items() if t in special and tokenizer.convert_ids_to_tokens(t) == x}


def decode_reply(tokenizer, ids: list[int]) -> str:
    """A reply's text without special tokens, except ``<think>``/``</think>`` (:func:`special_think_ids`)."""
    think = special_think_ids(tokenizer)
    if not think:
        return tokenizer.decode(ids, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    return tokenizer.decode([t for t in ids if t in think or t not in special], skip_special_tokens=False)


def reference_message(conv: Conversation) -> Message | None:
    """The conversation's final message when it is the assistant's reply (None otherwise: a prompt that
    ends on a user turn or tool result has no reference)."""
    return conv.messages[-1] if conv.messages and conv.messages[-1].role == "assistant" else None


def render_prompt(template: ChatTemplate, conv: Conversation) -> str:
    """The prompt text for one conversation: template + generation prompt, as at inference."""
    if conv.is_text:
        raise SftlabError(f"{conv.where()}: plain-text examples have no prompt to generate from",
                          hint="use chat data (messages, sharegpt, alpaca, prompt_completion) to evaluate generation")
    return template.render(prompt_messages(conv), add_generation_prompt=True, tools=conv.tools)


def stop_token_ids(tokenizer, template: ChatTemplate | None) -> list[int]:
    """Token ids that end a reply: the template's end-of-turn token and the tokenizer's EOS.

    For a template with no known end-of-turn string (the tokenizer's own), it is read from the
    rendered text: the special token that comes right after a reply.
    """
    ids: list[int] = []
    eot = template.eot if template is not None else None
    if eot is None and template is not None:
        text = template.render([Message("user", "hi"), Message("assistant", _PROBE)])
        after = text.split(_PROBE, 1)[1] if _PROBE in text else ""
        specials = sorted({s for s in tokenizer.all_special_tokens if s} | set(tokenizer.get_added_vocab()),
                          key=len, reverse=True)
        eot = next((s for s in specials if after.startswith(s)), None)
    if eot:
        eot_ids = tokenizer.encode(eot, add_special_tokens=False)
        if len(eot_ids) == 1:
            ids.append(eot_ids[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise SftlabError("cannot tell when a reply ends: the template has no end-of-turn token and the tokenizer no EOS",
                          hint="use a template with an end-of-turn token, e.g. --template chatml")
    return ids


def _generation_config(settings: GenerationSettings, stop_ids: list[int], pad_id: int):
    from transformers import (
        GenerationConfig,  # deferred: heavy library, imported on first use
    )

    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                  eos_token_id=list(stop_ids), pad_token_id=pad_id, num_beams=1)
    if settings.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = settings.repetition_penalty
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    return GenerationConfig(**kwargs)


def is_prefix_model(model) -> bool:
    """A peft model whose active adapter is prefix tuning."""
    cfg = getattr(model, "active_peft_config", None) if hasattr(model, "peft_config") else None
    return cfg is not None and str(getattr(cfg, "peft_type", "")).upper().endswith("PREFIX_TUNING")


def pass_prefix_to_generate(model) -> bool:
    """Make ``model.generate`` attend to a prefix-tuning adapter's virtual key/values; True for such a model.

    peft injects the prefix as ``past_key_values`` when the cache it is given is empty. transformers 5
    names the cache ``cache`` in generation (``past_key_values`` is a deprecated alias), so peft sees no
    cache, injects the prefix under the old name, and the model uses the new one: generation ran the
    base model alone (``Both past_key_values and cache are set ... ignoring deprecated past_key_values``)
    while the loss measured the prefix model. Here peft's generation inputs see the cache under the name
    it reads, and the model gets the prefixed cache back under the name it reads. Idempotent."""
    if not is_prefix_model(model):
        return False
    if getattr(model, "_sftlab_prefix_generate", False):
        return True
    base_prepare, prepare = model.base_model_prepare_inputs_for_generation, model.prepare_inputs_for_generation
    takes_cache = "cache" in inspect.signature(model.get_base_model().forward).parameters

    @functools.wraps(base_prepare)
    def base_inputs(*args, **kwargs):
        out = base_prepare(*args, **kwargs)
        if "cache" in out and out.get("past_key_values") is None:
            out["past_key_values"] = out.pop("cache")
        return out

    @functools.wraps(prepare)
    def inputs(*args, **kwargs):
        model.base_model_prepare_inputs_for_generation = base_inputs
        try:
            out = prepare(*args, **kwargs)
        finally:
            model.base_model_prepare_inputs_for_generation = base_prepare
        if takes_cache and "past_key_values" in out:
            out["cache"] = out.pop("past_key_values")
        return out

    model.prepare_inputs_for_generation = inputs
    model._sftlab_prefix_generate = True
    return True


def _pads_move_the_prefix(model) -> bool:
    """A prefix-tuning model with sliding-window attention (Gemma 2/3, Mistral): left pads sit between the
    prefix and the prompt, so a sliding window over the prompt's first tokens holds other prefix tokens
    than without pads, and a reply depended on the prompts batched with it."""
    if not is_prefix_model(model):
        return False
    cfg = model.get_base_model().config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(cfg, "sliding_window", None)) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())


def generate_texts(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings | None = None,
                   batch_size: int = 8, stop_ids: Sequence[int] | None = None) -> list[Generation]:
    """Generate one reply per rendered prompt string, in the order given.

    Prompts are tokenized without extra special tokens (the template writes them) and left-padded
    in batches of ``batch_size``. ``stop_ids``: default the tokenizer's EOS. The model is put in eval
    mode for the call and its previous mode restored; with sampling, the global RNG is not disturbed.
    """
    settings = settings or GenerationSettings()
    if batch_size < 1:
        raise SftlabError(f"batch size {batch_size} must be at least 1")
    stops = list(stop_ids) if stop_ids else [tokenizer.eos_token_id]
    stop_set = set(stops)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    dev = next(model.parameters()).device
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    # Similar lengths share a batch (less padding); results go back to the caller's order.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[Generation | None] = [None] * len(encoded)
    config = _generation_config(settings, stops, pad_id)
    pass_prefix_to_generate(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
            if _pads_move_the_prefix(model):  # only prompts of one length share a batch: no pads
                batches = [[i for i in b if len(encoded[i]) == n] for b in batches
                           for n in dict.fromkeys(len(encoded[i]) for i in b)]
            for idx in batches:
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                att = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):  # left padding: the prompt ends where generation starts
                    n = len(encoded[i])
                    ids[r, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
                    att[r, width - n:] = 1
                gen = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), generation_config=config)
                for r, i in enumerate(idx):
                    new = gen[r, width:].tolist()
                    cut = next((k for k, t in enumerate(new) if t in stop_set), None)
                    kept = new if cut is None else new[:cut]
                    out[i] = Generation(decode_reply(tokenizer, kept), cut is not None, len(kept), kept,
                                        tokenizer.decode(kept, skip_special_tokens=False))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def generate(model, tokenizer, template: ChatTemplate, conversations: Sequence[Conversation],
             settings: GenerationSettings | None = None, batch_size: int = 8) -> list[Generation]:
    """Generate the last assistant reply of each conversation; see :func:`generate_texts`."""
    prompts = [render_prompt(template, c) for c in conversations]
    return generate_texts(model, tokenizer, prompts, settings, batch_size, stop_token_ids(tokenizer, template))


def generate_replies(model, tokenizer, template: ChatTemplate, conversations: Sequence[Conversation],
                     settings: GenerationSettings | None = None, batch_size: int = 8) -> list[str]:
    """The decoded replies (without the stop token), one per conversation, in order."""
    return [g.text for g in generate(model, tokenizer, template, conversations, settings, batch_size)]
