"""The data doctor: the data-debugging checklist, automated.

``run_doctor(data)`` reads a data file the way training does and reports every problem with the
file and 1-based line it sits on: lines that do not parse or lack their format's fields, wrong role
order, empty replies, encoding damage, chat-template or special tokens inside message text, exact
and near duplicates, train/eval overlap, and, given a tokenizer, over-long examples and examples
with no trained token. It also gathers length and trained-token statistics with a histogram.

Severity: "error" would break or silently corrupt training, "warning" deserves a look. The exit
code is 2 with any error, 1 with only warnings, 0 when clean.
"""

from __future__ import annotations

import copy
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sftlab.data.formats import format_of_row, resolve_format, to_conversations
from sftlab.data.load import read_records
from sftlab.data.masking import IGNORE, Labeler
from sftlab.data.templates import BUILTIN, missing_tokens, resolve_template, template_names
from sftlab.data.types import Conversation
from sftlab.errors import SftlabError

# check name -> (severity, heading). The report lists checks in this order.
CHECKS: dict[str, tuple[str, str]] = {
    "encoding": ("error", "invalid UTF-8"),
    "parse": ("error", "lines that do not parse"),
    "fields": ("error", "missing or wrong fields for the format"),
    "role_order": ("error", "wrong role order (or no reply at the end)"),
    "empty_reply": ("error", "empty replies"),
    "template": ("error", "the chat template cannot place the replies"),
    "special_tokens": ("error", "the tokenizer's special tokens inside message text"),
    "no_trained": ("error", "examples with no trained token"),
    "eval_overlap": ("error", "eval examples or prompts also in the training data"),
    "mojibake": ("warning", "mojibake (text decoded with the wrong encoding)"),
    "control_chars": ("warning", "control characters"),
    "template_markers": ("warning", "chat-template markers inside message text"),
    "too_long": ("warning", "examples longer than max_seq_length"),
    "duplicate": ("warning", "exact duplicates"),
    "near_duplicate": ("warning", "near duplicates"),
    "eval_near_overlap": ("warning", "eval examples or prompts nearly identical to training data"),
    "template_consistency": ("warning", "training text and inference prompt disagree"),
}
NEAR_JACCARD = 0.9  # word 3-shingle Jaccard at or above which two texts are near duplicates

# Markers of common chat templates; inside message text they confuse the model about turn borders.
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>",
                    "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]", "<s>", "</s>",
                    "### Instruction:", "### Response:")
_GENERIC_MARKER = r"<\|[A-Za-z0-9_]+\|>"
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _mojibake_regex() -> tuple[re.Pattern, dict[str, int]]:
    """UTF-8 bytes misread as cp1252/latin-1 show up as a lead char (Ã, â, ...) plus continuation chars.

    Matches the byte shape of one UTF-8 sequence; the caller confirms the bytes decode as UTF-8.
    """
    to_byte: dict[str, int] = {}
    for b in range(0x80, 0x100):
        to_byte[chr(b)] = b  # latin-1
        try:
            to_byte[bytes([b]).decode("cp1252")] = b
        except UnicodeDecodeError:
            pass

    def cls(lo: int, hi: int) -> str:
        return "[" + "".join(re.escape(c) for c, b in to_byte.items() if lo <= b <= hi) + "]"

    cont = cls(0x80, 0xBF)
    pat = f"(?:{cls(0xC2, 0xDF)}{cont}|{cls(0xE0, 0xEF)}{cont}{{2}}|{cls(0xF0, 0xF4)}{cont}{{3}})+"
    return re.compile(pat), to_byte


_MOJIBAKE, _MOJI_BYTE = _mojibake_regex()
_PUNCT = {c: None for c in range(0x3000) if unicodedata.category(chr(c)).startswith("P")}


