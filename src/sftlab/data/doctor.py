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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.core.findings import Finding, exit_code, format_findings
from sftlab.data.consistency import check_template_consistency
from sftlab.data.doctor_checks import (
    _GENERIC_MARKER,
    CHECKS,
    NEAR_JACCARD,
    TEMPLATE_MARKERS,
    _add,
    _body,
    _duplicates,
    _empty_user,
    _eval_overlap,
    _MinHash,
    _n,
    _text_checks,
)
from sftlab.data.doctor_lengths import (
    _length_stats,
    _nothing_left,
    _text_lengths,
    _token_checks,
    policy_words,
)
from sftlab.data.doctor_read import _File, _load_sources
from sftlab.data.doctor_tools import (
    message_text,
    reasoning_checks,
    template_tool_check,
    tool_checks,
)
from sftlab.data.load import split_of
from sftlab.data.masking import IGNORE, MASKING, REASONING, TRUNCATION, Labeler
from sftlab.data.mixture import Source
from sftlab.data.prepare import template_kwargs
from sftlab.data.templates import (
    BUILTIN,
    missing_tokens,
    resolve_template,
    template_names,
)
from sftlab.data.types import Conversation


@dataclass
class DoctorResult:
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return exit_code(self.findings)

    def to_dict(self) -> dict:
        return {"findings": [f.to_dict() for f in self.findings], "stats": self.stats, "exit_code": self.exit_code}

    def format_text(self, limit: int = 20) -> str:
        """The human report: findings grouped by check with counts (``limit`` lines each), stats, histogram."""
        s, out = self.stats, []
        out.append(f"data: {s['data']} ({s['format']} format; {s['examples']} of {s['records']} records usable)")
        out += _files_lines(s.get("files"))
        if s.get("run"):
            out.append(f"  as the run trains it: model {s['run']['model']}, template {s['run']['template']}")
        if s.get("sources"):
            out.append("per source:")
            out += [f"  {line}" for line in _source_lines(s["sources"])]
        if s.get("eval"):
            e = s["eval"]
            out.append(f"eval: {e['data']} ({e['format']} format; {e['examples']} of {e['records']} records usable)")
            out += _files_lines(e.get("files"))
        if self.findings:
            order = {c: i for i, c in enumerate(CHECKS)}
            by_check = sorted(self.findings, key=lambda f: order[f.rule])
            out.append("\n" + format_findings(by_check, limit=limit, headings={c: h for c, (_, h) in CHECKS.items()}))
        out.append("\nstats")
        out += [f"  {line}" for line in _stats_lines(s)]
        length = s.get("length")
        if length:
            out.append(f"\nexample length ({length['unit']})")
            out += [f"  {line}" for line in _histogram_lines(length["histogram"])]
        n = Counter(f.severity for f in self.findings)
        verdict = f"{_n(n['error'], 'error')}, {_n(n['warning'], 'warning')}" if n["error"] or n["warning"] else "clean"
        verdict += f" ({_n(n['info'], 'note')})" if n["info"] else ""
        out.append(f"\nverdict: {verdict} (exit {self.exit_code})")
        return "\n".join(out)


