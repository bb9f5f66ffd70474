"""The data doctor's length checks: token lengths and trained tokens as training labels them, what
training's ``truncation`` does to an example over ``max_seq_length`` (cut earlier turns, cut at the
limit, drop) and the trained tokens it loses, message-text lengths when no model is given, "no example
is left to train on", and the length statistics with their histogram.

Each check appends :class:`sftlab.core.findings.Finding` objects to a list, as the other doctor checks do.
"""

from __future__ import annotations

from collections import Counter

from sftlab.core.errors import SftlabError
from sftlab.core.findings import Finding
from sftlab.data.doctor_checks import _add, _n
from sftlab.data.doctor_tools import message_text
from sftlab.data.masking import IGNORE, Labeler
from sftlab.data.turns import reasoning_lost_warning
from sftlab.data.types import Conversation


def _token_checks(convs: list[Conversation], tok, tpl, max_len: int | None, findings: list[Finding],
                  truncation: str = "cut_turns", rule: dict | None = None) -> dict:
    """Tokenize as training does (the run's ``rule``: masking and reasoning; a chat split per turn is several
    examples, as prepare counts them); lengths (before any cut), trained tokens, and what training's
    ``truncation`` policy does to examples over the limit. Findings name the conversation."""
    rule = rule or {}
    labeler = Labeler(tok, tpl, **rule)
    exs, kept, errors = [], [], []
    for _ in range(2):  # twice only if a sampled check rejected the skeletons: then all exactly
        exs, kept, errors = [], [], []
        for c in convs:
            try:
                exs.append(labeler.examples(c))
                kept.append(c)
            except SftlabError as exc:  # its hint is the finding's fix
                msg = str(exc).removeprefix(f"{c.where()}: ")
                errors.append((c, msg.removesuffix(f" ({exc.hint})") if exc.hint else msg, exc.hint))
        if not labeler.skeletons_failed:
            break
    for c, msg, fix in errors:
        _add(findings, "template", c.source, c.line, msg, fix=fix)
    lost = [(c, ex.reasoning_lost) for c, ex in zip(kept, exs) if getattr(ex, "reasoning_lost", 0)]
    if warn := reasoning_lost_warning(sum(n for _, n in lost), rule.get("reasoning", "per_turn"), rule.get("masking", "")):
        _add(findings, "reasoning_lost", lost[0][0].source, lost[0][0].line,  # once per run, at its first such chat
             f"{warn[0]} (this chat and {len(lost) - 1} more)" if len(lost) > 1 else warn[0], fix=warn[1])
    encoded = iter(labeler.encode_segments([segs for ex in exs for segs in ex],
                                           [bool(getattr(ex, "split", False)) and len(ex) > 1 for ex in exs for _ in ex]))
    lengths, trained = [], []
    policy, cut, need = None, Counter(), []  # the labeler with training's length policy, made for the first long example
    for c, ex in zip(kept, exs):
        per = [next(encoded) for _ in ex]  # (ids, labels) of each of the conversation's examples
        n_trs = [len(labels) - labels.count(IGNORE) for _, labels in per]
        lengths += [len(ids) for ids, _ in per]
        trained += n_trs
        if 0 in n_trs:
            which = "" if len(per) == 1 else f" (its example for assistant turn {n_trs.index(0) + 1} of {len(per)})"
            _add(findings, "no_trained", c.source, c.line, f"no token of this example is trained{which}")
            continue
        # over the limit as training sees it: an untrained tail past the limit (a "\n" after <|im_end|>) is cut freely
        long = [ids for ids, labels in per if max_len is not None and len(ids) > max_len
                and any(x != IGNORE for x in labels[max_len:])]
        if long:
            policy = policy or Labeler(tok, tpl, max_seq_length=max_len, truncation=truncation, **rule)
            _length_policy(c, policy, len(long), max(map(len, long)), sum(n_trs), cut, findings)
            # the limit that keeps this example whole (its last trained token), and the one truncating keeps it at
            need += [(len(lb) - next(i for i, x in enumerate(reversed(lb)) if x != IGNORE),
                      next(i for i, x in enumerate(lb) if x != IGNORE) + 1) for _, lb in per if len(lb) > max_len]
    total, total_tr = sum(lengths), sum(trained)
    out = {"length": _length_stats(lengths, "tokens"), "trained_tokens": None, "max_seq_length": None}
    if trained:
        out["trained_tokens"] = {"total": total_tr, "mean": round(total_tr / len(trained), 2), "min": min(trained),
                                 "max": max(trained), "share": round(total_tr / total, 4) if total else 0.0}
    if max_len is not None:
        out["max_seq_length"] = {"limit": max_len, "truncation": truncation, "too_long": cut["long"],
                                 "too_long_share": round(cut["long"] / len(lengths), 4) if lengths else 0.0,
                                 "turns_cut": cut["turns_cut"], "truncated": cut["truncated"], "dropped": cut["dropped"],
                                 "lost_trained_tokens": cut["lost"],
                                 "lost_trained_share": round(cut["lost"] / total_tr, 4) if total_tr else 0.0,
                                 "kept": len(lengths) - trained.count(0) - cut["dropped"],
                                 "keeps_one_whole": min((a for a, _ in need), default=None),
                                 "truncate_keeps_one": min((b for _, b in need), default=None)}
    return out


