"""The data doctor's reading: a file (or a folder of files, or a list of sources) read the way
training reads it, each record that does not parse or convert turned into a finding on its file and
line (invalid UTF-8 found line by line), and keys training does not read that are a typo away from
ones it does.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from pathlib import Path

from sftlab.core.findings import Finding
from sftlab.data.doctor_checks import CHECKS, _add
from sftlab.data.formats import (
    _SHAREGPT_ROLES,
    format_of_row,
    resolve_format,
    to_conversations,
)
from sftlab.data.load import folder_files, is_saved_dataset, read_records
from sftlab.data.mixture import is_mixture, parse_sources
from sftlab.data.reasoning import REASONING_KEYS
from sftlab.data.types import Conversation


@dataclass
class _File:
    path: str
    fmt: str
    records: int
    convs: list[Conversation]
    files: dict | None = None  # a folder of data files: {"read": [...], "skipped": [...]} (names in it)


def _load(path, fmt: str | None, findings: list[Finding], split: str = "train", system_prompt: str | None = None) -> _File:
    """Read and convert one file; unreadable or unconvertible records become findings."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".json", ".csv"):
        bad = _bad_utf8_lines(p)  # these readers decode the whole file at once: find the lines first
        if bad:
            for line, msg in bad:
                _add(findings, "encoding", str(p), line, msg)
            return _File(str(p), fmt or "unknown", len(bad), [])
    records = read_records(path, strict=False, split=split)
    files = None
    if p.is_dir() and not is_saved_dataset(p):  # a folder of data files: say which were read
        read, skipped = folder_files(p, split)
        files = {"read": [f.relative_to(p).as_posix() for f in read],
                 "skipped": [f.relative_to(p).as_posix() for f in skipped]}
    readable = [r for r in records if r.data is not None]
    # prepare's rule: --format, else the most common format (one odd first line does not make every other line "wrong")
    key = resolve_format(fmt, records) if readable or (fmt and fmt != "auto") else "unknown"
    convs, failures = to_conversations(records, fmt, strict=False, system_prompt=system_prompt) if readable else ([], [])
    for r in readable:  # a typo'd key silently drops what it holds (a record of another format: mixed_formats says so)
        ours = isinstance(r.data, dict) and format_of_row(r.data) in (key, None)
        if ours and (found := unread_keys(r.data, key)) is not None:
            _add(findings, "unread_keys", r.source, r.line, found[0], fix=found[1])
    if not readable:
        failures = [(r, None) for r in records]
    for rec, exc in failures:
        if exc is None or exc.check == "parse":
            _add(findings, rec.check if rec.error else "parse", rec.source, rec.line, rec.error or "unreadable",
                 fix=rec.fix)
        else:
            # The record cannot be read at all: an error, under the check that names what is wrong.
            check = exc.check if exc.check in CHECKS else "fields"
            msg = f"{exc} (read as '{key}' format)" if check == "fields" else str(exc)
            _add(findings, check, rec.source, rec.line, msg, severity="error", fix=exc.fix)
    return _File(str(p), key, len(records), convs, files)


def _load_sources(spec, fmt: str | None, findings: list[Finding], key: str,
                  system_prompt: str | None = None) -> tuple[_File, list]:
    """One file as :func:`_load`; a list of sources read each with its own format and joined:
    (all of them as one _File, [(Source, its _File)] per source; [] for one file)."""
    split = "train" if key == "data" else "eval"  # a folder of held-out data: its validation or test split
    if not is_mixture(spec):
        return _load(spec, fmt, findings, split, system_prompt), []
    parts = [(src, _load(src.path, src.format or fmt, findings, split, system_prompt)) for src in parse_sources(spec, key)]
    files = [f for _, f in parts]
    joined = _File(", ".join(f.path for f in files), "/".join(dict.fromkeys(f.fmt for f in files)),
                   sum(f.records for f in files), [c for f in files for c in f.convs])
    return joined, parts