def run_doctor(data: str | Path | list, *, eval_data: str | Path | list | None = None, fmt: str | None = None,
               tokenizer=None, template: str | None = None, max_seq_length: int | None = 2048,
               length_tokenizer=None, length_tokenizer_name: str = "", truncation: str = "cut_turns",
               masking: str = "all_assistant", reasoning: str = "per_turn", template_kwargs: dict | None = None,
               system_prompt: str | None = None) -> DoctorResult:
    """Check ``data`` (and its overlap with ``eval_data``); token checks need ``tokenizer``.

    ``data`` may be a list of sources (paths or ``{path, format, weight | count, name}``, as in the
    config): every file is checked, duplicates are found across them, and ``stats["sources"]`` has
    one row per source (records, usable examples, format; with a tokenizer, tokens and trained tokens).
    Without ``tokenizer``, ``length_tokenizer`` (the CLI passes the default model's, named
    ``length_tokenizer_name``) measures each example's message text (with its tool calls and the
    reasoning training keeps) in tokens, no template applied,
    so ``max_seq_length`` is still checked; without either, lengths are characters and unchecked.
    Lengths are the examples' whole lengths; an example over ``max_seq_length`` is reported with what
    training does to it under ``truncation`` (as prepare: cut earlier turns, cut at the limit, or drop)
    and the trained tokens it loses.

    ``template`` is a built-in name, "tokenizer" or a .jinja file (default: the tokenizer's own).
    ``masking``, ``reasoning``, ``template_kwargs`` and ``system_prompt`` are the run's (see
    :func:`run_doctor_config`): trained tokens are counted as that run's prepare labels them.
    Raises SftlabError for a missing file, unknown format, unknown template; problems in the data
    itself become findings.
    """
    if max_seq_length is not None and max_seq_length < 8:  # training's limit (config and the labeler)
        raise SftlabError(f"max_seq_length {max_seq_length} is too small", hint="use at least 8 tokens")
    for key, value, allowed in (("truncation", truncation, TRUNCATION), ("masking", masking, MASKING),
                                ("reasoning", reasoning, REASONING)):
        if value not in allowed:
            raise SftlabError(f"unknown {key} '{value}'", hint=f"use one of: {', '.join(allowed)}")
    if template and tokenizer is None:
        _check_template_name(template)
    res = DoctorResult()
    train, parts = _load_sources(data, fmt, res.findings, "data", system_prompt)
    evl, eparts = _load_sources(eval_data, fmt, res.findings, "eval_data", system_prompt) if eval_data else (None, [])
    kwargs = {**({"enable_thinking": False} if reasoning == "drop" else {}), **(template_kwargs or {})}  # prepare's
    tok, tpl, added = _setup_tokenizer(tokenizer, template, train.convs + (evl.convs if evl else []), kwargs)
    rule = {"masking": masking, "reasoning": reasoning}  # the run's label settings: every Labeler here gets them
    # without a model, the default model's tokenizer (which measures lengths) is the one prepare would use
    special_tok = tok if tok is not None else length_tokenizer
    specials = _special_tokens(special_tok) if special_tok is not None else set()
    markers = sorted(set(TEMPLATE_MARKERS) | specials, key=len, reverse=True)
    marker_re = re.compile("|".join(map(re.escape, markers)) + "|" + _GENERIC_MARKER)
    n_turns = n_reasoning = 0
    for conv in train.convs + (evl.convs if evl else []):
        _text_checks(conv, marker_re, specials, res.findings)
        _empty_user(conv, res.findings)
        tool_checks(conv, res.findings)
        turns, with_reasoning = reasoning_checks(conv, res.findings)
        n_turns, n_reasoning = n_turns + turns, n_reasoning + with_reasoning
    mh = _MinHash()
    bodies = mh.index([_body(c) for c in train.convs])
    stats = {"data": train.path, "format": train.fmt, "records": train.records, "examples": len(train.convs),
             "files": train.files}
    stats["duplicates"] = _duplicates(train.convs, bodies, res.findings)
    if train.convs and not any(c.weight for c in train.convs):  # prepare refuses it: the loss would be 0 throughout
        res.findings.append(Finding("nothing_left", "error", "every example has weight 0: training would learn nothing",
                                    where=train.path, fixes=["give the examples a weight > 0 (1 when none is given)"],
                                    data={"file": train.path, "line": 0}))
    stats["tools"] = _tool_stats(train.convs + (evl.convs if evl else []), n_turns, n_reasoning)
    stats["eval"] = None
    if evl:
        # duplicates inside the eval data weigh that item twice in every eval metric
        eval_dups = _duplicates(evl.convs, mh.index([_body(c) for c in evl.convs]), res.findings)
        stats["eval"] = {"data": evl.path, "format": evl.fmt, "records": evl.records, "examples": len(evl.convs),
                         "files": evl.files, "duplicates": eval_dups,
                         **_eval_overlap(train.convs, evl.convs, mh, bodies, res.findings)}
    left_out: list[Finding] = []  # sources training leaves empty: said only when the whole data is not (prepare's order)
    if parts:
        sampled = any(s.weight is not None or s.count is not None for s, _ in parts)  # prepare draws each epoch
        stats["sources"] = [_source_stats(src, f, tok, tpl, max_seq_length, rule, truncation if sampled else None,
                                          left_out) for src, f in parts]
    if tok is not None:
        stats.update(_token_checks(train.convs, tok, tpl, max_seq_length, res.findings, truncation, rule))
        stats.update(rule)
        _nothing_left(stats["max_seq_length"], len(train.convs), train.path, res.findings)
        res.findings += left_out if not any(f.rule == "nothing_left" for f in res.findings) else []
        stats["added_tokens"] = added
        _consistency(train.convs, tpl, res.findings, reasoning)
        template_tool_check(train.convs, tpl, res.findings)
    elif length_tokenizer is not None:
        stats.update(_text_lengths(train.convs, length_tokenizer, length_tokenizer_name, max_seq_length, res.findings,
                                   truncation, reasoning))
        _nothing_left(stats["max_seq_length"], len(train.convs), train.path, res.findings)
    else:
        chars = [len(c.text) if c.is_text else len(message_text(c, reasoning)) for c in train.convs]
        stats["length"] = _length_stats(chars, "characters")
        stats["trained_tokens"] = stats["max_seq_length"] = None
        stats["note"] = "lengths are characters of message text; pass a model for token lengths and trained tokens"
    order = {c: i for i, c in enumerate(CHECKS)}
    eval_paths = {Path(f.path) for _, f in eparts} or ({Path(evl.path)} if evl else set())
    in_eval = lambda f: bool(eval_paths & {Path(f.data["file"]), *Path(f.data["file"]).parents})  # noqa: E731
    # what stops training comes first (nothing_left), then by file and line
    res.findings.sort(key=lambda f: (in_eval(f), f.rule != "nothing_left", f.data["file"], f.data["line"], order[f.rule]))
    stats["findings"] = dict(Counter(f.severity for f in res.findings))
    stats["checks"] = dict(Counter(f.rule for f in res.findings))
    res.stats = stats
    return res