@dataclass
class Finding:
    check: str  # a key of CHECKS
    severity: str  # "error" | "warning" | "info"
    file: str
    line: int  # 1-based line (or row) of the file
    message: str

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class DoctorResult:
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        sev = {f.severity for f in self.findings}
        return 2 if "error" in sev else 1 if "warning" in sev else 0

    def to_dict(self) -> dict:
        return {"findings": [asdict(f) for f in self.findings], "stats": self.stats, "exit_code": self.exit_code}

    def format_text(self, limit: int = 20) -> str:
        """The human report: findings grouped by check with counts (``limit`` lines each), stats, histogram."""
        s, out = self.stats, []
        out.append(f"data: {s['data']} ({s['format']} format; {s['examples']} of {s['records']} records usable)")
        if s.get("eval"):
            e = s["eval"]
            out.append(f"eval: {e['data']} ({e['format']} format; {e['examples']} of {e['records']} records usable)")
        by: dict[str, list[Finding]] = defaultdict(list)
        for f in self.findings:
            by[f.check].append(f)
        for sev in ("error", "warning", "info"):
            checks = [c for c in CHECKS if CHECKS[c][0] == sev and c in by]
            if checks:
                out.append(f"\n{sev}s ({sum(len(by[c]) for c in checks)})")
            for c in checks:
                out.append(f"  {c} ({len(by[c])}): {CHECKS[c][1]}")
                out += [f"    {f.where()}: {f.message}" for f in by[c][:limit]]
                if len(by[c]) > limit:
                    out.append(f"    ... and {len(by[c]) - limit} more (--json lists all)")
        out.append("\nstats")
        out += [f"  {line}" for line in _stats_lines(s)]
        length = s.get("length")
        if length:
            out.append(f"\nexample length ({length['unit']})")
            out += [f"  {line}" for line in _histogram_lines(length["histogram"])]
        n = Counter(f.severity for f in self.findings)
        verdict = "clean" if not self.findings else f"{_n(n['error'], 'error')}, {_n(n['warning'], 'warning')}"
        out.append(f"\nverdict: {verdict} (exit {self.exit_code})")
        return "\n".join(out)


@dataclass
class _File:
    path: str
    fmt: str
    records: int
    convs: list[Conversation]


def run_doctor(data: str | Path, *, eval_data: str | Path | None = None, fmt: str | None = None, tokenizer=None,
               template: str | None = None, max_seq_length: int | None = 2048) -> DoctorResult:
    """Check ``data`` (and its overlap with ``eval_data``); token checks need ``tokenizer``.

    ``template`` is a built-in name, "tokenizer" or a .jinja file (default: the tokenizer's own).
    Raises SftlabError for a missing file, unknown format, unknown template; problems in the data
    itself become findings.
    """
    if max_seq_length is not None and max_seq_length < 1:
        raise SftlabError(f"max_seq_length must be positive, got {max_seq_length}")
    if template and tokenizer is None:
        _check_template_name(template)
    res = DoctorResult()
    train = _load(data, fmt, res.findings)
    evl = _load(eval_data, fmt, res.findings) if eval_data else None
    tok, tpl, added = _setup_tokenizer(tokenizer, template, train.convs + (evl.convs if evl else []))
    specials = _special_tokens(tok) if tok is not None else set()
    markers = sorted(set(TEMPLATE_MARKERS) | specials, key=len, reverse=True)
    marker_re = re.compile("|".join(map(re.escape, markers)) + "|" + _GENERIC_MARKER)
    for conv in train.convs + (evl.convs if evl else []):
        _text_checks(conv, marker_re, specials, res.findings)
    mh = _MinHash()
    bodies = mh.index([_body(c) for c in train.convs])
    stats = {"data": train.path, "format": train.fmt, "records": train.records, "examples": len(train.convs)}
    stats["duplicates"] = _duplicates(train.convs, bodies, res.findings)
    stats["eval"] = None
    if evl:
        stats["eval"] = {"data": evl.path, "format": evl.fmt, "records": evl.records, "examples": len(evl.convs),
                         **_eval_overlap(train.convs, evl.convs, mh, bodies, res.findings)}
    if tok is not None:
        stats.update(_token_checks(train.convs, tok, tpl, max_seq_length, res.findings))
        stats["added_tokens"] = added
        _consistency(train.convs, tpl, res.findings)
    else:
        chars = [len(c.text) if c.is_text else sum(len(m.content) for m in c.messages) for c in train.convs]
        stats["length"] = _length_stats(chars, "characters")
        stats["trained_tokens"] = stats["max_seq_length"] = None
        stats["note"] = "lengths are characters of message text; pass a model for token lengths and trained tokens"
    order = {c: i for i, c in enumerate(CHECKS)}
    in_eval = (lambda f: Path(evl.path) in (Path(f.file), *Path(f.file).parents)) if evl else (lambda f: False)
    res.findings.sort(key=lambda f: (in_eval(f), f.file, f.line, order[f.check]))
    stats["findings"] = dict(Counter(f.severity for f in res.findings))
    stats["checks"] = dict(Counter(f.check for f in res.findings))
    res.stats = stats
    return res