def _length_policy(c: Conversation, policy: Labeler, n_long: int, size: int, n_tr: int, cut: Counter,
                   findings: list[Finding]) -> None:
    """Label ``c`` as prepare does, under max_seq_length and the truncation policy: count what is cut,
    dropped and lost in ``cut``, and say so in a "too_long" finding (and "no_trained" when truncating
    at the limit leaves nothing trained)."""
    examples, rep = policy.encode([c])
    lost = n_tr - sum(e.n_trained for e in examples)
    dropped = rep.n_dropped_too_long + rep.n_dropped_no_trained  # cut at the limit to nothing trained: dropped
    truncated = rep.n_truncated - rep.n_dropped_no_trained
    cut.update(long=n_long, turns_cut=rep.n_turns_cut, truncated=truncated, dropped=dropped, lost=lost)
    n_ex = rep.n_kept + dropped
    of = (lambda k: "it" if n_ex == 1 else f"{k} of its {n_ex} examples")  # noqa: E731
    done = [f"cuts earlier turns of {of(rep.n_turns_cut)} to fit" if rep.n_turns_cut else "",
            f"cuts {of(truncated)} at the limit" if truncated else "",
            f"drops {of(dropped)}" if dropped else ""]
    what = " and ".join(d for d in done if d) or "fits it"
    limit = policy.max_len
    _add(findings, "too_long", c.source, c.line,
         f"{size} tokens > max_seq_length {limit}; training (truncation: {policy.truncation}) {what}, losing "
         f"{lost} of its {n_tr} trained tokens ({lost / n_tr:.0%})",
         fix="raise max_seq_length, or shorten or split the example")
    if rep.n_dropped_no_trained:
        _add(findings, "no_trained", c.source, c.line,
             f"all its trained tokens lie past max_seq_length {limit}; cut there it trains on nothing (dropped)")


def policy_words(truncation: str, is_text: bool, plural: bool = False, user_turns: int = 2) -> str:
    """What training does to an example (``plural``: to examples) over max_seq_length under ``truncation``
    (plain text: cut at the limit; a chat of one exchange has no earlier turn to cut)."""
    it, its = ("them", "their") if plural else ("it", "its")
    if truncation == "truncate" or is_text and truncation == "cut_turns":
        return f"cuts {it} at the limit"
    if truncation == "drop":
        return f"drops {it}"
    if user_turns < 2:
        return f"drops {it} (no earlier turn to cut)"
    return f"cuts {its} earliest turns to fit, or drops {it} when that is not enough"


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


