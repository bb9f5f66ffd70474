"""Every input format -> one Conversation type.

Each converter is a small pure function ``dict -> Conversation`` that raises :class:`FormatError`
(with the name of the failed check) on a record it cannot convert. ``detect_format`` picks the
format from the fields of the first readable record; ``--format`` overrides it.
"""

from __future__ import annotations

from typing import Callable

from sftlab.core.errors import SftlabError
from sftlab.data.load import Record, read_records
from sftlab.data.types import Conversation, Message


class FormatError(ValueError):
    """A record that does not fit its format. ``check`` names the failed check for the doctor."""

    def __init__(self, message: str, check: str = "fields"):
        self.check = check
        super().__init__(message)

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text(value, what: str) -> str:
    """Message content as a string; OpenAI-style content parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in parts):
            return "".join(parts)
    if value is None:
        raise FormatError(f"{what} is missing", "fields")
    raise FormatError(f"{what} must be a string, got {type(value).__name__}", "fields")


def _weight(row: dict) -> float:
    w = row.get("weight", 1.0)
    if w is None:
        return 1.0
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise FormatError(f"'weight' must be a number, got {w!r}", "fields")
    if not (w >= 0.0) or w == float("inf"):
        raise FormatError(f"'weight' must be a finite number >= 0, got {w!r}", "fields")
    return w


def validate_roles(messages: list[Message]) -> None:
    """System (optional, first) then user/assistant alternating, starting with user, ending with assistant."""
    if not messages:
        raise FormatError("conversation has no messages", "fields")
    body = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(messages[1:], start=2):
        if m.role == "system":
            raise FormatError(f"message {i} is a system message; only the first message may be one", "role_order")
    if not body:
        raise FormatError("conversation has only a system message", "role_order")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise FormatError(
                f"message {i + 1 + offset} has role '{m.role}' where '{expected}' was expected "
                "(roles must alternate user/assistant, starting with user)",
                "role_order",
            )
    if body[-1].role != "assistant":
        raise FormatError("conversation ends with a user message; the last message must be the assistant's reply", "role_order")
    for i, m in enumerate(messages, start=1):
        if m.role == "assistant" and not m.content.strip():
            raise FormatError(f"message {i} (assistant) is empty", "empty_reply")


def from_messages(row: dict) -> Conversation:
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        raise FormatError("'messages' must be a list of {role, content} objects")
    out = _turns(msgs, "message", "role", "content", _OPENAI_ROLES, "system, user or assistant")
    validate_roles(out)
    return Conversation(out, weight=_weight(row))


def _turns(items: list, noun: str, role_key: str, text_key: str, roles: dict, allowed: str) -> list[Message]:
    """One Message per {role_key, text_key} object, roles mapped through ``roles``; clear errors by position."""
    out = []
    for i, m in enumerate(items, start=1):
        if not isinstance(m, dict) or role_key not in m:
            raise FormatError(f"{noun} {i} must be an object with '{role_key}' and '{text_key}'")
        role = roles.get(str(m[role_key]).lower())
        if role is None:
            what = "role" if role_key == "role" else "speaker"
            raise FormatError(f"{noun} {i} has unknown {what} '{m[role_key]}' (use {allowed})", "role_order")
        out.append(Message(role, _text(m.get(text_key), f"{noun} {i} {text_key}")))
    return out


def from_sharegpt(row: dict) -> Conversation:
    turns = row.get("conversations", row.get("conversation"))
    if not isinstance(turns, list):
        raise FormatError("'conversations' must be a list of {from, value} objects")
    out = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append(Message("system", row["system"]))
    out += _turns(turns, "turn", "from", "value", _SHAREGPT_ROLES, "human, gpt or system")
    validate_roles(out)
    return Conversation(out, weight=_weight(row))


def from_alpaca(row: dict) -> Conversation:
    instruction = _text(row.get("instruction"), "'instruction'")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise FormatError("'input' must be a string")
    output = _text(row.get("output"), "'output'")
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    msgs = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        msgs.append(Message("system", row["system"]))
    msgs += [Message("user", user), Message("assistant", output)]
    validate_roles(msgs)
    return Conversation(msgs, weight=_weight(row))


def from_prompt_completion(row: dict) -> Conversation:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        # TRL's conversational prompt/completion: both are message lists.
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise FormatError("'prompt' and 'completion' must both be strings or both message lists")
        return from_messages({"messages": prompt + completion, "weight": row.get("weight")})
    msgs = [Message("user", _text(prompt, "'prompt'")), Message("assistant", _text(completion, "'completion'"))]
    validate_roles(msgs)
    return Conversation(msgs, weight=_weight(row))


def from_text(row: dict) -> Conversation:
    text = _text(row.get("text"), "'text'")
    if not text.strip():
        raise FormatError("'text' is empty", "empty_reply")
    return Conversation(text=text, weight=_weight(row))

CONVERTERS: dict[str, Callable[[dict], Conversation]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
}
FORMAT_ALIASES = {"openai": "messages", "chatml": "messages", "prompt-completion": "prompt_completion",
                  "completion": "prompt_completion", "plain": "text", "vicuna": "sharegpt"}


def format_of_row(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row or "conversation" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def resolve_format(name: str | None, records: list[Record]) -> str:
    """The format to use: ``name`` if given (validated), else detected from the first readable record."""
    if name and name != "auto":
        key = FORMAT_ALIASES.get(name, name).replace("-", "_")
        if key not in CONVERTERS:
            raise SftlabError(f"unknown format '{name}'", hint=f"use one of: {', '.join(CONVERTERS)}, or auto")
        return key
    for r in records:
        if r.data is not None:
            fmt = format_of_row(r.data)
            if fmt is None:
                raise SftlabError(
                    f"{r.where()}: cannot tell the data format from fields {sorted(r.data)}",
                    hint="expected messages, conversations, instruction/output, prompt/completion or text; or pass --format",
                )
            return fmt
    raise SftlabError(f"{records[0].source if records else 'data'}: no readable records to detect the format from")


def to_conversations(records: list[Record], fmt: str | None = None, *, system_prompt: str | None = None,
                     strict: bool = True) -> tuple[list[Conversation], list[tuple[Record, FormatError]]]:
    """Convert records; returns (conversations, failures). With ``strict`` the first failure raises."""
    key = resolve_format(fmt, records)
    convert = CONVERTERS[key]
    convs: list[Conversation] = []
    failures: list[tuple[Record, FormatError]] = []
    for r in records:
        if r.data is None:
            failures.append((r, FormatError(r.error or "unreadable", "parse")))
            continue
        try:
            c = convert(r.data)
        except FormatError as exc:
            failures.append((r, exc))
            continue
        c.source, c.line = r.source, r.line
        if system_prompt and not c.is_text and c.messages[0].role != "system":
            c.messages.insert(0, Message("system", system_prompt))
        convs.append(c)
    if strict and failures:
        r, exc = failures[0]
        more = f" (and {len(failures) - 1} more; run `sftlab doctor` to list them)" if len(failures) > 1 else ""
        raise SftlabError(f"{r.where()}: {exc}{more}", hint=f"this file is read as '{key}' format; fix the line or pass --format")
    return convs, failures


def load_conversations(path: str, fmt: str | None = None, *, system_prompt: str | None = None) -> list[Conversation]:
    """Read a data file (any supported type and format) into conversations; bad lines raise SftlabError."""

    convs, _ = to_conversations(read_records(path, strict=True), fmt, system_prompt=system_prompt, strict=True)
    return convs
