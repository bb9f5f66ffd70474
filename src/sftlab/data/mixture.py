"""Several data sets in one run: a list of sources, tokenized once, each epoch a fresh seeded draw.

``data`` (and ``eval_data``) may be a list instead of one path. Each entry is a path, or a mapping::

    data:
      - {path: chat.jsonl, weight: 0.5}                  # share of each epoch
      - {path: instruct.jsonl, weight: 0.3, format: alpaca}
      - {path: general.jsonl, weight: 0.2, name: replay}  # replay is simply one more weighted source

What one epoch of a mixture is:

- weights: the epoch has as many examples as all sources hold together (the sum of their sizes, in
  conversations); source *i* gets ``weight_i / sum(weights)`` of it (rounded by largest remainder, so
  the counts add up exactly).
- counts: source *i* gives exactly ``count_i`` examples; the epoch is their sum.
- neither: every example of every source once (the same as concatenating the files).

Weights and counts do not mix: either every source has a weight, or every source a count, or none
has either.

Every source is read and tokenized once (:func:`load_mixture` returns all of their conversations;
``prepare`` labels them). With weights or counts, :class:`EpochDraw` then picks each epoch's examples
afresh: per source its count from that source's usable examples (those left after tokenization:
too-long or untrained ones are dropped, a chat split per turn gives several), a source with fewer
repeated evenly (every example as often as the next, the remainder drawn at random), one with more
subsampled without repetition. The draw of epoch *e* is seeded by (``seed``, *e*): epoch 2 sees another
subsample of a large source than epoch 1, and the same config gives the same sequence of epochs on
every process and after a resume. The resolved counts are saved in the run's config
(:meth:`Mixture.resolved`), so the saved config draws the very same epochs. Training with ``packing``
packs the first epoch's draw once and passes over those rows every epoch (``train/run.py`` says so
when it starts). An eval mixture is the first epoch's draw, fixed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from sftlab.core.errors import SftlabError
from sftlab.core.findings import Finding
from sftlab.data.formats import resolve_format, to_conversations
from sftlab.data.load import read_records
from sftlab.data.types import Conversation

_KEYS = ("path", "format", "weight", "count", "name")


def _absolute(path: str) -> str:
    """``path`` made absolute when it names a file or folder relative to the working folder; else as it is."""
    local = Path(path).expanduser()
    return str(local.absolute()) if not local.is_absolute() and local.exists() else path


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
    if fmt is not None:
        try:
            resolve_format(fmt, [])  # the name alone: one line naming this source, not the bare name
        except SftlabError as exc:
            raise SftlabError(f"{where}: {exc}") from None
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
    """Examples drawn from each source in one epoch (see the module docstring); ``sizes``: conversations
    per source."""
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


@dataclass(frozen=True)
class EpochDraw:
    """Which examples each epoch of a weighted (or counted) mixture trains on.

    ``pools[i]``: the indices of source *i*'s usable examples (into the list they were tokenized as);
    each epoch takes ``counts[i]`` of them with :func:`draw`, from a generator seeded by (``seed``,
    epoch, *i*), so the sequence of epochs depends on the seed alone: the same on every process, and
    after a resume.
    """

    pools: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...]
    seed: int

    def __len__(self) -> int:
        return sum(self.counts)

    def indices(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s examples (0 is the first), as indices into the tokenized list, shuffled."""
        out: list[int] = []
        for i, (pool, k) in enumerate(zip(self.pools, self.counts)):
            out += [pool[j] for j in draw(len(pool), k, random.Random(f"{self.seed}/{epoch}/{i}"))]
        random.Random(f"{self.seed}/{epoch}").shuffle(out)
        return out