def run_doctor_config(cfg: Config, tokenizer, *, eval_data: str | Path | list | None = None) -> DoctorResult:
    """Check ``cfg.data`` as that run trains it: its sources (and weights), format, system prompt,
    template (and ``chat_template_kwargs``), max_seq_length, truncation, masking and reasoning, with
    ``tokenizer`` (``cfg.model``'s); ``eval_data`` (default ``cfg.eval_data``) for overlap."""
    if not cfg.data:
        raise SftlabError("the config names no training data", hint="set `data:` in the config, or pass DATA")
    res = run_doctor(cfg.data, eval_data=eval_data or cfg.eval_data, fmt=cfg.format, tokenizer=tokenizer,
                     template=cfg.template, max_seq_length=cfg.max_seq_length, truncation=cfg.truncation,
                     masking=cfg.masking, reasoning=cfg.reasoning, template_kwargs=template_kwargs(cfg),
                     system_prompt=cfg.system_prompt)
    res.stats["run"] = {"model": cfg.model, "template": cfg.template or "the tokenizer's own"}
    return res


def _tool_stats(convs: list[Conversation], n_turns: int, n_reasoning: int) -> dict:
    """How many examples offer tools or call them, and the share of assistant turns with reasoning."""
    calls = sum(len(m.tool_calls or ()) for c in convs for m in c.messages)
    return {"examples_with_tools": sum(1 for c in convs if c.tools), "tool_calls": calls,
            "tool_results": sum(1 for c in convs for m in c.messages if m.role == "tool"),
            "assistant_turns": n_turns, "turns_with_reasoning": n_reasoning,
            "reasoning_share": round(n_reasoning / n_turns, 4) if n_turns else 0.0}


