"""Does the prompt a user sends at inference (rendered with the generation prompt) start exactly
what the model saw in training? :func:`check_template_consistency` answers for any template."""

from __future__ import annotations

import re
from dataclasses import replace

from sftlab.core.errors import SftlabError
from sftlab.data.reasoning import split_reasoning
from sftlab.data.roles import FormatError
from sftlab.data.templates import ChatTemplate
from sftlab.data.turns import _align, _common
from sftlab.data.types import Conversation, Message

# Conversations used when no data is given: with and without a system prompt, one and several turns.
SAMPLE_CONVERSATIONS: list[list[Message]] = [
    [Message("user", "What is the capital of France?"), Message("assistant", "Paris.")],
    [Message("system", "You are a concise assistant."), Message("user", "Say hello."),
     Message("assistant", "Hello!"), Message("user", "And in German?"), Message("assistant", "Hallo!")],
    [Message("user", "Count to two."), Message("assistant", "1, 2"), Message("user", "Now to three."),
     Message("assistant", "1, 2, 3"), Message("user", "Thanks."), Message("assistant", "You are welcome.")],
]


_PROBE = "\ue002reply\ue002"
# markup a reply opening starts with: <|channel|>, <|START_RESPONSE|>, <think>, [TOOL_CALLS]
_MARKUP = r"(?:<\|?[A-Za-z_/][\w./-]*\|?>|\[/?[A-Z_]+\])"
_OPENING = re.compile(rf"\s*(?:{_MARKUP}(?:.*{_MARKUP})?)?\s*", re.S)  # markup first and last, or white space


def _reply_opening(template: ChatTemplate) -> str:
    """What the template writes between the generation prompt and every reply, the model's to write: GPT-OSS's
    ``<|channel|>final<|message|>``, Cohere2's ``<|START_RESPONSE|>``, Mistral's space after ``[/INST]``, GLM's
    new line after ``<|assistant|>``. Empty where it opens or ends with text (the model would learn to say it),
    starts with white space after a prompt that already ends in it (a stray blank line before the reply), or is
    markup where the template writes no generation prompt (the model would have to write the assistant header)."""
    try:
        prompt = template.render([Message("user", "hi")], add_generation_prompt=True)
        turn = template.render([Message("user", "hi"), Message("assistant", _PROBE)])
        bare = template.render([Message("user", "hi")])
    except SftlabError:
        return ""
    if not turn.startswith(prompt) or _PROBE not in turn[len(prompt):]:
        return ""
    opening = turn[len(prompt):turn.index(_PROBE, len(prompt))]
    if not _OPENING.fullmatch(opening) or (opening.strip() and bare == prompt):
        return ""  # text; or markup where the template ignores add_generation_prompt: the assistant header itself
    return "" if opening[:1].isspace() and prompt[-1:].isspace() else opening


def _answers(rest: str, m: Message, opening: str, label: str, opened: bool) -> list[str]:
    """Where the reply may start in ``rest`` (what the model writes after its inference prompt): at once; after
    the template's reply opening; after a ``<think>`` block (one the prompt ``opened``: its reasoning and
    ``</think>``), the opening's or its own; after the reasoning and the opening (GPT-OSS's analysis channel)."""
    out = [rest]
    heads = [rest] + ([rest[len(opening):]] if opening and rest.startswith(opening) else [])
    for head in heads:
        out.append(head)
        if head.startswith("<think>") or (opened and head is rest and "</think>" in head):
            try:
                out.append(split_reasoning(head if head.startswith("<think>") else "<think>" + head, label)[0])
            except FormatError:
                pass
    r = (m.reasoning or "").strip()
    after = rest[rest.index(r) + len(r):] if r and r in rest else ""
    if opening and opening in after:
        out.append(after[after.index(opening) + len(opening):])
    return out


def _without_reasoning(msgs: list[Message], reasoning: str) -> list[Message]:
    """The messages as prepare trains them under ``reasoning: drop`` (no reasoning) or ``last`` (only the last
    assistant turn's)."""
    if reasoning not in ("drop", "last") or all(m.reasoning is None for m in msgs):
        return msgs
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    keep = turns[-1] if reasoning == "last" and turns else -1
    return [m if m.reasoning is None or i == keep else replace(m, reasoning=None) for i, m in enumerate(msgs)]


def _excerpt(text: str, pos: int) -> str:
    return text[max(0, pos - 20): pos + 25]


def _as_messages(conv) -> tuple[list[Message], str]:
    if isinstance(conv, Conversation):
        return list(conv.messages), conv.where()
    msgs = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in conv]
    return msgs, ""