def _bad_utf8_lines(p: Path) -> list[tuple[int, str]]:
    out = []
    for i, bline in enumerate(p.read_bytes().split(b"\n"), start=1):
        try:
            bline.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append((i, f"invalid UTF-8 at byte {exc.start} of the line (re-encode the file as UTF-8)"))
    return out


# What each format reads of a record (a near miss of these is most likely a typo; CSV and Parquet column
# names are matched in any case before this), and of each message or turn in its list(s).
_RECORD_KEYS = {
    "messages": ("messages", "tools", "functions", "system", "weight"),
    "sharegpt": ("conversations", "conversation", "tools", "functions", "system", "weight"),
    "alpaca": ("instruction", "input", "output", "system", "history", "weight", *REASONING_KEYS),
    "prompt_completion": ("prompt", "completion", "tools", "system", "weight", *REASONING_KEYS),
    "text": ("text", "weight"),
}
_MESSAGE_KEYS = ("role", "content", *REASONING_KEYS, "tool_calls", "function_call", "tool_call_id", "name")
_TURN_KEYS = ("from", "value", *REASONING_KEYS, "tool_calls", "function_call", "tool_call_id", "name")  # sharegpt


@functools.lru_cache(maxsize=1024)  # the same few extra keys repeat on every record
def _near(key: str, known: tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8) if key not in known else []
    return close[0] if close else None


def _has(obj: dict, key: str) -> bool:
    """Does ``obj`` hold ``key`` (or sharegpt's other spelling of it)? A key near one it holds is no typo of
    it but a key of its own (``prompt_id`` beside ``prompt``, ``conversation_id`` beside ``conversations``)."""
    return key in obj or key.startswith("conversation") and ("conversation" in obj or "conversations" in obj)


def _turn_lists(row: dict, fmt: str) -> list[tuple[str, list, tuple[str, ...], str]]:
    """(noun, list, the keys read of each item, its role key) of the message lists ``fmt`` reads in ``row``."""
    if fmt == "messages":
        return [("message", row.get("messages"), _MESSAGE_KEYS, "role")]
    if fmt == "sharegpt":
        turns = row.get("conversations", row.get("conversation"))
        if isinstance(turns, list) and turns and all(isinstance(t, dict) and "role" in t and "from" not in t for t in turns):
            return [("turn", turns, _MESSAGE_KEYS, "role")]  # openai turns under sharegpt's key: read as messages
        return [("turn", turns, _TURN_KEYS, "from")]
    if fmt == "prompt_completion":  # TRL's conversational form: both are message lists
        return [(f"{k} message", row.get(k), _MESSAGE_KEYS, "role") for k in ("prompt", "completion")]
    return []


def unread_keys(row: dict, fmt: str = "messages") -> tuple[str, str] | None:
    """For a record read as ``fmt``: (what, fix) for a key training does not read that is a letter or so
    away from one it reads (``mesages``, ``inptu``, ``contents``, ``vaule``, ``reasoning_contents``), or
    for reasoning on a non-assistant message: content dropped without a word. None when there is none."""
    rename = "rename the key to the one training reads"
    for key in row if fmt in _RECORD_KEYS else ():
        if (k := _near(str(key), _RECORD_KEYS[fmt])) is not None and not _has(row, k):
            return f"key '{key}' is not read (did you mean '{k}'?): its value is ignored", rename
    for noun, items, known, role_key in _turn_lists(row, fmt):
        for i, m in enumerate(items if isinstance(items, list) else [], start=1):
            for key in (m if isinstance(m, dict) else ()):
                if (k := _near(str(key), known)) is not None and not _has(m, k):
                    return f"{noun} {i}: key '{key}' is not read (did you mean '{k}'?): its value is ignored", rename
                role = m.get(role_key)  # a sharegpt function_call turn reads only its value
                assistant = role == "assistant" if role_key == "role" else \
                    _SHAREGPT_ROLES.get(str(role).lower()) == "assistant" and str(role).lower() != "function_call"
                if key in REASONING_KEYS and not assistant and m[key]:
                    return (f"{noun} {i} ({role}): '{key}' is read on assistant messages only: it is ignored",
                            "move the reasoning to the assistant reply it belongs to, or remove it")
    return None
