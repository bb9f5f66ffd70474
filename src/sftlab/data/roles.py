"""The rules every chat follows, whatever its input format: role order, and which call each tool
result answers. The format converters (:mod:`sftlab.data.formats`) refuse a record that breaks them;
the doctor (:mod:`sftlab.data.doctor_tools`) matches tool results to calls with the same
:func:`answered_call`, so prepare and the doctor judge a tool result alike.
"""

from __future__ import annotations

from typing import Optional

from sftlab.data.types import Message

ORPHAN_ID_FIX = "set the result's tool_call_id to the id of the call it answers, or fix the call's id"


class FormatError(ValueError):
    """A record that does not fit its format. ``check`` names the failed check for the doctor."""

    def __init__(self, message: str, check: str = "fields", fix: str | None = None):
        self.check = check
        self.fix = fix  # how to fix the record, when more specific than "fix the line"
        super().__init__(message)


# An open call: (number of the assistant message that made it, its id or None, its function name or None).
OpenCall = tuple[int, Optional[str], Optional[str]]


def answered_call(open_calls: list[OpenCall], m: Message) -> OpenCall | None:
    """The open call the tool result ``m`` answers, or None (an orphan result).

    By ``tool_call_id`` when the result has one; a call made without an id can be answered by any
    result (no id to compare), so then, as for a result without an id: by ``name``, else the first
    open call.
    """
    if m.tool_call_id:
        by_id = next((c for c in open_calls if c[1] == m.tool_call_id), None)
        if by_id is not None:
            return by_id
        open_calls = [c for c in open_calls if c[1] is None]
    if m.name:
        named = next((c for c in open_calls if c[2] == m.name), None)
        if named is not None:
            return named
    return open_calls[0] if open_calls else None


def orphan_reason(open_calls: list[OpenCall], m: Message, after_calls: bool = False) -> str:
    """Why the tool result ``m`` answers none of ``open_calls`` (:func:`answered_call` said None);
    ``after_calls``: the assistant message before made calls (all answered by now)."""
    if m.tool_call_id and open_calls:
        ids = ", ".join(repr(c[1]) for c in open_calls if c[1] is not None)
        return f"tool_call_id {m.tool_call_id!r} matches no open call (their ids: {ids})"
    if after_calls:
        return "every call before it already has its result"
    return "no assistant tool call comes before it"


def validate_roles(messages: list[Message], open_end: bool = False) -> None:
    """System (optional, first), then user; each user turn answered by the assistant, whose tool calls
    (if any) are each followed by tool results (each answering one of those calls, see
    :func:`answered_call`) and then the assistant again; ends with the assistant (``open_end``: or with
    the user or a tool result, a prompt awaiting the assistant's reply, as generation reads it)."""
    if not messages:
        raise FormatError("conversation has no messages", "fields")
    body = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(messages[1:], start=2):
        if m.role == "system":
            raise FormatError(f"message {i} is a system message; only the first message may be one", "role_order")
    if not body:
        raise FormatError("conversation has only a system message", "role_order")
    offset = len(messages) - len(body)
    prev = None
    open_calls: list[OpenCall] = []
    for i, m in enumerate(body):
        if prev is None or prev.role == "assistant" and not prev.tool_calls:
            expected = ("user",)
        elif prev.role == "user":
            expected = ("assistant",)
        elif prev.role == "assistant":  # it made tool calls: their results come next
            expected = ("tool",)
        else:  # a tool result: more results, or the assistant goes on
            expected = ("tool", "assistant")
        if m.role not in expected:
            check = "role_order"
            if m.role == "tool":
                why, check = "a tool result must follow an assistant message with tool_calls (or another tool result)", \
                    "tool_orphan_result"
            elif expected == ("tool",):
                why, check = "the calls of the message before get no tool result", "tool_unanswered"
            else:
                why = "roles must alternate user/assistant, starting with user; tool results follow tool calls"
            raise FormatError(f"message {i + 1 + offset} has role '{m.role}' where '{' or '.join(expected)}' "
                              f"was expected ({why})", check)
        if m.role == "assistant":
            open_calls = [(i + 1 + offset, c.get("id"), c.get("function", {}).get("name")) for c in m.tool_calls or ()]
        elif m.role == "tool":
            match = answered_call(open_calls, m)
            if match is None:
                raise FormatError(f"message {i + 1 + offset} (tool): a tool result, but {orphan_reason(open_calls, m, True)}",
                                  "tool_orphan_result", ORPHAN_ID_FIX)
            open_calls.remove(match)
        prev = m
    if body[-1].role != "assistant" and not (open_end and body[-1].role in ("user", "tool")):
        raise FormatError(f"conversation ends with a {body[-1].role} message; the last message must be the assistant's reply",
                          "role_order")
    for i, m in enumerate(messages, start=1):
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            after = " after its reasoning (it thinks, then answers nothing)" if m.reasoning and m.reasoning.strip() else ""
            raise FormatError(f"message {i} (assistant) is empty{after}", "empty_reply",
                              "write the reply, or remove the example")