@dataclass
class Mixture:
    """Every source's conversations (each once, source after source), the source of each, and the
    counts one epoch draws (:meth:`epochs`)."""

    sources: list[Source]
    formats: list[str]  # the format each source was read as
    sizes: list[int]  # conversations each source holds
    counts: list[int]  # examples each epoch draws from each source (sizes when not sampled)
    conversations: list[Conversation]
    source_of: list[int]  # source index of each conversation
    sampled: bool = False  # weights or counts: each epoch is drawn; else every example once
    seed: int = 0

    def resolved(self) -> list[dict]:
        """The mixture as the run's resolved config stores it: counts when sampled, so it draws the same
        epochs; plain sources (every example once) otherwise. A path relative to the working folder is made
        absolute, as a plain ``data:`` path is: the run's config is read from anywhere."""
        return [{"path": _absolute(s.path), "format": f, **({"count": c} if self.sampled else {}), "name": s.name}
                for s, f, c in zip(self.sources, self.formats, self.counts)]

    def unused_findings(self, key: str = "data") -> list[Finding]:
        """A warning for each weighted source whose share of an epoch rounds to no example: it is read
        and tokenized, but nothing of it is trained on."""
        total, wsum = sum(self.counts), sum(s.weight or 0 for s in self.sources)
        return [Finding("mixture", "warning", f"source '{s.name}' ({s.path}): weight {s.weight:g} is {s.weight / wsum:.2%} "
                        f"of the weights, under one of an epoch's {total} examples: it is never trained on", where=key,
                        fixes=["raise its weight, or leave the source out"])
                for s, c in zip(self.sources, self.counts) if self.sampled and s.weight is not None and c == 0]

    def epochs(self, examples, dropped: list[tuple[str, str]] = ()) -> EpochDraw | None:
        """The per-epoch draw over the tokenized ``examples`` (each ``index`` points into
        :attr:`conversations`); None when not sampled (each epoch is every example once). ``dropped``:
        (where, why) of each example tokenization dropped, to say why a source has none left."""
        if not self.sampled:
            return None
        pools: list[list[int]] = [[] for _ in self.sources]
        for j, ex in enumerate(examples):
            pools[self.source_of[ex.index]].append(j)
        for i, (s, pool, k, n) in enumerate(zip(self.sources, pools, self.counts, self.sizes)):
            if k and not pool:
                first = self.conversations[self.source_of.index(i)].where()
                why = next((f"; {where}: {w}" for where, w in dropped if where == first), "")
                raise SftlabError(f"source '{s.name}' ({s.path}): none of its {n} conversations is left to train on "
                                  f"after tokenization{why}", hint="raise max_seq_length (`sftlab doctor --model` lists "
                                                                   "each example over it), or leave the source out")
        return EpochDraw(tuple(map(tuple, pools)), tuple(self.counts), self.seed)

    def stats(self, usable, epoch) -> list[dict]:
        """Per source, of one epoch: size (conversations), usable (its examples after tokenization),
        drawn (:attr:`counts`), redrawn (each epoch draws afresh), share of the epoch, and the epoch's examples, tokens and trained tokens.

        ``usable``: every tokenized example once; ``epoch``: one epoch's examples (the first draw).
        """
        rows = [{"name": s.name, "path": s.path, "format": f, "weight": s.weight, "size": n, "usable": 0, "drawn": c,
                 "redrawn": self.sampled, "share": 0.0, "examples": 0, "tokens": 0, "trained_tokens": 0}
                for s, f, n, c in zip(self.sources, self.formats, self.sizes, self.counts)]
        for ex in usable:
            rows[self.source_of[ex.index]]["usable"] += 1
        for ex in epoch:
            row = rows[self.source_of[ex.index]]
            row["examples"] += 1
            row["tokens"] += len(ex.input_ids)
            row["trained_tokens"] += ex.n_trained
        for row in rows:
            row["share"] = round(row["examples"] / max(len(epoch), 1), 4)
        return rows


def read_source(src: Source, fmt: str | None, *, system_prompt: str | None = None,
                split: str = "train") -> tuple[list[Conversation], str]:
    """One source's conversations and the format they were read as (``src.format``, else ``fmt``);
    ``split`` of a folder: "train", or "eval" for held-out data."""
    records = read_records(src.path, strict=True, split=split)
    key = resolve_format(src.format or fmt, records)
    # --format would read every source in one format: a mixture names the one source to change
    fix = (f"change the `format: {src.format}` of source '{src.name}'" if src.format
           else f"give source '{src.name}' its own `format:`")
    convs, _ = to_conversations(records, src.format or fmt, system_prompt=system_prompt, strict=True, format_fix=fix)
    if not convs:
        raise SftlabError(f"source '{src.name}' ({src.path}): holds no examples")
    return convs, key


def load_mixture(spec, fmt: str | None = None, *, system_prompt: str | None = None, seed: int = 0,
                 key: str = "data") -> Mixture:
    """Read every source of ``spec``: all of their conversations, and the counts an epoch draws
    (the draw itself is :meth:`Mixture.epochs`, over the tokenized examples)."""
    sources = parse_sources(spec, key)
    split = "train" if key == "data" else "eval"
    read = [read_source(s, fmt, system_prompt=system_prompt, split=split) for s in sources]
    sizes = [len(convs) for convs, _ in read]
    sampled = any(s.weight is not None or s.count is not None for s in sources)
    return Mixture(sources, [f for _, f in read], sizes, resolve_counts(sources, sizes),
                   [c for convs, _ in read for c in convs], [i for i, (convs, _) in enumerate(read) for _ in convs],
                   sampled, seed)