def _consistency(convs: list[Conversation], tpl, findings: list[Finding], reasoning: str = "per_turn",
                 sample: int = 32) -> None:
    """Each reply must follow its inference prompt as prepare trains it (see check_template_consistency)."""
    if tpl is None:
        return

    # a conversation the template cannot render at all is already a "template" error: not again here
    failed = {(f.data["file"], f.data["line"]) for f in findings if f.rule == "template"}
    chats = [c for c in convs if not c.is_text and (c.source, c.line) not in failed][:sample]
    for c, problem in zip(chats, (check_template_consistency(tpl, [c], reasoning) for c in chats)):
        if problem:  # the finding names the file and line: not again in its text
            text = problem[0].removeprefix(f"{c.where()}, ").removeprefix(f"{c.where()}: ")
            _add(findings, "template_consistency", c.source, c.line, text)

def _source_stats(src: Source, f: _File, tok, tpl, max_len: int | None, rule: dict, truncation: str | None,
                  findings: list[Finding]) -> dict:
    """One row of the per-source table; tokens and trained tokens (as training labels them) need ``tok``.
    ``truncation`` (of a weighted or counted mixture, which draws from each source every epoch): a source
    that training leaves without an example is an error, as prepare refuses it."""
    row = {"name": src.name, "path": src.path, "format": f.fmt, "weight": src.weight, "count": src.count,
           "records": f.records, "examples": len(f.convs), "tokens": None, "trained_tokens": None, "too_long": None}
    if tok is None or not f.convs:
        return row
    try:  # the whole-data token checks already turned any problem into findings: only the sums here
        examples, rep = Labeler(tok, tpl, **rule).encode(f.convs)
    except SftlabError:
        return row
    row.update(tokens=rep.n_tokens, trained_tokens=rep.n_trained_tokens,
               too_long=sum(len(e.input_ids) > max_len and any(x != IGNORE for x in e.labels[max_len:])
                            for e in examples) if max_len else None)  # as the whole-data count: a cut untrained tail is free
    if truncation and f.convs and (not examples or row["too_long"] == len(examples)):  # else some example fits whole
        kept = examples and Labeler(tok, tpl, max_seq_length=max_len, truncation=truncation, **rule).encode(f.convs)[0]
        if not kept:
            need = min((len(e.labels) - next(i for i, x in enumerate(reversed(e.labels)) if x != IGNORE) for e in examples),
                       default=None)
            why = f"each over max_seq_length {max_len} (truncation: {truncation})" if examples else "each with no trained token"
            findings.append(Finding(
                "nothing_left", "error", f"source '{src.name}': training leaves no example of its {_n(len(f.convs), 'conversation')}, "
                f"{why}; a weighted or counted source must keep one, so prepare stops", where=src.path,
                fixes=[f"raise max_seq_length to {need} (its shortest example then fits)"] * bool(need) + ["or leave the source out"],
                data={"file": src.path, "line": 0}))
    return row


def _files_lines(files: dict | None, limit: int = 5) -> list[str]:
    """For a folder of data files: which files were read, and which were skipped as other splits."""
    if not files:
        return []
    names = lambda fs: ", ".join(fs[:limit]) + (f" and {len(fs) - limit} more" if len(fs) > limit else "")  # noqa: E731
    line = f"  read {len(files['read'])} file{'s' * (len(files['read']) != 1)}: {names(files['read'])}"
    if files["skipped"]:
        line += f"; skipped (not the {split_of(files['read'][0])} split): {names(files['skipped'])}"
    return [line]


def _source_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        share = f", weight {r['weight']:g}" if r.get("weight") else f", count {r['count']}" if r.get("count") else ""
        line = f"{r['name']} ({r['format']}): {r['examples']} of {r['records']} records usable{share}"
        if r.get("tokens") is not None:
            line += f"; {r['tokens']} tokens, {r['trained_tokens']} trained"
            if r.get("too_long"):
                line += f", {r['too_long']} over max_seq_length"
        out.append(line)
    return out