def _nothing_left(m: dict | None, n: int, path: str, findings: list[Finding]) -> None:
    """prepare's "no example is left to train on" as one error, with the limit (or policy) that keeps one."""
    refused = {(f.data["file"], f.data["line"]) for f in findings if f.rule == "template"}
    if not m or not n or m.get("kept") != 0 or len(refused) >= n:  # each a "template" error: prepare stops on that
        return
    fixes = []
    if m.get("keeps_one_whole"):
        fixes.append(f"raise max_seq_length to {m['keeps_one_whole']} (the shortest example then fits with all its "
                     "trained tokens)")
    elif m.get("shortest"):
        fixes.append(f"raise max_seq_length above {m['shortest']} (the shortest example's message text alone; "
                     "pass --model for exact lengths)")
    over = m["dropped"] or m["dropped"] is None  # None: measured without the template (only drops are counted)
    if over and m["truncation"] != "truncate" and (m.get("truncate_keeps_one") or m["limit"] + 1) <= m["limit"]:
        fixes.append(f"or set truncation: truncate (keeps each example's first {m['limit']} tokens)")
    why = f"each over max_seq_length {m['limit']} (truncation: {m['truncation']})" if over else "each with no trained token"
    findings.append(Finding("nothing_left", "error", f"training would drop every example of the {_n(n, 'conversation')}, "
                            f"{why}; prepare stops with 'no example is left to train on'", where=path,
                            fixes=fixes, data={"file": path, "line": 0}))


def _text_lengths(convs: list[Conversation], tok, name: str, max_len: int | None, findings: list[Finding],
                  truncation: str = "cut_turns", reasoning: str = "per_turn") -> dict:
    """Token lengths of the message text (no template: a lower bound of the training length) by ``tok``;
    examples over ``max_len`` are flagged "too_long", with what training's ``truncation`` does to them."""
    lengths = []
    eos = tok.eos_token if isinstance(tok.eos_token, str) else ""
    for c in convs:
        # plain text is trained as it is plus the EOS (prepare's rule): that length is exact, not a lower bound
        text = c.text + eos if c.is_text else message_text(c, reasoning)  # with tool calls and kept reasoning
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        lengths.append(n)
        if max_len is not None and n > max_len:
            what = "with the EOS training appends" if c.is_text else "of message text, before the chat template"
            _add(findings, "too_long", c.source, c.line,
                 f"{n} tokens ({what}; by the {name or 'default'} tokenizer) "
                 f"> max_seq_length {max_len}; training (truncation: {truncation}) "
                 f"{policy_words(truncation, c.is_text, user_turns=sum(m.role == 'user' for m in c.messages))}",
                 fix="raise max_seq_length, or shorten or split the example")
    n_long = sum(n > max_len for n in lengths) if max_len is not None else 0
    # surely dropped (even before the template adds tokens): drop, or a chat with no earlier turn to cut
    sure = sum(max_len is not None and n > max_len and (truncation == "drop" or truncation == "cut_turns" and not c.is_text
                                                         and sum(m.role == "user" for m in c.messages) < 2)
               for c, n in zip(convs, lengths))
    return {"length": _length_stats(lengths, "tokens"), "trained_tokens": None,
            "max_seq_length": None if max_len is None else {
                "limit": max_len, "truncation": truncation, "too_long": n_long,
                "too_long_share": round(n_long / len(lengths), 4) if lengths else 0.0,
                "turns_cut": None, "truncated": None, "dropped": None, "lost_trained_tokens": None, "lost_trained_share": None,
                "kept": len(lengths) - sure if sure else None, "shortest": min(lengths, default=None),
                "keeps_one_whole": min(lengths) if lengths and all(c.is_text for c in convs) else None},  # text: exact
            "note": f"lengths are tokens of message text by the {name or 'default'} tokenizer, without a chat template; "
                    "pass --model for your model's exact lengths and trained tokens"}