def _consistency(convs: list[Conversation], tpl, findings: list[Finding], sample: int = 32) -> None:
    """The inference prompt (generation prompt) must be a prefix of the training text at every reply."""
    if tpl is None:
        return
    from sftlab.export import check_template_consistency

    chats = [c for c in convs if not c.is_text][:sample]
    for c, problem in zip(chats, (check_template_consistency(tpl, [c]) for c in chats)):
        if problem:
            _add(findings, "template_consistency", c.source, c.line, problem[0])


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _add(findings: list[Finding], check: str, file: str, line: int, message: str) -> None:
    findings.append(Finding(check, CHECKS[check][0], file, line, message))


# --- reading ------------------------------------------------------------------------------------
def _load(path, fmt: str | None, findings: list[Finding]) -> _File:
    """Read and convert one file; unreadable or unconvertible records become findings."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".json", ".csv"):
        bad = _bad_utf8_lines(p)  # these readers decode the whole file at once: find the lines first
        if bad:
            for line, msg in bad:
                _add(findings, "encoding", str(p), line, msg)
            return _File(str(p), fmt or "unknown", len(bad), [])
    records = read_records(path, strict=False)
    readable = [r for r in records if r.data is not None]
    if fmt and fmt != "auto":
        key = resolve_format(fmt, records)
    elif readable:
        # The majority format, so one odd first line does not make every other line "wrong".
        counts = Counter(f for r in readable if (f := format_of_row(r.data)))
        key = counts.most_common(1)[0][0] if counts else resolve_format(None, records)
    else:
        key = "unknown"
    convs, failures = to_conversations(records, key, strict=False) if readable else ([], [])
    if not readable:
        failures = [(r, None) for r in records]
    for rec, exc in failures:
        if exc is None or exc.check == "parse":
            err = rec.error or "unreadable"
            _add(findings, "encoding" if err.startswith("invalid UTF-8") else "parse", rec.source, rec.line, err)
        else:
            check = exc.check if exc.check in CHECKS else "fields"
            msg = f"{exc} (read as '{key}' format)" if check == "fields" else str(exc)
            _add(findings, check, rec.source, rec.line, msg)
    return _File(str(p), key, len(records), convs)


def _bad_utf8_lines(p: Path) -> list[tuple[int, str]]:
    out = []
    for i, bline in enumerate(p.read_bytes().split(b"\n"), start=1):
        try:
            bline.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append((i, f"invalid UTF-8 at byte {exc.start} of the line (re-encode the file as UTF-8)"))
    return out


def _check_template_name(name: str) -> None:
    if name in BUILTIN or name in ("auto", "tokenizer", "model") or Path(name).is_file():
        return
    raise SftlabError(f"unknown template '{name}'",
                      hint=f"use one of: {', '.join(template_names())}, 'tokenizer', or a .jinja file")


def _setup_tokenizer(tokenizer, template: str | None, convs: list[Conversation]):
    """The tokenizer and template training would use, with the tokens a built-in template adds."""
    if tokenizer is None:
        return None, None, []
    if not template and all(c.is_text for c in convs):
        return tokenizer, None, []
    tpl = resolve_template(template, tokenizer)
    added = missing_tokens(tpl, tokenizer) if tpl.name != "tokenizer" else []
    if added:  # as prepare.setup_template does; on a copy, so the caller's tokenizer stays as it was
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    return tokenizer, tpl, added


def _special_tokens(tok) -> set[str]:
    """Strings a fast tokenizer turns into one control token wherever they appear in text."""
    added = [str(t) for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return {s for s in [*tok.all_special_tokens, *added] if s}


# --- per-example text checks ----------------------------------------------------------------------
def _text_checks(conv: Conversation, marker_re: re.Pattern, specials: set[str], findings: list[Finding]) -> None:
    """Encoding damage and template/special tokens; one finding per example and check."""
    hits: dict[str, list[str]] = defaultdict(list)
    pieces = [("text", conv.text)] if conv.is_text else [
        (f"message {i} ({m.role})", m.content) for i, m in enumerate(conv.messages, start=1)]
    for label, text in pieces:
        moji = [] if text.isascii() else [m for m in _MOJIBAKE.finditer(text) if _fixable(m.group())]
        if moji:
            bad = moji[0].group()
            hits["mojibake"].append(f"{label}: {bad!r} (probably {_fixable(bad)!r}; UTF-8 read as cp1252/latin-1)")
            text = _MOJIBAKE.sub("", text)
        if "\ufffd" in text:
            hits["mojibake"].append(f"{label}: U+FFFD replacement characters (text was decoded with errors replaced)")
        ctrl = _CONTROL.search(text)
        if ctrl:
            hits["control_chars"].append(f"{label}: control character U+{ord(ctrl.group()):04X} "
                                         f"at index {ctrl.start()}")
        found = sorted(set(marker_re.findall(text)))
        real = [t for t in found if t in specials]
        if real:
            hits["special_tokens"].append(f"{label}: {', '.join(real)} (tokenized as control tokens; remove or escape)")
        if len(real) < len(found):
            hits["template_markers"].append(f"{label}: {', '.join(t for t in found if t not in specials)}")
    for check, msgs in hits.items():
        more = f" (and {_n(len(msgs) - 1, 'more message')})" if len(msgs) > 1 else ""
        _add(findings, check, conv.source, conv.line, msgs[0] + more)


def _fixable(s: str) -> str | None:
    try:
        return bytes(_MOJI_BYTE[c] for c in s).decode("utf-8")
    except (UnicodeDecodeError, KeyError):
        return None


# --- duplicates and overlap -------------------------------------------------------------------------
def _norm(text: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _exact_key(c: Conversation) -> str:
    return json.dumps(["text", c.text] if c.is_text else [[m.role, m.content] for m in c.messages])


def _body(c: Conversation) -> str:
    # System prompts are left out: a long shared system prompt would make unrelated examples "near".
    return c.text if c.is_text else "\n".join(m.content for m in c.messages if m.role != "system")


def _prompt(c: Conversation) -> str | None:
    return None if c.is_text else "\n".join(m.content for m in c.messages if m.role == "user")


class _MinHash:
    """MinHash signatures of word 3-shingles with LSH buckets: near-duplicate search in about O(n).

    Written by hand because no installed dependency does it; 16 bands x 6 rows find a pair with
    Jaccard 0.9 with probability > 0.99999, and every candidate is confirmed by its exact Jaccard.
    """

    BANDS, ROWS, MAX_CANDIDATES = 16, 6, 64

    def __init__(self):
        rng = np.random.default_rng(0)
        n = self.BANDS * self.ROWS
        self.a = rng.integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=n, dtype=np.uint64)
        self.mix = rng.integers(1, 2**63, size=self.ROWS, dtype=np.uint64) | np.uint64(1)
        self.vocab: defaultdict[str, int] = defaultdict()
        self.vocab.default_factory = self.vocab.__len__  # a new word gets the next id

    def shingles(self, text: str) -> np.ndarray:
        """Sorted unique 64-bit hashes of the normalised text's word 3-grams (one for shorter texts)."""
        words = _norm(text).split()
        ids = np.fromiter(map(self.vocab.__getitem__, words), dtype=np.uint64, count=len(words))
        if not ids.size:
            return ids
        if ids.size < 3:  # pad short texts with a value no word id takes
            ids = np.concatenate([ids, np.full(3 - ids.size, 2**63, dtype=np.uint64)])
        k1, k2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
        return np.unique(ids[:-2] * k1 + ids[1:-1] * k2 + ids[2:])

    def index(self, texts: list[str]) -> _NearIndex:
        """Shingles and LSH band keys of ``texts``; nothing is added to the buckets yet."""
        sets = [self.shingles(t) for t in texts]
        sig = np.full((len(sets), self.a.size), np.iinfo(np.uint64).max, dtype=np.uint64)
        idx = [i for i, s in enumerate(sets) if s.size]
        start = 0
        while start < len(idx):  # chunks keep the (shingles, hashes) matrix small
            stop, total = start, 0
            while stop < len(idx) and (total == 0 or total + sets[idx[stop]].size <= 100_000):
                total += sets[idx[stop]].size
                stop += 1
            chunk = idx[start:stop]
            cat = np.concatenate([sets[i] for i in chunk])
            offsets = np.cumsum([0] + [sets[i].size for i in chunk[:-1]])
            h = (cat[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)
            sig[chunk] = np.minimum.reduceat(h, offsets, axis=0)
            start = stop
        keys = (sig.reshape(len(sets), self.BANDS, self.ROWS) * self.mix).sum(axis=2, dtype=np.uint64)
        return _NearIndex(sets, keys.tolist(), self.BANDS, self.MAX_CANDIDATES)


class _NearIndex:
    def __init__(self, sets: list[np.ndarray], keys: list[list[int]], bands: int, max_candidates: int):
        self.sets, self.keys, self.max_candidates = sets, keys, max_candidates
        self.buckets: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(bands)]
        self.added: set[int] = set()

    def add(self, i: int) -> None:
        if self.sets[i].size and i not in self.added:
            self.added.add(i)
            for bucket, k in zip(self.buckets, self.keys[i]):
                bucket[k].append(i)

    def find(self, shingles: np.ndarray, keys: list[int]) -> tuple[int, float] | None:
        """An added item with Jaccard >= NEAR_JACCARD to ``shingles``, and that Jaccard, or None.

        Candidates sharing the most LSH bands are confirmed first (ties: the earliest item).
        """
        if not shingles.size:
            return None
        shared = Counter(j for bucket, k in zip(self.buckets, keys) for j in bucket.get(k, ()))
        for j, _ in sorted(shared.items(), key=lambda jn: (-jn[1], jn[0]))[: self.max_candidates]:
            other = self.sets[j]
            if min(other.size, shingles.size) < NEAR_JACCARD * max(other.size, shingles.size):
                continue
            inter = np.intersect1d(other, shingles, assume_unique=True).size
            jac = inter / (other.size + shingles.size - inter)
            if jac >= NEAR_JACCARD:
                return j, jac
        return None


