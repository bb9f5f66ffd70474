"""Several data sets in one run: a list of sources -> one seeded mix of conversations.

``data`` (and ``eval_data``) may be a list instead of one path. Each entry is a path, or a mapping::

    data:
      - {path: chat.jsonl, weight: 0.5}                  # share of the mix
      - {path: instruct.jsonl, weight: 0.3, format: alpaca}
      - {path: general.jsonl, weight: 0.2, name: replay}  # replay is simply one more weighted source

What one epoch of a mixture is:

- weights: the epoch has as many examples as all sources hold together (the sum of their sizes);
  source *i* gets ``weight_i / sum(weights)`` of it (rounded by largest remainder, so the counts add
  up exactly). A source with fewer examples than its share is repeated (every example as often as
  the next, the remainder drawn at random); one with more is subsampled without repetition.
- counts: source *i* gives exactly ``count_i`` examples (repeated or subsampled the same way); the
  epoch is their sum.
- neither: every example of every source once, in order (the same as concatenating the files).

Weights and counts do not mix: either every source has a weight, or every source a count, or none
has either. The draw is seeded (``seed``): the same config gives the same mix; it is drawn once per
run and each epoch is one pass over it (the Trainer reshuffles the order every epoch). The resolved
counts are saved in the run's config (:meth:`Mixture.resolved`), so the saved config redraws the
very same mix.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from sftlab.core.errors import SftlabError
from sftlab.data.formats import resolve_format, to_conversations
from sftlab.data.load import read_records
from sftlab.data.types import Conversation

_KEYS = ("path", "format", "weight", "count", "name")


@dataclass(frozen=True)
class Source:
    """One entry of a mixture. ``format`` None: the config's ``format``; ``weight`` and ``count`` None: unset."""

    path: str
    name: str
    format: str | None = None
    weight: float | None = None
    count: int | None = None


def is_mixture(spec) -> bool:
    """True when ``data`` is a list of sources (a plain string keeps the single-file path unchanged)."""
    return isinstance(spec, (list, tuple))


def source_paths(spec) -> list[str]:
    """The file paths named by ``data``: one path, or every source's path (no checks)."""
    if not spec:
        return []
    if not is_mixture(spec):
        return [str(spec)]
    return [str(s.get("path")) if isinstance(s, dict) else str(s) for s in spec]


def _number(raw, what: str, where: str, *, integer: bool) -> float:
    ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw)
    if not ok or (integer and float(raw) != int(raw)):
        raise SftlabError(f"{where}: {what} must be a {'whole ' if integer else ''}number, got {raw!r}")
    if raw <= 0:
        raise SftlabError(f"{where}: {what} must be > 0, got {raw!r}",
                          hint="leave the source out instead" if what == "weight" else None)
    return int(raw) if integer else float(raw)


def _one(i: int, raw, key: str) -> Source:
    where = f"config key '{key}', source {i + 1}"
    if isinstance(raw, (str, Path)):
        raw = {"path": str(raw)}
    if not isinstance(raw, dict):
        raise SftlabError(f"{where}: expected a path or a mapping {{path, format, weight | count, name}}, got {raw!r}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise SftlabError(f"{where}: unknown key '{unknown[0]}'", hint=f"a source takes: {', '.join(_KEYS)}")
    path = raw.get("path")
    if not isinstance(path, (str, Path)) or not str(path):
        raise SftlabError(f"{where}: 'path' is missing", hint="give each source a path: {path: FILE, weight: 0.5}")
    where = f"{where} ({path})"
    if not Path(path).exists():
        raise SftlabError(f"{where}: file not found", hint="check the path (relative paths start at the working folder)")
    if raw.get("weight") is not None and raw.get("count") is not None:
        raise SftlabError(f"{where}: has both weight and count", hint="give one: weight (share of the mix) or count (examples)")
    weight = _number(raw["weight"], "weight", where, integer=False) if raw.get("weight") is not None else None
    count = int(_number(raw["count"], "count", where, integer=True)) if raw.get("count") is not None else None
    fmt = raw.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise SftlabError(f"{where}: format must be a name such as alpaca, got {fmt!r}")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise SftlabError(f"{where}: name must be a non-empty string, got {name!r}")
    return Source(str(path), name or Path(path).stem, fmt, weight, count)


def parse_sources(spec, key: str = "data") -> list[Source]:
    """``data`` as a list of checked sources; a bad one is one SftlabError naming it (index and path)."""
    items = list(spec) if is_mixture(spec) else [spec]
    if not items:
        raise SftlabError(f"config key '{key}': the list of sources is empty", hint="name at least one data file")
    sources = [_one(i, raw, key) for i, raw in enumerate(items)]
    kinds = ["weight" if s.weight is not None else "count" if s.count is not None else "none" for s in sources]
    if len(set(kinds)) > 1:
        i = next(j for j, k in enumerate(kinds) if k != kinds[0])
        have = "no weight or count" if kinds[i] == "none" else f"a {kinds[i]}"
        first = "neither" if kinds[0] == "none" else f"a {kinds[0]}"
        raise SftlabError(f"config key '{key}', source {i + 1} ({sources[i].path}): has {have} while source 1 has {first}",
                          hint="give every source a weight, or every source a count, or none of them either")
    seen: dict[str, int] = {}
    named = []
    for s in sources:  # two files called train.jsonl in different folders: train, train-2
        seen[s.name] = seen.get(s.name, 0) + 1
        named.append(s if seen[s.name] == 1 else Source(s.path, f"{s.name}-{seen[s.name]}", s.format, s.weight, s.count))
    return named


def resolve_counts(sources: list[Source], sizes: list[int]) -> list[int]:
    """Examples drawn from each source in one epoch (see the module docstring); ``sizes``: examples per source."""
    if all(s.count is not None for s in sources):
        return [int(s.count) for s in sources]
    if not all(s.weight is not None for s in sources):
        return list(sizes)
    total, wsum = sum(sizes), sum(s.weight for s in sources)
    exact = [s.weight / wsum * total for s in sources]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sources)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(n: int, k: int, rng: random.Random) -> list[int]:
    """``k`` indices into ``range(n)``: without repetition when ``k <= n``; else every index ``k // n``
    times plus ``k % n`` distinct ones at random. In a random order."""
    whole, rest = divmod(k, n)
    picked = list(range(n)) * whole + rng.sample(range(n), rest)
    rng.shuffle(picked)
    return picked


