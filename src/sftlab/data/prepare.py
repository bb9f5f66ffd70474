"""The data pipeline in one call: config -> tokenizer + template -> conversations -> labelled examples."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.core.io import atomic_dir
from sftlab.data.formats import load_conversations
from sftlab.data.masking import IGNORE, Example, Labeler, PrepareReport, paused_gc
from sftlab.data.mixture import (
    EpochDraw,
    Mixture,
    is_mixture,
    load_mixture,
    source_paths,
)
from sftlab.data.templates import ChatTemplate, missing_tokens, resolve_template
from sftlab.data.types import Conversation
from sftlab.models import load_tokenizer


@dataclass
class Prepared:
    """Labelled examples. ``examples`` is one epoch: every example once, or a weighted (or counted)
    mixture's first draw; then ``pool`` holds every usable example once and ``draw`` picks each epoch
    from it. ``conversations``: those of ``examples`` (each once)."""

    examples: list[Example]
    report: PrepareReport
    template: ChatTemplate | None
    tokenizer: object
    conversations: list[Conversation]
    added_tokens: list[str] = field(default_factory=list)  # special tokens the template needed
    mixture: Mixture | None = None  # ``data`` was a list of sources
    pool: list[Example] | None = None  # a sampled mixture: every usable example of every source once
    draw: EpochDraw | None = None  # a sampled mixture: each epoch's examples, as indices into ``pool``

    @property
    def usable(self) -> list[Example]:
        """Every example once: the pool of a sampled mixture, else ``examples``."""
        return self.examples if self.pool is None else self.pool


def setup_template(cfg: Config, tokenizer) -> tuple[ChatTemplate, list[str]]:
    """Resolve the template; add special tokens a built-in template needs and the tokenizer lacks.

    Added tokens get new embedding rows: the training code resizes the model (and trains them).
    """
    template = resolve_template(cfg.template, tokenizer, template_kwargs(cfg))
    added: list[str] = []
    if template.name != "tokenizer":
        added = missing_tokens(template, tokenizer)
        if added:
            tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    return template, added


def template_kwargs(cfg: Config) -> dict:
    """The chat template's extra variables: ``chat_template_kwargs``, plus ``enable_thinking=False``
    under ``reasoning: drop`` (unless set there)."""
    kwargs = dict(cfg.chat_template_kwargs or {})
    if cfg.reasoning == "drop":
        kwargs.setdefault("enable_thinking", False)
    return kwargs


def labeler_for(cfg: Config, tokenizer, template: ChatTemplate | None) -> Labeler:
    return Labeler(tokenizer, template, masking=cfg.masking, max_seq_length=cfg.max_seq_length,
                   truncation=cfg.truncation, reasoning=cfg.reasoning)


def prepare(cfg: Config, tokenizer=None, *, data: str | list | None = None, key: str = "data") -> Prepared:
    """Tokenize and label ``data`` (default ``cfg.data``) for ``cfg.model``'s tokenizer.

    A list of sources is read whole (:func:`sftlab.data.mixture.load_mixture`) and tokenized once;
    with weights or counts, ``examples`` is the first epoch's draw (``draw`` gives every epoch). The
    report describes the tokenization of every source, and per source one epoch. ``key`` names the
    config key in error messages.
    """
    path = data or cfg.data
    if not path:
        raise SftlabError("no training data given", hint="pass --data FILE or set `data:` in the config")
    mix = None
    if is_mixture(path):  # a bad source fails before any model is loaded
        with paused_gc():
            mix = load_mixture(path, cfg.format, system_prompt=cfg.system_prompt, seed=cfg.seed, key=key)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    with paused_gc():
        convs = mix.conversations if mix else load_conversations(
            path, cfg.format, system_prompt=cfg.system_prompt, split="eval" if key == "eval_data" else "train")
    template, added = (None, [])
    if any(not c.is_text for c in convs):
        template, added = setup_template(cfg, tokenizer)
    examples, report = labeler_for(cfg, tokenizer, template).encode(convs)
    if not examples:
        raise SftlabError(f"{', '.join(source_paths(path))}: no example is left to train on ({report.summary()})",
                          hint="raise max_seq_length or check the masking strategy")
    if not any(e.weight for e in examples):  # every loss term multiplied by 0: steps that learn nothing
        raise SftlabError(f"{', '.join(source_paths(path))}: every example has weight 0: training would learn nothing",
                          hint="give the examples a weight > 0 (1 when none is given)")
    pool = draw = None
    if mix is not None:
        draw = mix.epochs(examples, report.dropped)
        if draw is not None:
            pool, examples = examples, [examples[j] for j in draw.indices(0)]
            convs = [mix.conversations[i] for i in dict.fromkeys(e.index for e in examples)]
        report.sources = mix.stats(pool if pool is not None else examples, examples)
    return Prepared(examples, report, template, tokenizer, convs, added, mix, pool, draw)


def source_lines(report: PrepareReport) -> list[str]:
    """One line per source of a mixture, of one epoch: examples (share), what they are drawn from, tokens."""
    return [f"  {s['name']}: {s['examples']} examples per epoch ({s['share']:.1%}), "
            + (f"drawn afresh each epoch from its {s['usable']} usable examples ({s['size']} conversations); "
               f"first epoch: {s['tokens']} tokens, {s['trained_tokens']} trained" if s.get("redrawn") else
               f"all its usable examples ({s['size']} conversations); {s['tokens']} tokens, {s['trained_tokens']} trained")
            for s in report.sources]


def input_paths(cfg: Config) -> list[tuple[str, Path]]:
    """(config key, path) of every data file or folder ``cfg`` reads: data, eval_data, replay_data, each
    source of a mixture."""
    return [(key, Path(p)) for key in ("data", "eval_data", "replay_data") for p in source_paths(getattr(cfg, key))]


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)  # a hard link
    except OSError:
        return False


def refuse_input_as_output(cfg: Config, out: str | Path, flag: str, *, config_file: str | Path | None = None) -> None:
    """SftlabError when the output file ``out`` (given as ``flag``) is one of the inputs, or lies in an input
    data folder: writing it would overwrite the data (or the config file) it is made from."""
    target = Path(out).expanduser()
    names = {"data": "the training data", "eval_data": "the eval data", "replay_data": "the replay data"}
    inputs = [(f"{names[key]} (config key '{key}')", src) for key, src in input_paths(cfg)]
    inputs += [("the config file", Path(config_file))] if config_file else []
    for what, src in inputs:
        if _same_file(target, src):
            raise SftlabError(f"{flag} {out} is {what}: writing it would overwrite that input",
                              hint=f"{flag} another file, e.g. {flag} {target.with_name(target.stem + '.prepared.jsonl')}")
        if src.is_dir() and target.resolve().is_relative_to(src.resolve()):
            raise SftlabError(f"{flag} {out} is inside {src}, {what}: it would become one of its data files",
                              hint=f"{flag} a file outside that folder")


def dump_rows(prepared: Prepared):
    for ex in prepared.examples:
        # turn: the assistant turn a per-turn example trains (a chat split into one example per turn), else null
        yield {"index": ex.index, "source": ex.where, "turn": ex.turn or None, "input_ids": ex.input_ids,
               "labels": ex.labels, "weight": ex.weight}


@contextlib.contextmanager
def _no_datasets_bars():
    """datasets' progress bars off while sftlab saves ("Saving the dataset (1/1 shards)": noise in its output),
    then as they were: a caller's own datasets calls keep theirs."""
    import datasets  # deferred: heavy library, imported on first use

    if datasets.are_progress_bars_disabled():
        yield
        return
    with warnings.catch_warnings():  # HF_DATASETS_DISABLE_PROGRESS_BARS=0 keeps them on: datasets warns, we don't
        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            datasets.enable_progress_bars()