def _duplicates(convs: list[Conversation], index: _NearIndex, findings: list[Finding]) -> dict:
    """Exact copies, then equal normalised text, then MinHash near duplicates; each names the first line."""
    first_exact: dict[str, int] = {}
    first_norm: dict[str, int] = {}
    n_exact = n_near = 0
    for i, c in enumerate(convs):
        ek, nk = _exact_key(c), _norm(_body(c))
        if ek in first_exact:
            n_exact += 1
            _add(findings, "duplicate", c.source, c.line, f"exact duplicate of {convs[first_exact[ek]].where()}")
            continue
        first_exact[ek] = i
        if nk and nk in first_norm:
            n_near += 1
            _add(findings, "near_duplicate", c.source, c.line,
                 f"same text as {convs[first_norm[nk]].where()} after normalising case, whitespace and punctuation")
            continue
        first_norm.setdefault(nk, i)
        hit = index.find(index.sets[i], index.keys[i])
        if hit:
            n_near += 1
            _add(findings, "near_duplicate", c.source, c.line,
                 f"near duplicate of {convs[hit[0]].where()} (word 3-shingle Jaccard {hit[1]:.2f})")
            continue
        index.add(i)
    return {"exact": n_exact, "near": n_near}


def _eval_overlap(train: list[Conversation], evl: list[Conversation], mh: _MinHash, bodies: _NearIndex,
                  findings: list[Finding]) -> dict:
    """Eval examples whose example or prompt (user turns) is in the training data, exactly or nearly."""
    exact = {_exact_key(c): c for c in reversed(train)}
    prompts = {p: c for c in reversed(train) if (p := _prompt(c))}
    norms = {n: c for c in reversed(train) for t in (_body(c), _prompt(c)) if t and (n := _norm(t))}
    n_exact, rest = 0, []
    for c in evl:
        prompt = _prompt(c)
        if (t := exact.get(_exact_key(c))) or (prompt and (t := prompts.get(prompt))):
            n_exact += 1
            what = "identical to" if _exact_key(t) == _exact_key(c) else "same prompt as"
            _add(findings, "eval_overlap", c.source, c.line, f"{what} training example {t.where()}")
            continue
        near = next((norms[n] for t in (_body(c), prompt) if t and (n := _norm(t)) in norms), None)
        if near is not None:
            _add(findings, "eval_near_overlap", c.source, c.line, f"nearly identical to training example "
                 f"{near.where()} (same text after normalising case, whitespace and punctuation)")
        else:
            rest.append(c)
    n_near = len(evl) - n_exact - len(rest)
    if rest:  # MinHash only for what is left
        for i in range(len(train)):
            bodies.add(i)  # _duplicates added only the first of each near-duplicate group
        train_prompts = mh.index([_prompt(c) or "" for c in train])
        for i in range(len(train)):
            train_prompts.add(i)
        queries = [(bodies, mh.index([_body(c) for c in rest]), "example"),
                   (train_prompts, mh.index([_prompt(c) or "" for c in rest]), "prompt")]
        for k, c in enumerate(rest):
            for index, q, what in queries:
                hit = index.find(q.sets[k], q.keys[k])
                if hit:
                    n_near += 1
                    _add(findings, "eval_near_overlap", c.source, c.line, f"nearly identical to training example "
                         f"{train[hit[0]].where()} ({what} word 3-shingle Jaccard {hit[1]:.2f})")
                    break
    return {"exact_overlap": n_exact, "near_overlap": n_near}


