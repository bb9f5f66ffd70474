"""Choose the approach for a use case: prompting, few-shot, RAG, PEFT or full SFT, with the reasons.

The rules are the usual decision framework, checked in order; the first that matches decides:

1. fewer than 50 examples: prompt engineering for a simple task (or without examples), few-shot prompting otherwise;
2. knowledge-heavy (domain-specific), no strict output format, and the knowledge changes daily or
   weekly: RAG (retrieval keeps answers current without retraining);
3. low compute and 100 or more examples: PEFT (LoRA/QLoRA);
4. a strict output format and 500 or more examples: full SFT;
5. a complex task and high compute: full SFT;
6. otherwise: PEFT.

Latency sensitivity does not change the choice; it adds caveats (retrieval and long prompts cost time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from sftlab.config import UniqueKeyLoader
from sftlab.core.errors import SftlabError

APPROACHES = ("prompt engineering", "few-shot", "RAG", "PEFT", "full SFT")
COMPLEXITY = ("simple", "moderate", "complex")
LEVELS = ("low", "medium", "high")
UPDATES = ("never", "yearly", "monthly", "weekly", "daily")


@dataclass(frozen=True)
class UseCase:
    """What the user wants to build. ``latency`` and ``compute`` are low/medium/high."""

    complexity: str = "moderate"
    examples: int = 0
    strict_format: bool = False
    domain_specific: bool = False
    latency: str = "medium"
    compute: str = "medium"
    knowledge_updates: str = "never"
    assumed: tuple[str, ...] = field(default=(), compare=False)  # keys not given, left at their defaults

    def __post_init__(self):
        for name, allowed in (("complexity", COMPLEXITY), ("latency", LEVELS), ("compute", LEVELS),
                              ("knowledge_updates", UPDATES)):
            if getattr(self, name) not in allowed:
                raise SftlabError(f"unknown {name.replace('_', '-')} {getattr(self, name)!r}",
                                  hint=f"use one of: {', '.join(allowed)}")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 0:
            raise SftlabError(f"examples must be a whole number >= 0, got {self.examples!r}")
        for name in ("strict_format", "domain_specific"):
            if not isinstance(getattr(self, name), bool):
                raise SftlabError(f"{name.replace('_', '-')} must be true or false, got {getattr(self, name)!r}")


@dataclass
class Recommendation:
    approach: str
    rule: int
    reasons: list[str]
    caveats: list[str] = field(default_factory=list)
    use_case: dict = field(default_factory=dict)
    assumed: list[str] = field(default_factory=list)  # "key value" for each use-case key not given

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(uc: UseCase) -> Recommendation:
    """Apply the rules in order (see the module docstring) and explain the one that decided."""
    n = uc.examples
    fast_changing = uc.knowledge_updates in ("daily", "weekly")
    if n < 50:
        if n == 0:  # few-shot needs examples to show
            rec = Recommendation("prompt engineering", 1, [
                "no labelled examples: nothing to fine-tune on, nor to show in the prompt",
                "write clear instructions; with a few examples, few-shot prompting; with 50 or more, fine-tuning"])
        elif uc.complexity == "simple":
            rec = Recommendation("prompt engineering", 1, [
                f"only {n} example{'' if n == 1 else 's'}: too few to fine-tune without overfitting (under 50)",
                "the task is simple, so clear instructions in the prompt should do"])
        else:
            rec = Recommendation("few-shot", 1, [
                f"only {n} example{'' if n == 1 else 's'}: too few to fine-tune without overfitting (under 50)",
                f"the task is {uc.complexity}: put a handful of the examples in the prompt to show the pattern"])
    elif uc.domain_specific and not uc.strict_format and fast_changing:
        rec = Recommendation("RAG", 2, [
            "the task is knowledge-heavy (domain-specific)",
            f"the knowledge changes {uc.knowledge_updates}: retrieval stays current, a fine-tuned model goes stale",
            "no strict output format is needed, so fine-tuning buys little beyond the knowledge"])
    elif uc.compute == "low" and n >= 100:
        rec = Recommendation("PEFT", 3, [
            "compute is low: train a small adapter (LoRA, or QLoRA on a 4-bit base) instead of all weights",
            f"{n} examples (100 or more) are enough for an adapter to learn the task"])
    elif uc.strict_format and n >= 500:
        rec = Recommendation("full SFT", 4, [
            "a strict output format must be followed every time: fine-tuning teaches it more reliably than prompts",
            f"{n} examples (500 or more) are enough to train all the weights"])
    elif uc.complexity == "complex" and uc.compute == "high":
        rec = Recommendation("full SFT", 5, [
            "the task is complex: training all the weights gives the model the most room to learn it",
            "compute is high, so a full fine-tune is affordable"])
    else:
        rec = Recommendation("PEFT", 6, [
            f"{n} examples are enough to fine-tune, and no stronger case for full SFT or RAG applies",
            "an adapter (LoRA) gets most of the gain at a fraction of the memory and keeps the base model intact"])
    rec.caveats = _caveats(uc, rec.approach)
    rec.use_case = {k: v for k, v in asdict(uc).items() if k != "assumed"}
    rec.assumed = [f"{k.replace('_', '-')} {_word(getattr(uc, k))}" for k in uc.assumed]
    return rec


def _word(v) -> str:
    return ("yes" if v else "no") if isinstance(v, bool) else str(v)


def _caveats(uc: UseCase, approach: str) -> list[str]:
    out = []
    if uc.latency == "high" and approach == "RAG":
        out.append("latency-sensitive: retrieval adds a round trip per request; cache it and keep the index close")
    if uc.latency == "high" and approach == "few-shot":
        out.append("latency-sensitive: the examples lengthen every prompt; move to PEFT once you have 100+ examples")
    if approach in ("PEFT", "full SFT") and uc.domain_specific and uc.knowledge_updates in ("daily", "weekly"):
        out.append(f"the knowledge changes {uc.knowledge_updates}: pair the fine-tuned model with retrieval (RAG) for facts")
    if approach in ("prompt engineering", "few-shot") and uc.domain_specific and uc.knowledge_updates in ("daily", "weekly"):
        out.append(f"domain knowledge that changes {uc.knowledge_updates}: no prompt holds it; retrieve it (RAG) into "
                   "the prompt, which needs no labelled examples")
    if approach == "full SFT":
        out.append("watch for forgetting of general skills: mix in replay data and compare before/after")
    if approach in ("prompt engineering", "few-shot") and uc.strict_format:
        out.append("a strict format: validate outputs (or use constrained decoding) until you have data to fine-tune")
    return out


_KEYS = {f.name: f for f in fields(UseCase) if f.name != "assumed"}


def load_use_case(path: str | Path | None = None, overrides: dict | None = None) -> UseCase:
    """A :class:`UseCase` from a YAML file (keys as the fields, dashes or underscores) plus overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except FileNotFoundError:
            raise SftlabError(f"use-case file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, not UTF-8 text
            why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
            raise SftlabError(f"use-case file {p} cannot be read: {why}", hint="give a YAML file of use-case keys") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None)
            raise SftlabError(f"{p}{where}: not valid YAML" + (f" ({problem})" if problem else ""),
                              hint="write one 'key: value' per line") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise SftlabError(f"{p}: expected a mapping of use-case keys, got {type(raw).__name__}")
        for key, value in raw.items():
            values[str(key).replace("-", "_")] = value
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(_KEYS))
    if unknown:
        src = f"{path}: " if path else ""
        raise SftlabError(f"{src}unknown use-case key {unknown[0]!r}", hint=f"known keys: {', '.join(_KEYS)}")
    if values.get("examples") is None:  # the one input every rule reads: never assume it
        src = f"{path} has no 'examples' key" if path else "how many labelled examples you have is not given"
        raise SftlabError(f"recommend: {src}", hint="--examples N (or 'examples: N' in USE_CASE.yaml); "
                          "other keys default and are listed as assumptions")
    if isinstance(values.get("examples"), str):
        try:
            values["examples"] = int(values["examples"].replace("_", "").replace(",", ""))
        except ValueError:
            raise SftlabError(f"examples must be a whole number, got {values['examples']!r}") from None
    for name in ("strict_format", "domain_specific"):
        v = values.get(name)
        if isinstance(v, str) and v.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            values[name] = v.lower() in ("true", "yes", "1", "on")
    for name in ("complexity", "latency", "compute", "knowledge_updates"):
        if isinstance(values.get(name), str):
            values[name] = values[name].strip().lower()
    return UseCase(**values, assumed=tuple(k for k in _KEYS if k not in values))