@dataclass
class Mixture:
    """The drawn mix: conversations in training order and, for each, the index of its source."""

    sources: list[Source]
    formats: list[str]  # the format each source was read as
    sizes: list[int]  # conversations each source holds
    counts: list[int]  # conversations drawn from each source
    conversations: list[Conversation]
    source_of: list[int]  # source index of each conversation

    def resolved(self) -> list[dict]:
        """The mixture as the run's resolved config stores it: counts, so it redraws the same mix."""
        return [{"path": s.path, "format": f, "count": c, "name": s.name}
                for s, f, c in zip(self.sources, self.formats, self.counts)]

    def stats(self, examples) -> list[dict]:
        """Per source: size, drawn, share of the mix, examples kept after tokenization, tokens, trained tokens.

        ``examples``: the tokenized mix (each ``index`` points into :attr:`conversations`).
        """
        total = max(len(self.conversations), 1)
        rows = [{"name": s.name, "path": s.path, "format": f, "weight": s.weight, "size": n, "drawn": c,
                 "share": round(c / total, 4), "examples": 0, "tokens": 0, "trained_tokens": 0}
                for s, f, n, c in zip(self.sources, self.formats, self.sizes, self.counts)]
        for ex in examples:
            row = rows[self.source_of[ex.index]]
            row["examples"] += 1
            row["tokens"] += len(ex.input_ids)
            row["trained_tokens"] += ex.n_trained
        return rows


def read_source(src: Source, fmt: str | None, *, system_prompt: str | None = None) -> tuple[list[Conversation], str]:
    """One source's conversations and the format they were read as (``src.format``, else ``fmt``)."""
    records = read_records(src.path, strict=True)
    key = resolve_format(src.format or fmt, records)
    convs, _ = to_conversations(records, key, system_prompt=system_prompt, strict=True)
    if not convs:
        raise SftlabError(f"source '{src.name}' ({src.path}): holds no examples")
    return convs, key


def load_mixture(spec, fmt: str | None = None, *, system_prompt: str | None = None, seed: int = 0,
                 key: str = "data") -> Mixture:
    """Read every source of ``spec`` and draw one epoch of the mix, seeded (see the module docstring)."""
    sources = parse_sources(spec, key)
    read = [read_source(s, fmt, system_prompt=system_prompt) for s in sources]
    sizes = [len(convs) for convs, _ in read]
    counts = resolve_counts(sources, sizes)
    sampled = any(s.weight is not None or s.count is not None for s in sources)
    pairs: list[tuple[Conversation, int]] = []
    for i, ((convs, _), k) in enumerate(zip(read, counts)):
        picks = draw(len(convs), k, random.Random(f"{seed}/{i}")) if sampled else range(len(convs))
        pairs += [(convs[j], i) for j in picks]
    if sampled:
        random.Random(seed).shuffle(pairs)
    return Mixture(sources, [f for _, f in read], sizes, counts, [c for c, _ in pairs], [i for _, i in pairs])
