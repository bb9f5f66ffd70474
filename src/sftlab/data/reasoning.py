"""Reasoning in an assistant reply: the ``<think>...</think>`` block read apart from the answer.

One rule for every input format (:func:`assistant_message`, which each converter in
:mod:`sftlab.data.formats` builds its assistant replies with), the doctor (:func:`think_tag_problem`) and
evaluation (:func:`locate_reasoning`, under ``eval.generation.split_reply``): a reply holds reasoning when
it opens with ``<think>`` or when its first think tag is ``</think>`` (DeepSeek-R1's raw replies: its
prompt opens the block); the reasoning runs to the first ``</think>``.
"""

from __future__ import annotations

import re

from sftlab.data.roles import FormatError
from sftlab.data.types import Message

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_TAG = re.compile(r"</?think>")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # a message's reasoning fields, first given wins


def unopened_reasoning(content: str) -> bool:
    """Is the content's first think tag a ``</think>``? (DeepSeek-R1's raw replies: the prompt opened the block.)"""
    first = THINK_TAG.search(content)
    return first is not None and first.group() == THINK_CLOSE


def locate_reasoning(content: str) -> tuple[str, str | None, bool]:
    """(rest, reasoning, closed) of a reply, as written (nothing stripped, nothing refused).

    ``reasoning`` is None when the reply holds none (then ``rest`` is the content); ``closed`` is False for a
    ``<think>`` never closed (then the reasoning runs to the end and ``rest`` is empty).
    """
    if unopened_reasoning(content):
        reasoning, _, rest = content.partition(THINK_CLOSE)
        return rest, reasoning, True
    body = content.lstrip()
    if not body.startswith(THINK_OPEN):
        return content, None, True
    close = body.find(THINK_CLOSE)
    if close < 0:
        return "", body[len(THINK_OPEN):], False
    return body[close + len(THINK_CLOSE):], body[len(THINK_OPEN):close], True


def think_tag_problem(text: str) -> str | None:
    """What is wrong with the think tags of a text read as literal answer text (None: nothing): "a </think>
    with no <think> before it", "a <think> inside another" or "a <think> is never closed"."""
    depth = 0
    for tag in THINK_TAG.findall(text):
        depth += 1 if tag == THINK_OPEN else -1
        if depth < 0:
            return "a </think> with no <think> before it"
        if depth > 1:
            return "a <think> inside another"
    return "a <think> is never closed" if depth else None


_ANSWER_TAGS = {  # think_tag_problem's finding in the answer -> (what prepare says, the fix)
    "a </think> with no <think> before it": ("has a stray </think> after its reasoning (it closes no <think>)",
                                             "remove the stray </think> (one block of reasoning, then the answer)"),
    "a <think> inside another": ("has a <think> inside another in its answer",
                                 "remove the inner <think> (reasoning blocks do not nest)"),
    "a <think> is never closed": ("opens a <think> in its answer that is never closed",
                                  "close it with </think>, or remove it (reasoning comes first: <think>...</think>, "
                                  "then the answer)"),
}


def split_reasoning(content: str, where: str) -> tuple[str, str | None]:
    """(answer, reasoning) from content that may open with ``<think>...</think>``; reasoning None if absent.

    Reasoning is stripped of the newlines around it and the answer of those before it (as templates render
    them: ``<think>\n{reasoning}\n</think>\n\n{answer}``). Content whose first think tag is ``</think>`` reads as
    if ``<think>`` opened it (DeepSeek-R1's raw replies: its prompt opens the block). Think tags left in the
    answer that the doctor calls wrong (a stray ``</think>``, a nested or unclosed ``<think>``) are an error.
    """
    rest, reasoning, closed = locate_reasoning(content)
    if not closed:
        raise FormatError(f"{where} opens <think> but never closes it", "reasoning_unclosed",
                          "add </think> after the reasoning, or move it to a 'reasoning_content' field")
    if reasoning is not None:
        reasoning = reasoning.strip("\n")
        if THINK_OPEN in reasoning:  # the first </think> closes the outer block: the rest would be trained as the answer
            raise FormatError(f"{where} has a <think> inside its <think> block", "reasoning_unclosed",
                              "remove the inner <think> (reasoning blocks do not nest)")
        rest = rest.lstrip("\n")
    problem = think_tag_problem(rest)  # literal tags the model would learn mid-answer
    if problem:
        what, fix = _ANSWER_TAGS[problem]
        raise FormatError(f"{where} {what}", "reasoning_unclosed", fix)
    return rest, reasoning


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
