"""Before/after comparison of two eval results, and the forgetting check on general data.

An eval result is the dict :func:`sftlab.eval.evaluate` returns; its ``metrics`` mapping holds the
numbers compared here. Forgetting is the relative rise of the loss on general (non-task) data:
``(after - before) / before``; above the threshold it is flagged.
"""

from __future__ import annotations

import math

# (key in result["metrics"], label, which direction is better)
METRICS: list[tuple[str, str, str]] = [
    ("loss", "loss", "lower"),
    ("perplexity", "perplexity", "lower"),
    ("task_score", "task score", "higher"),
    ("format_adherence", "format adherence", "higher"),
    ("valid_tool_call_rate", "valid tool call", "higher"),
    ("tool_call_match_rate", "tool call match", "higher"),
    ("nonempty_rate", "non-empty rate", "higher"),
    ("finished_rate", "finished rate", "higher"),
    ("repetition_rate", "repetition rate", "lower"),
    ("mean_reply_tokens", "mean reply tokens", "neither"),
    ("general_loss", "general loss", "lower"),
]

DEFAULT_FORGETTING_THRESHOLD = 0.10


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def forgetting(before_loss: float | None, after_loss: float | None,
               threshold: float = DEFAULT_FORGETTING_THRESHOLD) -> dict | None:
    """The general-data loss before and after, its change, and whether the rise exceeds ``threshold``.

    ``threshold`` is relative (0.10 = a 10% rise). None when either loss is missing. A non-finite
    after-loss is always flagged.
    """
    if before_loss is None or after_loss is None:
        return None
    delta = after_loss - before_loss
    relative = delta / before_loss if _finite(before_loss) and before_loss > 0 else float("inf")
    flagged = (not _finite(after_loss)) or relative > threshold
    return {"before": before_loss, "after": after_loss, "delta": delta, "relative": relative,
            "threshold": threshold, "flagged": bool(flagged)}


def compare(before: dict, after: dict, *, threshold: float = DEFAULT_FORGETTING_THRESHOLD,
            before_name: str = "base", after_name: str = "fine-tuned") -> dict:
    """Side-by-side table of two eval results on the same data, with differences and forgetting."""
    bm, am = before.get("metrics", {}), after.get("metrics", {})
    rows = []
    for key, label, better in METRICS:
        b, a = bm.get(key), am.get(key)
        if b is None and a is None:
            continue
        label += _scored_by(after, key)  # both sides are scored alike: what the number is, as a single eval says
        delta = a - b if _finite(a) and _finite(b) else None
        improved = None
        if delta is not None and better != "neither" and delta != 0:
            improved = (delta < 0) if better == "lower" else (delta > 0)
        rows.append({"metric": key, "label": label, "before": b, "after": a, "delta": delta,
                     "better": better, "improved": improved})
    samples = []
    for sb, sa in zip(before.get("samples", []), after.get("samples", [])):
        row = {"where": sa.get("where"), "prompt": sa.get("prompt"), "reference": sa.get("reference"),
               "before": sb.get("reply"), "after": sa.get("reply"),
               "before_score": sb.get("score"), "after_score": sa.get("score")}
        for side, s in (("before", sb), ("after", sa)):  # a reply that reasons: the answer it was scored on
            if s.get("reasoning") is not None:
                row.update({f"{side}_answer": s.get("answer"), f"{side}_reasoning": s["reasoning"]})
            if s.get("tool_call"):  # a reply that should call a tool: its call, judged
                row[f"{side}_call"] = s["tool_call"]
        samples.append(row)
    return {"before_name": before_name, "after_name": after_name, "before": before, "after": after,
            "table": rows, "samples": samples,
            "forgetting": forgetting(bm.get("general_loss"), am.get("general_loss"), threshold)}


def _scored_by(result: dict, key: str) -> str:
    """" (scorer)" after the task score's label, " (check)" after format adherence's; else ""."""
    by = {"task_score": result.get("task_score_by") or result.get("scorer"),
          "format_adherence": result.get("format_check")}.get(key)
    return f" ({by})" if by else ""


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4g}" if abs(x) >= 1000 else f"{x:.3f}"
    return str(x)


def format_forgetting(f: dict | None) -> str | None:
    if f is None:
        return None
    rel = f["relative"]
    change = f"{rel:+.1%}" if _finite(rel) else "n/a"
    if f["flagged"]:
        verdict = f"FORGETTING: a rise above the {f['threshold']:.0%} threshold"
    elif _finite(rel) and rel < 0:
        verdict = "improved: no forgetting"
    elif _finite(rel) and rel == 0:
        verdict = "unchanged: no forgetting"
    else:
        verdict = f"a rise within the {f['threshold']:.0%} threshold"
    return f"forgetting: general-data loss {_fmt(f['before'])} -> {_fmt(f['after'])} ({change}), {verdict}"


