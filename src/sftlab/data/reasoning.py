"""Reasoning in an assistant reply: the ``<think>...</think>`` block read apart from the answer.

One rule for every input format: each converter in :mod:`sftlab.data.formats` builds its assistant replies
with :func:`assistant_message`.
"""

from __future__ import annotations

import re

from sftlab.data.roles import FormatError
from sftlab.data.types import Message

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_TAG = re.compile(r"</?think>")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # a message's reasoning fields, first given wins


def split_reasoning(content: str, where: str) -> tuple[str, str | None]:
    """(answer, reasoning) from content that may open with ``<think>...</think>``; reasoning None if absent.

    Reasoning is stripped of the newlines around it and the answer of those before it (as templates render
    them: ``<think>\n{reasoning}\n</think>\n\n{answer}``). Content whose first think tag is ``</think>`` reads as
    if ``<think>`` opened it (DeepSeek-R1's raw replies: its prompt opens the block). A later ``</think>`` is an error.
    """
    body = content.lstrip()
    if unopened_reasoning(content):
        body = THINK_OPEN + content
    if body.startswith(THINK_OPEN):
        close = body.find(THINK_CLOSE)
        if close < 0:
            raise FormatError(f"{where} opens <think> but never closes it", "reasoning_unclosed",
                              "add </think> after the reasoning, or move it to a 'reasoning_content' field")
        reasoning = body[len(THINK_OPEN):close].strip("\n")
        if THINK_OPEN in reasoning:  # the first </think> closes the outer block: the rest would be trained as the answer
            raise FormatError(f"{where} has a <think> inside its <think> block", "reasoning_unclosed",
                              "remove the inner <think> (reasoning blocks do not nest)")
        answer, depth = body[close + len(THINK_CLOSE):].lstrip("\n"), 0
        for tag in THINK_TAG.findall(answer):  # a </think> closing nothing: a literal tag the model learns mid-answer
            depth += 1 if tag == THINK_OPEN else -1
            if depth < 0:
                raise FormatError(f"{where} has a stray </think> after its reasoning (it closes no <think>)",
                                  "reasoning_unclosed", "remove the stray </think> (one block of reasoning, then the answer)")
        return answer, reasoning
    return content, None


def unopened_reasoning(content: str) -> bool:
    """Is the content's first think tag a ``</think>``? (DeepSeek-R1's raw replies: the prompt opened the block.)"""
    first = THINK_TAG.search(content)
    return first is not None and first.group() == THINK_CLOSE


def assistant_message(content: str, where: str, fields: dict | None = None,
                      tool_calls: tuple[dict, ...] | None = None) -> Message:
    """An assistant reply as a Message, its reasoning read by the one rule of every format: inline (see
    :func:`split_reasoning`) or from a reasoning field of ``fields`` (the message object, where the format
    has one), never both. ``where`` names the reply in errors ("message 2", "'output'")."""
    # an empty field is no reasoning (exports write "reasoning_content": "" on every message): as reasoning
    # it would train an empty <think> block, and clash with an inline one
    fields = fields or {}
    given = [k for k in REASONING_KEYS if isinstance(fields.get(k), str) and fields[k].strip()]
    unopened = unopened_reasoning(content)
    content, reasoning = split_reasoning(content, where)
    if given:
        if reasoning is not None:
            raise FormatError(f"{where} has reasoning both in '{given[0]}' and inline <think>", "reasoning",
                              "keep the reasoning in one place: the field or the <think> block")
        reasoning = fields[given[0]]
        if THINK_OPEN in reasoning or THINK_CLOSE in reasoning:  # the template wraps it: trained as <think><think>...
            raise FormatError(f"{where} '{given[0]}' holds <think> tags; the template adds them around the field",
                              "reasoning_unclosed", f"remove the <think> and </think> tags from '{given[0]}'")
    return Message("assistant", content, tool_calls=tool_calls, reasoning=reasoning, reasoning_unopened=unopened)
