"""Pure metric functions on generated replies: lengths, emptiness, repetition, and task scores.

Every function takes plain strings and returns a number or a bool, so each can be checked against a
value computed by hand. Words are whitespace-separated pieces (``str.split()``); n-grams are over
words. Nothing here loads a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

# --- length, emptiness, repetition --------------------------------------------------------------

def words(text: str) -> list[str]:
    """Whitespace-separated words of ``text``."""
    return text.split()


def is_nonempty(reply: str) -> bool:
    """True when the reply holds anything but whitespace."""
    return bool(reply.strip())


def ngrams(items: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``items``, in order (none when there are fewer than n items)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    return [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]


def repetition_rate(reply: str | Sequence, n: int = 3) -> float:
    """Share of the reply's n-grams that repeat an earlier n-gram of the same reply.

    ``reply``: a string (n-grams over its words) or a sequence of tokens (e.g. generated token ids;
    n=4 over tokens is the "seq-rep-4" of Welleck et al., 2019). ``1 - distinct / total``: 0.0 without
    repeats (or with fewer than n items), close to 1.0 for a reply stuck in a loop.
    "a b c a b c" with n=2 has 5 bigrams, 3 distinct -> 0.4.
    """
    grams = ngrams(words(reply) if isinstance(reply, str) else list(reply), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(replies: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams over all replies divided by all n-grams (1.0 = no n-gram is reused)."""
    grams = [g for r in replies for g in ngrams(words(r), n)]
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for an empty sequence (a metric over no replies reads as 0)."""
    return float(sum(values) / len(values)) if values else 0.0


# --- task scores --------------------------------------------------------------------------------

def normalize(text: str, *, ignore_case: bool = False) -> str:
    """Strip the ends and collapse inner whitespace runs to one space (optionally lower-case)."""
    out = " ".join(text.split())
    return out.lower() if ignore_case else out


def exact_match(reply: str, reference: str, *, ignore_case: bool = False) -> bool:
    """Reply equals the reference after whitespace normalisation."""
    return normalize(reply, ignore_case=ignore_case) == normalize(reference, ignore_case=ignore_case)


def contains(reply: str, reference: str, *, ignore_case: bool = True) -> bool:
    """The (normalised) reference occurs inside the (normalised) reply; an empty reference never matches."""
    ref = normalize(reference, ignore_case=ignore_case)
    return bool(ref) and ref in normalize(reply, ignore_case=ignore_case)


def regex_match(reply: str, pattern: str | re.Pattern) -> bool:
    """The pattern is found anywhere in the reply (``re.search``); anchor it with ^...$ for a full match."""
    return re.search(pattern, reply) is not None


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) when the whole of ``text`` (ends stripped) is one JSON value, else (False, None)."""
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return False, None


def valid_json(reply: str) -> bool:
    """The reply, ends stripped, is exactly one valid JSON value (nothing before or after it)."""
    return parse_json(reply)[0]


def is_json_object(reply: str) -> bool:
    """The reply, ends stripped, is exactly one JSON object."""
    ok, value = parse_json(reply)
    return ok and isinstance(value, dict)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return normalize(a) == normalize(b)
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python; not in JSON
        return type(a) is type(b) and a == b
    return a == b


def json_fields(reply: str, reference: str) -> tuple[int, int]:
    """(fields of the reference object the reply gets right, fields in the reference).

    The reply must be a JSON object; a field is right when the reply has the key with an equal value
    (strings compared after whitespace normalisation, numbers by value: 34 == 34.0; booleans only equal
    booleans). Extra keys in the reply are not penalised. A reference that is not a JSON object is
    an error in the data (``ValueError``).
    """
    ok, ref = parse_json(reference)
    if not ok or not isinstance(ref, dict):
        raise ValueError("the reference reply is not a JSON object")
    total = len(ref)
    ok, got = parse_json(reply)
    if not ok or not isinstance(got, dict):
        return 0, total
    right = sum(1 for k, v in ref.items() if k in got and _same_value(got[k], v))
    return right, total


def json_fields_score(reply: str, reference: str) -> float:
    """Share of the reference's fields the reply gets right (1.0 for an empty reference object)."""
    right, total = json_fields(reply, reference)
    return right / total if total else float(is_json_object(reply))