def format_comparison(cmp: dict) -> str:
    """The comparison as a plain-text table."""
    b_name, a_name = cmp["before_name"], cmp["after_name"]
    width = max([len(r["label"]) for r in cmp["table"]] + [6])
    lines = [f"{'metric':<{width}}  {b_name:>12}  {a_name:>12}  {'change':>10}"]
    for r in cmp["table"]:
        mark = {True: "  better", False: "  worse", None: ""}[r["improved"]]
        delta = "-" if r["delta"] is None else f"{r['delta']:+.3f}"
        lines.append(f"{r['label']:<{width}}  {_fmt(r['before']):>12}  {_fmt(r['after']):>12}  {delta:>10}{mark}")
    lines += filter(None, [format_forgetting(cmp.get("forgetting")), prepare_note(cmp.get("after") or {})])
    return "\n".join(lines)


def prepare_note(result: dict) -> str | None:
    """What the loss leaves out or cuts (``result["prepare"]``: examples over max_seq_length), or None when
    it scores every example whole: else the loss reads as over the whole data set."""
    p = result.get("prepare") or {}
    parts = [f"{n} {what}" for key, what in (("n_dropped_too_long", "left out of the loss (longer than max_seq_length)"),
                                             ("n_turns_cut", "had earlier turns cut to fit"),
                                             ("n_truncated", "truncated at max_seq_length"))
             if (n := p.get(key))]
    if not parts:
        return None
    return f"note: of {p.get('n_input')} examples, {', '.join(parts)} (max_seq_length: the run's, or --max-seq-length)"


def format_result(result: dict) -> str:
    """One eval result as plain text: a metric per line."""
    rows = []
    mt = result.get("metrics", {})
    for key, label, _ in METRICS:
        if key in mt:
            rows.append((label + _scored_by(result, key), _fmt(mt[key])))
    if "tokens" in mt:
        rows.append(("scored tokens", str(mt["tokens"])))
    width = max([32] + [len(label) for label, _ in rows])  # a long scorer name (exact+tool_call_match) keeps the column
    note = prepare_note(result)
    return "\n".join([f"{label:<{width}} {value}" for label, value in rows] + ([note] if note else []))


def format_eval(out: dict, samples: int = 3) -> str:
    """What ``sftlab eval`` prints: header, the metrics (or the before/after table), a few samples."""
    head = f"eval {out['target']} on {out['data']}"
    if out["kind"] == "single":
        res = out["result"]
        body = format_result(res)
        shown = [(s, [("reply:", s)]) for s in res.get("samples", [])]
    else:
        head += f" (base: {out['base']})"
        body = format_comparison(out)
        shown = [(s, [(f"{side}:", {"reply": s[side], **{k: s.get(f"{side}_{k}") for k in ("answer", "reasoning", "call")}})
                      for side in ("before", "after")]) for s in out.get("samples", [])]
    if out.get("system_prompt"):
        head += f"\nsystem prompt (where a conversation has none, as in training): {_short(out['system_prompt'])}"
    lines = [head, body]
    for s, sides in shown[:samples]:
        lines += ["", f"prompt:    {_short(s.get('prompt'))}", f"reference: {_short(s.get('reference'))}"]
        for label, r in sides:
            lines.append(f"{label:<11}{_short(_answer_first(r.get('reply'), r.get('answer'), r.get('reasoning')))}")
            call = r.get("call") or r.get("tool_call")  # a reply that should call a tool: how its call was judged
            if call:
                verdict = ("valid, the reference's call" if call.get("match") else "valid, not the reference's call") \
                    if call.get("valid") else f"invalid: {call.get('why')}"
                lines.append(f"{'':<11}(tool call {_short(verdict)})")
    return "\n".join(lines)


def _answer_first(reply, answer: str | None, reasoning: str | None) -> str:
    """A sample reply as printed: one that reasons first shows the answer it was scored on, then the start of
    its reasoning (shown whole, a long <think> block filled the line and hid the answer)."""
    if reasoning is None:
        return "" if reply is None else reply
    return f"{_short(answer) if answer and answer.strip() else '(no answer)'} [after reasoning: {_short(reasoning, 40)}]"


def _short(text, width: int = 100) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."
