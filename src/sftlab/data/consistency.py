"""Does the prompt a user sends at inference (rendered with the generation prompt) start exactly
what the model saw in training? :func:`check_template_consistency` answers for any template."""

from __future__ import annotations

from sftlab.core.errors import SftlabError
from sftlab.data.reasoning import split_reasoning
from sftlab.data.roles import FormatError
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Conversation, Message

# Conversations used when no data is given: with and without a system prompt, one and several turns.
SAMPLE_CONVERSATIONS: list[list[Message]] = [
    [Message("user", "What is the capital of France?"), Message("assistant", "Paris.")],
    [Message("system", "You are a concise assistant."), Message("user", "Say hello."),
     Message("assistant", "Hello!"), Message("user", "And in German?"), Message("assistant", "Hallo!")],
    [Message("user", "Count to two."), Message("assistant", "1, 2"), Message("user", "Now to three."),
     Message("assistant", "1, 2, 3"), Message("user", "Thanks."), Message("assistant", "You are welcome.")],
]


def _excerpt(text: str, pos: int) -> str:
    return text[max(0, pos - 20): pos + 25]


def _as_messages(conv) -> tuple[list[Message], str]:
    if isinstance(conv, Conversation):
        return list(conv.messages), conv.where()
    msgs = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in conv]
    return msgs, ""


def check_template_consistency(template: ChatTemplate | str,
                               conversations: list[Conversation] | list[list[Message]] | None = None) -> list[str]:
    """Problems found when comparing training and inference renderings; empty if they agree.

    Judged by the rule ``prepare`` labels with (``sftlab.data.turns``): each assistant turn is trained
    as it follows its inference prompt (the messages before it, rendered with the generation prompt
    and the conversation's tools) in the conversation rendered through that turn. Where history renders
    differently (Qwen3 drops earlier reasoning) prepare makes one example per turn, so only the turn's
    own render is compared. For each assistant turn of each conversation (default:
    :data:`SAMPLE_CONVERSATIONS`) the inference prompt must be a prefix of that render, and the reply
    must follow it verbatim, after the reasoning block the template writes (reasoning inlined as
    ``<think>`` where the template has no field for it, as prepare trains it, or Qwen3's empty block).
    Each problem names the conversation, the turn, the first differing character and a short excerpt
    of both texts. ``template`` is a ChatTemplate or a jinja source string.
    """
    if isinstance(template, str):
        template = ChatTemplate("template", template)
    sample = conversations is None
    problems: list[str] = []
    for k, conv in enumerate(SAMPLE_CONVERSATIONS if sample else conversations, start=1):
        if isinstance(conv, Conversation) and conv.is_text:
            continue
        msgs, where = _as_messages(conv)
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
            if not upto.startswith(prompt):
                pos = next((j for j, (a, b) in enumerate(zip(prompt, upto)) if a != b), min(len(prompt), len(upto)))
                problems.append(
                    f"{label}, assistant turn {turn}: the inference prompt is not a prefix of the training text; "
                    f"they differ at character {pos}: inference {_excerpt(prompt, pos)!r} vs training {_excerpt(upto, pos)!r}")
                continue
            rest = upto[len(prompt):]
            try:
                answer = split_reasoning(rest, label)[0] if rest.startswith("<think>") else rest
            except FormatError:
                answer = rest
            if not (answer.startswith(m.content) or answer.startswith(m.content.strip())):
                problems.append(
                    f"{label}, assistant turn {turn}: the reply does not follow the inference prompt verbatim "
                    f"(character {len(prompt)}): training has {rest[:40]!r}, the reply is {m.content[:40]!r}")
    return problems