# --- token checks and statistics ---------------------------------------------------------------------
def _token_checks(convs: list[Conversation], tok, tpl, max_len: int | None, findings: list[Finding]) -> dict:
    """Tokenize as training does (all assistant replies trained); lengths, trained tokens, the limit."""
    labeler = Labeler(tok, tpl)
    segs, kept = [], []
    for c in convs:
        try:
            segs.append(labeler.segments(c))
            kept.append(c)
        except SftlabError as exc:
            msg = str(exc).removeprefix(f"{c.where()}: ")
            _add(findings, "template", c.source, c.line, msg)
    encoded = labeler.encode_segments(segs)
    lengths, trained = [], []
    n_long = lost_total = 0
    for c, (ids, labels) in zip(kept, encoded):
        n_tr = len(labels) - labels.count(IGNORE)
        lengths.append(len(ids))
        trained.append(n_tr)
        if n_tr == 0:
            _add(findings, "no_trained", c.source, c.line, "no token of this example is trained")
            continue
        if max_len is not None and len(ids) > max_len:
            lost = len(labels) - max_len - labels[max_len:].count(IGNORE)
            n_long += 1
            lost_total += lost
            _add(findings, "too_long", c.source, c.line,
                 f"{len(ids)} tokens > max_seq_length {max_len}; cut there it loses {lost} of its {n_tr} "
                 f"trained tokens ({lost / n_tr:.0%})")
            if lost == n_tr:
                _add(findings, "no_trained", c.source, c.line,
                     f"all {n_tr} trained tokens lie past max_seq_length {max_len}; cut there it trains on nothing")
    total, total_tr = sum(lengths), sum(trained)
    out = {"length": _length_stats(lengths, "tokens"), "trained_tokens": None, "max_seq_length": None}
    if trained:
        out["trained_tokens"] = {"total": total_tr, "mean": round(total_tr / len(trained), 2), "min": min(trained),
                                 "max": max(trained), "share": round(total_tr / total, 4) if total else 0.0}
    if max_len is not None:
        out["max_seq_length"] = {"limit": max_len, "too_long": n_long,
                                 "too_long_share": round(n_long / len(lengths), 4) if lengths else 0.0,
                                 "lost_trained_tokens": lost_total,
                                 "lost_trained_share": round(lost_total / total_tr, 4) if total_tr else 0.0}
    return out


