"""Task scorers and format checks, chosen per data set.

A scorer turns (reply, reference reply) into a score in [0, 1]. Names:
    exact          reply equals the reference (whitespace-normalised)
    contains       the reference occurs in the reply (case-insensitive)
    regex          the reference reply is a regular expression the reply must match (re.search)
    regex:PATTERN  one fixed pattern for every example
    json_valid     the reply is one valid JSON value
    json_fields    share of the reference object's fields the reply gets right

``choose_scorer`` picks ``json_fields`` when every reference reply is a JSON object and ``exact``
otherwise; ``--scorer`` overrides it. The format check follows the references the same way: a JSON
object for JSON-object references, valid JSON for other JSON references, and otherwise a reply
that is not empty and ended at the end-of-turn token (not cut off at max_new_tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from sftlab.core.errors import SftlabError
from sftlab.eval import metrics as m

Scorer = Callable[[str, str], float]

SCORERS = ("exact", "contains", "regex", "regex:PATTERN", "json_valid", "json_fields")


def _regex_from_reference(reply: str, reference: str) -> float:
    try:
        return float(m.regex_match(reply, reference))
    except re.error as exc:
        raise SftlabError(f"reference reply {reference[:40]!r} is not a valid regular expression ({exc})",
                          hint="use --scorer exact or contains for plain-text references")


def get_scorer(name: str) -> Scorer:
    """The scoring function for ``name`` (see the module docstring); an unknown name is a SftlabError."""
    if name == "exact":
        return lambda reply, ref: float(m.exact_match(reply, ref))
    if name == "contains":
        return lambda reply, ref: float(m.contains(reply, ref))
    if name == "regex":
        return _regex_from_reference
    if name.startswith("regex:"):
        try:
            pattern = re.compile(name[len("regex:"):])
        except re.error as exc:
            raise SftlabError(f"--scorer {name!r}: not a valid regular expression ({exc})")
        return lambda reply, ref: float(m.regex_match(reply, pattern))
    if name == "json_valid":
        return lambda reply, ref: float(m.valid_json(reply))
    if name == "json_fields":
        def score(reply: str, ref: str) -> float:
            try:
                return m.json_fields_score(reply, ref)
            except ValueError:
                raise SftlabError(f"scorer json_fields needs JSON-object reference replies; got {ref[:40]!r}",
                                  hint="use --scorer exact, contains or json_valid for this data")
        return score
    raise SftlabError(f"unknown scorer '{name}'", hint=f"use one of: {', '.join(SCORERS)}")


def _kind(references: Sequence[str]) -> str:
    """'object' when every reference is a JSON object, 'json' when every one is JSON, else 'text'."""
    parsed = [m.parse_json(r) for r in references]
    if references and all(ok and isinstance(v, dict) for ok, v in parsed):
        return "object"
    if references and all(ok and isinstance(v, (dict, list)) for ok, v in parsed):
        return "json"
    return "text"


def choose_scorer(references: Sequence[str], override: str | None = None) -> str:
    """The scorer name for a data set: ``override`` if given (validated), else chosen from the references."""
    if override:
        get_scorer(override)  # validates
        return override
    return "json_fields" if _kind(references) == "object" else "exact"


def format_check_name(references: Sequence[str]) -> str:
    """'json_object', 'json' or 'finished' (see the module docstring)."""
    return {"object": "json_object", "json": "json", "text": "finished"}[_kind(references)]


def format_ok(check: str, reply: str, finished: bool) -> bool:
    """Does one reply follow the data set's format? ``finished``: it stopped at end-of-turn."""
    if check == "json_object":
        return m.is_json_object(reply)
    if check == "json":
        return m.valid_json(reply)
    return finished and m.is_nonempty(reply)