OUT_FILES = ["dataset", "report.json", "chat_template.jinja"]  # what save_dataset writes


def save_dataset(prepared: Prepared, out_dir: str | Path) -> None:
    """Write the tokenized examples as an Arrow dataset plus the preparation report, atomically."""
    import datasets  # deferred: heavy library, imported on first use

    ds = datasets.Dataset.from_dict({
        "input_ids": [e.input_ids for e in prepared.examples],
        "labels": [e.labels for e in prepared.examples],
        "weight": [e.weight for e in prepared.examples],
        "index": [e.index for e in prepared.examples],
    })
    with atomic_dir(out_dir) as tmp, _no_datasets_bars():
        ds.save_to_disk(str(tmp / "dataset"))
        (tmp / "report.json").write_text(json.dumps(prepared.report.to_dict(), indent=2))
        if prepared.template is not None:
            (tmp / "chat_template.jinja").write_text(prepared.template.source)


# Reasoning as templates render it: <think>...</think>, or GPT-OSS's analysis channel.
_REASONING_SPAN = re.compile(r"<think>.*?</think>|<\|channel\|>analysis<\|message\|>.*?<\|end\|>", re.S)


def render_example(tokenizer, ex: Example, color: bool | None = None) -> str:
    """The example's text with trained tokens highlighted (green on a terminal, «…» otherwise) and
    the reasoning span within them marked (yellow on a terminal, ‹…› otherwise), also where the untrained
    prompt opened its ``<think>`` (DeepSeek-R1: the trained text is the reasoning, ``</think>``, the reply)."""
    if color is None:
        color = sys.stdout.isatty()
    on, off = ("\x1b[42;30m", "\x1b[0m") if color else ("«", "»")
    r_on, r_off = ("\x1b[43;30m", "\x1b[42;30m") if color else ("‹", "›")

    def mark(text: str, opened: bool) -> str:
        head = ""
        close = text.find("</think>") if opened else -1
        if close >= 0 and "<think>" not in text[:close]:  # the block the prompt opened ends here
            head, text = f"{r_on}{text[:close + len('</think>')]}{r_off}", text[close + len("</think>"):]
        return head + _REASONING_SPAN.sub(lambda m: f"{r_on}{m.group(0)}{r_off}", text)

    out, run, trained, before = [], [], None, ""
    for tid, lab in zip(ex.input_ids, ex.labels):
        t = lab != IGNORE
        if trained is not None and t != trained:
            text = tokenizer.decode(run)
            out.append(f"{on}{mark(text, _opens_think(before))}{off}" if trained else text)
            before = "" if trained else text
            run = []
        run.append(tid)
        trained = t
    if run:
        text = tokenizer.decode(run)
        out.append(f"{on}{mark(text, _opens_think(before))}{off}" if trained else text)
    return "".join(out)


def _opens_think(prompt: str) -> bool:
    """The untrained text before a trained run ends inside a ``<think>`` block it opened."""
    p = prompt.rfind("<think>")
    return p >= 0 and "</think>" not in prompt[p:] and not prompt[p + len("<think>"):].strip()
