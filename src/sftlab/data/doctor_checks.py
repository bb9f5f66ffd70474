"""The data doctor's checks: the check registry, per-example text checks, duplicates and train/eval
overlap (MinHash). Token lengths and truncation are in :mod:`sftlab.data.doctor_lengths`, reading files
and unread keys in :mod:`sftlab.data.doctor_read`, tool-calling and reasoning in :mod:`sftlab.data.doctor_tools`.

Each check appends :class:`sftlab.core.findings.Finding` objects (rule = the check's name) to a list; :func:`sftlab.data.doctor.run_doctor` reads
the files, runs the checks and reports.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict

import numpy as np

from sftlab.core.findings import Finding
from sftlab.data.types import Conversation

# check name -> (severity, heading). The report lists checks in this order.
CHECKS: dict[str, tuple[str, str]] = {
    "encoding": ("error", "invalid UTF-8 or cut characters (unpaired surrogates)"),
    "parse": ("error", "lines that do not parse"),
    "fields": ("error", "missing or wrong fields for the format"),
    "mixed_formats": ("error", "records in another format than the rest of the file"),
    "role_order": ("error", "wrong role order (or no reply at the end)"),
    "empty_reply": ("error", "empty replies"),
    "non_text": ("error", "image, audio or other non-text content"),
    "template": ("error", "the chat template cannot place the replies"),
    "special_tokens": ("error", "the tokenizer's special tokens inside message text"),
    "no_trained": ("error", "examples with no trained token"),
    "nothing_left": ("error", "no example is left to train on"),
    "eval_overlap": ("error", "eval examples or prompts also in the training data"),
    "tool_arguments": ("error", "tool-call arguments that are not a JSON object"),
    "tool_unknown_function": ("error", "calls to a function the record's tools do not offer"),
    "tool_orphan_result": ("error", "tool results with no matching call before them"),
    "template_tools": ("error", "the chat template ignores tools or tool calls"),
    "reasoning_unclosed": ("error", "unclosed or stray <think> tags in replies"),
    "unread_keys": ("warning", "keys training does not read, a typo away from ones it does"),
    "empty_user": ("warning", "user turns that are empty or only whitespace"),
    "mojibake": ("warning", "mojibake (text decoded with the wrong encoding)"),
    "control_chars": ("warning", "control characters"),
    "template_markers": ("warning", "chat-template markers inside message text"),
    "too_long": ("warning", "examples longer than max_seq_length"),
    "duplicate": ("warning", "exact duplicates"),
    "near_duplicate": ("warning", "near duplicates"),
    "eval_near_overlap": ("warning", "eval examples or prompts nearly identical to training data"),
    "template_consistency": ("warning", "training text and inference prompt disagree"),
    "reasoning_lost": ("warning", "reasoning the template drops from the one example reasoning: keep|last trains"),
    "tool_schema": ("warning", "tool-call arguments that do not match the function's schema"),
    "tool_unanswered": ("warning", "tool calls never answered by a tool result"),
    "tool_result_order": ("warning", "results of one function in another order than its calls"),
    "reasoning_in_user": ("warning", "<think> reasoning inside user or system turns"),
    "reasoning_unopened": ("info", "reasoning before a </think> with no <think>, read as reasoning (DeepSeek-R1 style)"),
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


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _add(findings: list[Finding], check: str, file: str, line: int, message: str, *, severity: str | None = None,
         fix: str | None = None) -> None:
    """A finding of ``check`` at ``file:line`` (1-based); file and line stay in ``data`` for sorting.
    ``severity`` overrides the check's own (a record the loader rejects is an error whatever the check)."""
    findings.append(Finding(check, severity or CHECKS[check][0], message, where=f"{file}:{line}",
                            fixes=[fix] if fix else [], data={"file": file, "line": line}))


# --- per-example text checks ----------------------------------------------------------------------
def _text_checks(conv: Conversation, marker_re: re.Pattern, specials: set[str], findings: list[Finding]) -> None:
    """Encoding damage and template/special tokens; one finding per example and check."""
    hits: dict[str, list[str]] = defaultdict(list)
    for label, text in _texts(conv):
        moji = [] if text.isascii() else [m for m in _MOJIBAKE.finditer(text) if _repair(m.group())]
        if moji:
            bad = moji[0].group()
            hits["mojibake"].append(f"{label}: {bad!r} (probably {_repair(bad)!r}; UTF-8 read as cp1252/latin-1)")
            text = _MOJIBAKE.sub(lambda m: "" if _repair(m.group()) else m.group(), text)
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


