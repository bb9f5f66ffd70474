"""Does the prompt a user sends at inference (rendered with the generation prompt) start exactly
what the model saw in training? :func:`check_template_consistency` answers for any template."""

from __future__ import annotations

from sftlab.core.errors import SftlabError
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

    For each assistant turn of each conversation (default: :data:`SAMPLE_CONVERSATIONS`), the
    inference prompt (the messages before it, rendered with ``add_generation_prompt=True``) must be
    a prefix of the training text (the whole conversation rendered), and the reply must follow it
    verbatim. Each problem names the conversation, the turn, the first differing character and a
    short excerpt of both texts. ``template`` is a ChatTemplate or a jinja source string.
    """
    if isinstance(template, str):
        template = ChatTemplate("template", template)
    sample = conversations is None
    problems: list[str] = []
    for k, conv in enumerate(SAMPLE_CONVERSATIONS if sample else conversations, start=1):
        if isinstance(conv, Conversation) and conv.is_text:
            continue
        msgs, where = _as_messages(conv)
        label = where or f"{'sample ' if sample else ''}conversation {k}"
        try:
            full = template.render(msgs)
        except SftlabError as exc:
            if not (sample and any(m.role == "system" for m in msgs)):  # a template may refuse system turns
                problems.append(f"{label}: {exc}")
            continue
        turn = 0
        for i, m in enumerate(msgs):
            if m.role != "assistant":
                continue
            turn += 1
            prompt = template.render(msgs[:i], add_generation_prompt=True)
            if not full.startswith(prompt):
                pos = next((j for j, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
                problems.append(
                    f"{label}, assistant turn {turn}: the inference prompt is not a prefix of the training text; "
                    f"they differ at character {pos}: inference {_excerpt(prompt, pos)!r} vs training {_excerpt(full, pos)!r}")
                continue
            rest = full[len(prompt):]
            if not (rest.startswith(m.content) or rest.startswith(m.content.strip())):
                problems.append(
                    f"{label}, assistant turn {turn}: the reply does not follow the inference prompt verbatim "
                    f"(character {len(prompt)}): training has {rest[:40]!r}, the reply is {m.content[:40]!r}")
    return problems
