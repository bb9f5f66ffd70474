"""Reasoning in an assistant reply: the ``<think>...</think>`` block read apart from the answer.

Every input format reads a reply's inline reasoning by these rules (:mod:`sftlab.data.formats`), and
the doctor's think-tag checks are theirs.
"""

from __future__ import annotations

import re

from sftlab.data.roles import FormatError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_TAG = re.compile(r"</?think>")


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