def _empty_user(conv: Conversation, findings: list[Finding]) -> None:
    """A user turn that is empty or only whitespace: its reply answers nothing (often a prompt lost upstream)."""
    at = [] if conv.is_text else [i for i, m in enumerate(conv.messages, start=1) if m.role == "user" and not m.content.strip()]
    if at:
        what = "empty" if not conv.messages[at[0] - 1].content else "only whitespace"
        _add(findings, "empty_user", conv.source, conv.line, f"message {at[0]} (user) is {what}"
             + (f" (and {_n(len(at) - 1, 'more user message')})" if len(at) > 1 else ""),
             fix="restore the prompt that was lost, or remove the example")


def _texts(conv: Conversation) -> list[tuple[str, str]]:
    """(label, text) of every string a template renders: contents, reasoning (trained, inlined as <think>
    where the template has no field for it), tool calls' names, ids and string argument values (trained),
    a tool result's call id and name, and the tools offered."""
    if conv.is_text:
        return [("text", conv.text)]
    out = []
    for i, m in enumerate(conv.messages, start=1):
        label = f"message {i} ({m.role})"
        out.append((label, m.content))
        if m.reasoning:
            out.append((f"{label} reasoning", m.reasoning))
        for j, call in enumerate(m.tool_calls or (), start=1):
            fn = call["function"]
            strings = [fn["name"], call.get("id")] + _strings(fn.get("arguments"))
            out += [(f"{label} tool call {j}", s) for s in strings if isinstance(s, str)]
        out += [(label, s) for s in (m.tool_call_id, m.name) if s]
    if conv.tools:
        out += [("tools", s) for s in _strings(conv.tools)]
    return out


def _strings(value) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *_strings(v)]]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _repair(s: str) -> str | None:
    """The text ``s`` was before its UTF-8 bytes were read as cp1252/latin-1, when that is plausible, else None.

    Clean text can spell such bytes by chance: "perché…”" holds é…”, the cp1252 bytes of 酔. So a
    repair counts only when it yields Latin text or punctuation (cafÃ© -> café, â€™ -> ’, â„¢ -> ™), a
    Cyrillic letter from the classic Ð/Ñ leads, or at least two letters in a row (æ—¥æœ¬ -> 日本), which
    chance does not spell.
    """
    try:
        fixed = bytes(_MOJI_BYTE[c] for c in s).decode("utf-8")
    except (UnicodeDecodeError, KeyError):
        return None
    if all(_latin(c) for c in fixed) or s[0] in "ÐÑ" and "\u0400" <= fixed[0] <= "\u04ff":
        return fixed
    return fixed if sum(unicodedata.category(c).startswith("L") for c in fixed) >= 2 else None


def _latin(c: str) -> bool:
    """Latin letters and the punctuation, currency and letterlike symbols Western text uses."""
    o = ord(c)
    return o < 0x250 or 0x2000 <= o < 0x2070 or 0x20A0 <= o < 0x20D0 or 0x2100 <= o < 0x2150


# --- duplicates and overlap -------------------------------------------------------------------------
def _norm(text: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _exact_key(c: Conversation) -> str:
    return json.dumps(["text", c.text] if c.is_text else [[m.role, m.content, m.tool_calls, m.reasoning]
                                                          for m in c.messages], default=str)


def _body(c: Conversation) -> str:
    # System prompts are left out: a long shared system prompt would make unrelated examples "near".
    # Reasoning and tool calls are trained text too: examples that differ only there are not duplicates.
    return c.text if c.is_text else "\n".join(_turn_text(m) for m in c.messages if m.role != "system")


def _turn_text(m) -> str:
    calls = [c.get("function", c) if isinstance(c, dict) else c for c in m.tool_calls or ()]  # ids left out
    calls = [json.dumps([c.get("name"), c.get("arguments")] if isinstance(c, dict) else c, default=str) for c in calls]
    return "\n".join([m.reasoning or "", m.content, *calls]).strip("\n")


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
            first = convs[first_exact[ek]].where()
            _add(findings, "duplicate", c.source, c.line, f"exact duplicate of {first}" if first != c.where() else
                 "the same record read twice: its file is listed as two sources (a weight or count repeats a source)")
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