def check_template_consistency(template: ChatTemplate | str,
                               conversations: list[Conversation] | list[list[Message]] | None = None,
                               reasoning: str = "per_turn") -> list[str]:
    """Problems found when comparing training and inference renderings; empty if they agree.

    Judged by the rule ``prepare`` labels with (``sftlab.data.turns``): each assistant turn is trained
    as it follows its inference prompt (the messages before it, rendered with the generation prompt
    and the conversation's tools) in the conversation rendered through that turn. Where history renders
    differently (Qwen3 drops earlier reasoning, Mistral v3 moves the system prompt to the last user
    message) prepare makes one example per turn, so only the turn's own render is compared. For each
    assistant turn of each conversation (default: :data:`SAMPLE_CONVERSATIONS`) the turn must start where
    the inference prompt ends (:func:`_start`: a prefix; DeepSeek-R1's open ``<think>``; the prompt's
    whole generation prompt found in the re-rendered chat), and the reply must follow it verbatim, after
    what the model writes first: the template's reply opening (:func:`_reply_opening`) and the reasoning
    block (reasoning inlined as ``<think>`` where the template has no field for it, as prepare trains it,
    Qwen3's empty block, GPT-OSS's analysis channel). Each problem names the conversation, the turn, the
    first differing character and a short excerpt
    of both texts. ``template`` is a ChatTemplate or a jinja source string. ``reasoning``: the run's; under
    ``drop`` (``last``) the reasoning of every (every earlier) turn is left out, as prepare leaves it out.
    """
    if isinstance(template, str):
        template = ChatTemplate("template", template)
    sample = conversations is None
    problems: list[str] = []
    opening = _reply_opening(template)
    for k, conv in enumerate(SAMPLE_CONVERSATIONS if sample else conversations, start=1):
        if isinstance(conv, Conversation) and conv.is_text:
            continue
        msgs, where = _as_messages(conv)
        msgs = _without_reasoning(msgs, reasoning)
        tools = conv.tools if isinstance(conv, Conversation) else None
        label = where or f"{'sample ' if sample else ''}conversation {k}"
        try:
            template.render(msgs, tools=tools)
        except SftlabError as exc:
            if not (sample and any(m.role == "system" for m in msgs)):  # a template may refuse system turns
                problems.append(f"{label}: {exc}")
            continue
        turn = 0
        for i, m in enumerate(msgs):
            if m.role != "assistant":
                continue
            turn += 1
            prompt = template.render(msgs[:i], add_generation_prompt=True, tools=tools)
            upto = template.render(msgs[:i + 1], tools=tools)
            start = _start(template, msgs[:i], m, prompt, upto, tools)
            if start is None:
                pos = next((j for j, (a, b) in enumerate(zip(prompt, upto)) if a != b), min(len(prompt), len(upto)))
                problems.append(
                    f"{label}, assistant turn {turn}: the inference prompt is not a prefix of the training text; "
                    f"they differ at character {pos}: inference {_excerpt(prompt, pos)!r} vs training {_excerpt(upto, pos)!r}")
                continue
            rest = upto[start:]
            opened = prompt.rstrip().endswith("<think>")
            if not any(a.startswith(m.content) or a.startswith(m.content.strip())
                       for a in _answers(rest, m, opening, label, opened)):
                problems.append(
                    f"{label}, assistant turn {turn}: the reply does not follow the inference prompt verbatim "
                    f"(character {len(prompt)}): training has {rest[:40]!r}, the reply is {m.content[:40]!r}")
    return problems


def _start(template: ChatTemplate, before: list[Message], m: Message, prompt: str, upto: str, tools) -> int | None:
    """Where the turn the model writes after ``prompt`` starts in ``upto`` (the chat rendered through it), as
    prepare finds it; None where the two disagree in a way prepare cannot place the turn in.

    The prompt is a prefix; or it opens a ``<think>`` block the rendered turn does not show (DeepSeek-R1: the
    model writes its reasoning and ``</think>`` there, then the turn as rendered); or the chat through the turn
    renders its history differently (Mistral v3 writes the system prompt into the last user message only, so
    the inference prompt has it where the turn's render has not): prepare trains the turn in its own example
    after its exact inference prompt, from where the end of that prompt, generation prompt whole, is found."""
    start, exact = _align(prompt, upto)
    if exact:
        return start
    if prompt.rstrip().endswith("<think>"):
        base = prompt[:prompt.rindex("<think>")]
        if upto.startswith(base) and "<think>" not in upto[len(base):] and "</think>" not in upto[len(base):]:
            # what the template left of an inline block it cut at </think> (R1 keeps what follows it)
            return len(base) + 2 * (m.reasoning is not None and upto.startswith("\n\n", len(base)))
    c = _common(prompt, upto)
    tail = len(prompt) - (start - c)  # the prompt's tail found in upto from where they first differ
    try:
        bare = template.render(before, tools=tools)
    except SftlabError:
        return None
    return start if tail < len(prompt) and tail <= _common(bare, prompt) else None