def _check_template_name(name: str) -> None:
    if name in BUILTIN or name in ("auto", "tokenizer", "model") or Path(name).is_file():
        return
    raise SftlabError(f"unknown template '{name}'",
                      hint=f"use one of: {', '.join(template_names())}, 'tokenizer', or a .jinja file")


def _setup_tokenizer(tokenizer, template: str | None, convs: list[Conversation], kwargs: dict | None = None):
    """The tokenizer and template training would use, with the tokens a built-in template adds."""
    if tokenizer is None:
        return None, None, []
    if not template and all(c.is_text for c in convs):
        return tokenizer, None, []
    tpl = resolve_template(template, tokenizer, kwargs)
    added = missing_tokens(tpl, tokenizer) if tpl.name != "tokenizer" else []
    if added:  # as prepare.setup_template does; on a copy, so the caller's tokenizer stays as it was
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    return tokenizer, tpl, added


def _special_tokens(tok) -> set[str]:
    """Strings a fast tokenizer turns into one control token wherever they appear in text."""
    added = [str(t) for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return {s for s in [*tok.all_special_tokens, *added] if s}

# --- the report ---------------------------------------------------------------------------------
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
        how = f" (masking: {s['masking']}, reasoning: {s['reasoning']})" if s.get("masking") else ""
        out.append(f"trained tokens{how}: {t['total']} ({t['share']:.1%} of all tokens); per example mean {t['mean']}, "
                   f"min {t['min']}, max {t['max']}")
    if s.get("max_seq_length"):
        m = s["max_seq_length"]
        line = f"over max_seq_length {m['limit']}: {_n(m['too_long'], 'example')} ({m['too_long_share']:.1%})"
        if m["too_long"] and m.get("dropped") is not None:  # what training (truncation: ...) does with them
            done = [f"{m['turns_cut']} get earlier turns cut", f"{m['truncated']} cut at the limit", f"{m['dropped']} dropped"]
            line += (f"; training (truncation: {m['truncation']}): {', '.join(d for d in done if not d.startswith('0 '))}, "
                     f"losing {m['lost_trained_tokens']} trained tokens ({m['lost_trained_share']:.1%})")
        elif m["too_long"]:
            line += f"; training (truncation: {m['truncation']}) {policy_words(m['truncation'], s.get('format') == 'text', True)}"
        out.append(line)
    if s.get("added_tokens"):
        out.append(f"template tokens the tokenizer lacks (training adds them): {', '.join(s['added_tokens'])}")
    t = s.get("tools")
    if t and (t["examples_with_tools"] or t["tool_calls"] or t["turns_with_reasoning"]):
        n = t["examples_with_tools"]
        out.append(f"tools: {_n(n, 'example')} offer{'s' * (n == 1)} tools; {_n(t['tool_calls'], 'call')}, "
                   f"{_n(t['tool_results'], 'tool result')}; reasoning in {t['turns_with_reasoning']} of "
                   f"{t['assistant_turns']} assistant turns ({t['reasoning_share']:.1%})")
    d = s["duplicates"]
    out.append(f"duplicates: {d['exact']} exact, {d['near']} near")
    if s.get("eval"):
        e = s["eval"]
        out.append(f"eval overlap: {e['exact_overlap']} exact, {e['near_overlap']} near; duplicates inside eval: "
                   f"{e['duplicates']['exact']} exact, {e['duplicates']['near']} near")
    if s.get("note"):
        out.append(f"note: {s['note']}")
    return out

# The checks live in sftlab.data.doctor_checks (+ doctor_lengths, doctor_read, doctor_tools); their public names
# stay importable from here.
__all__ = ["CHECKS", "NEAR_JACCARD", "TEMPLATE_MARKERS", "DoctorResult", "Finding", "run_doctor", "run_doctor_config"]