def _length_stats(values: list[int], unit: str) -> dict | None:
    if not values:
        return None
    v = sorted(values)
    return {"unit": unit, "min": v[0], "max": v[-1], "mean": round(sum(v) / len(v), 2), "median": v[len(v) // 2],
            "p95": v[min(len(v) - 1, int(0.95 * len(v)))], "histogram": _histogram(v)}


def _histogram(values: list[int], bins: int = 10) -> list[dict]:
    lo, hi = values[0], values[-1]
    width = 1
    while width * bins < hi - lo + 1:  # 1, 2, 5, 10, 20, 50, ...
        width = width * 5 // 2 if str(width)[0] == "2" else width * 2
    start = lo // width * width
    counts = [0] * ((hi - start) // width + 1)
    for x in values:
        counts[(x - start) // width] += 1
    return [{"lo": start + i * width, "hi": start + (i + 1) * width - 1, "count": n} for i, n in enumerate(counts)]


def _histogram_lines(hist: list[dict], width: int = 40) -> list[str]:
    top = max(h["count"] for h in hist) or 1
    w = len(str(hist[-1]["hi"]))
    return [f"{h['lo']:>{w}}-{h['hi']:<{w}} | {'#' * round(h['count'] / top * width):<{width}} {h['count']}"
            for h in hist]


def _stats_lines(s: dict) -> list[str]:
    out = []
    if s.get("length"):
        ln = s["length"]
        out.append(f"length ({ln['unit']}): min {ln['min']}, median {ln['median']}, mean {ln['mean']}, "
                   f"p95 {ln['p95']}, max {ln['max']}")
    if s.get("trained_tokens"):
        t = s["trained_tokens"]
        out.append(f"trained tokens: {t['total']} ({t['share']:.1%} of all tokens); per example mean {t['mean']}, "
                   f"min {t['min']}, max {t['max']}")
    if s.get("max_seq_length"):
        m = s["max_seq_length"]
        out.append(f"over max_seq_length {m['limit']}: {m['too_long']} examples ({m['too_long_share']:.1%}); "
                   f"cut there they lose {m['lost_trained_tokens']} trained tokens ({m['lost_trained_share']:.1%})")
    if s.get("added_tokens"):
        out.append(f"template tokens the tokenizer lacks (training adds them): {', '.join(s['added_tokens'])}")
    d = s["duplicates"]
    out.append(f"duplicates: {d['exact']} exact, {d['near']} near")
    if s.get("eval"):
        e = s["eval"]
        out.append(f"eval overlap: {e['exact_overlap']} exact, {e['near_overlap']} near")
    if s.get("note"):
        out.append(f"note: {s['note']}")
    return out
