"""`sftlab report RUN`: one self-contained HTML page about a run, viewable with no network.

Plots (matplotlib, Agg backend) are embedded as base64 PNG ``<img>`` tags; styles are inline; the one
script only checks that every plot image decoded and writes "plots rendered: N/N" into the page
(what the browser test looks for). Sections: summary, curves (train/eval loss, learning rate,
gradient norm, tokens per second, memory, generation metrics; the learning-rate sweep of `train --find-lr`), data (preparation report and the data
doctor's summary), before/after table and sample generations, and the diagnosis.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from pathlib import Path

from sftlab.core.errors import SftlabError
from sftlab.core.findings import format_findings
from sftlab.core.io import atomic_write_text
from sftlab.data.doctor import run_doctor, run_doctor_config
from sftlab.data.mixture import source_paths
from sftlab.diagnose import Diagnosis, RunData, diagnose_run, load_run
from sftlab.eval.compare import format_forgetting
from sftlab.report_plots import (
    before_after_figure,
    length_histogram_figure,
    lr_sweep_figure,
)

REPORT = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1a7f37}.worse{color:#cf222e}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1em}
.plots figure{margin:0}.plots img{width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-word}
.finding{border-left:4px solid #999;padding:.3em .8em;margin:.8em 0;background:#fafafa}
.finding.error{border-color:#cf222e}.finding.warning{border-color:#d4a72c}.finding.info{border-color:#0969da}
.finding pre{background:none;margin:0;padding:0}
.muted{color:#666}td.text{white-space:pre-wrap;word-break:break-word;max-width:22em}
"""

_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0 && i.naturalHeight > 0) ok++; });
  var el = document.getElementById('plot-check');
  el.textContent = 'plots rendered: ' + ok + '/' + imgs.length;
  el.setAttribute('data-ok', String(ok === imgs.length && imgs.length > 0));
});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4g}" if abs(x) >= 1000 or (x != 0 and abs(x) < 0.001) else f"{x:.4f}".rstrip("0").rstrip(".")
    return str(x)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v, s = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(s, (int, float)) and math.isfinite(v):
            xs.append(s)
            ys.append(v)
    return xs, ys


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def make_plots(run: RunData) -> list[tuple[str, str]]:
    """(title, base64 PNG) for every curve the run logged, then the length histogram and the before/after
    bars where the run folder has their data; what it lacks is left out."""
    import matplotlib  # deferred: heavy library, imported on first use

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: heavy library, imported on first use

    specs = [
        ("Loss", [(run.train, "loss", "train loss", "-"), (run.evals, "eval_loss", "eval loss", "o-"),
                  (run.evals, "general_loss", "general-data loss", "s--")], False),
        ("Learning rate", [(run.train, "learning_rate", "learning rate", "-")], False),
        ("Gradient norm", [(run.train, "grad_norm", "grad norm (before clipping)", "-")], True),
        ("Throughput (tokens/s)", [(run.train, "tokens_per_second", "all tokens", "-"),
                                   (run.train, "trained_tokens_per_second", "trained tokens", "-")], False),
        ("Memory (MB)", [(run.train, "memory_mb", "peak memory", "-")], False),
    ]
    gen_keys = sorted({k for r in run.evals for k in r if k.startswith("gen_") and k.endswith(("_rate", "_adherence", "_score"))})
    if gen_keys:
        specs.append(("Generation metrics", [(run.evals, k, k.removeprefix("gen_"), "o-") for k in gen_keys], False))
    out = []
    for title, lines, logy in specs:
        data = [(label, style, *_series(rows, key)) for rows, key, label, style in lines]
        data = [d for d in data if d[2]]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        try:
            for label, style, xs, ys in data:
                ax.plot(xs, ys, style, label=label, markersize=4)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            lo, hi = min(min(d[3]) for d in data), max(max(d[3]) for d in data)
            if logy and lo > 0 and hi / lo > 20:  # a spike would flatten everything else
                ax.set_yscale("log")
            if len(data) > 1 or title == "Loss":
                ax.legend()
            out.append((title, _png(fig)))
        finally:
            plt.close(fig)
    s = run.summary
    for made in (length_histogram_figure(plt, s.prepare if s else None, getattr(run.config, "max_seq_length", None)),
                 before_after_figure(plt, s.eval if s else None), lr_sweep_figure(plt, s.lr_sweep if s else None)):
        if made:
            try:
                out.append((made[0], _png(made[1])))
            finally:
                plt.close(made[1])
    return out


def _table(rows: list[tuple], head: tuple | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        cells = []
        for c in r:
            if isinstance(c, tuple):  # (text, css class)
                cells.append(f'<td class="{_e(c[1])}">{_e(c[0])}</td>')
            else:
                cls = ' class="num"' if isinstance(c, (int, float)) and not isinstance(c, bool) else ""
                cells.append(f"<td{cls}>{_e(_fmt(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _summary_section(run: RunData) -> str:
    s = run.summary
    cfg = run.config
    keys = ["method", "base_model", "template", "steps", "train_tokens", "trained_tokens", "time_s",
            "tokens_per_second", "peak_memory_mb", "final_train_loss", "final_eval_loss", "best_eval_loss", "stopped"]
    if s is None:
        rows = [("method", cfg.method), ("base_model", cfg.model), ("template", cfg.template)]
    else:
        rows = [(k, getattr(s, k)) for k in keys]
    div = s.divergence if s else None
    if div:
        rows.append(("divergence", f"step {div.get('step')}, loss {div.get('loss')}" if isinstance(div, dict) else div))
    for k in ("data", "eval_data", "learning_rate", "epochs", "batch_size", "gradient_accumulation", "max_seq_length"):
        rows.append((f"config: {k}", getattr(cfg, k, None)))
        if k == "epochs" and isinstance(getattr(cfg, "max_steps", None), int) and cfg.max_steps > 0:
            rows.append(("config: max_steps", cfg.max_steps))  # it ends the run before the epochs when reached
    note = "" if run.summary else '<p class="muted">No summary.json: the run did not finish.</p>'
    return "<h2>Summary</h2>" + note + _table(rows)


def _data_section(run: RunData, doctor: bool) -> str:
    out = ["<h2>Data</h2>"]
    s = run.summary
    prep = s.prepare if s else None
    if isinstance(prep, dict) and prep:
        keys = ("n_input", "n_kept", "n_dropped_too_long", "n_dropped_no_trained", "n_truncated", "n_turns_cut",
                "n_tokens", "n_trained_tokens", "eos_appended")
        out.append("<h3>Preparation</h3>" + _table([(k, prep[k]) for k in keys if k in prep]))
        sources = prep.get("sources") or []
        if sources:  # a mixture: what each source gives one epoch (tokens: the first epoch's)
            out.append("<h3>Sources (one epoch)</h3>" + _table(
                [(r.get("name"), r.get("path"), r.get("format"), r.get("weight"), r.get("size"), r.get("usable"),
                  r.get("examples"), f"{r.get('share', 0):.1%}", r.get("redrawn"), r.get("tokens"),
                  r.get("trained_tokens"))
                 for r in sources if isinstance(r, dict)],
                ("source", "path", "format", "weight", "conversations", "usable", "per epoch", "share",
                 "drawn afresh each epoch", "tokens", "trained tokens")))
        dropped = prep.get("dropped") or []
        if dropped:
            items = "".join(f"<li>{_e(d.get('where'))}: {_e(d.get('why'))}</li>" for d in dropped[:10] if isinstance(d, dict))
            more = f"<li>... and {len(dropped) - 10} more</li>" if len(dropped) > 10 else ""
            out.append(f"<ul>{items}{more}</ul>")
    if s is not None and (s.pad_equals_eos is not None or s.eos_trained is not None):
        out.append(_table([("pad token == EOS", s.pad_equals_eos), ("EOS / end-of-turn trained", s.eos_trained)]))
    out.append("<h3>Data doctor</h3>" + _doctor_text(run, doctor))
    return "".join(out)


def _doctor_text(run: RunData, doctor: bool) -> str:
    data = getattr(run.config, "data", None)
    if not doctor:
        return '<p class="muted">Not run.</p>'
    if not data or not all(Path(p).exists() for p in source_paths(data)):
        return f'<p class="muted">Training data {_e(data)} not found from here; run <code>sftlab doctor DATA</code>.</p>'

    eval_data = getattr(run.config, "eval_data", None)
    eval_ok = eval_data and all(Path(p).exists() for p in source_paths(eval_data))
    try:
        tok = _run_tokenizer(run)
        if tok is not None:  # the data as this run trained it: its template, limit, truncation, masking, reasoning
            cfg = dataclasses.replace(run.config, eval_data=eval_data if eval_ok else None)
            res = run_doctor_config(cfg, tok)
        else:
            res = run_doctor(data, eval_data=eval_data if eval_ok else None, fmt=getattr(run.config, "format", None))
    except SftlabError as exc:
        return f"<p>The data doctor could not read the data: {_e(exc)}</p>"
    return f"<pre>{_e(res.format_text(limit=5))}</pre>"


def _run_tokenizer(run: RunData):
    """The tokenizer the run saved with its model (it carries the training template), or None."""
    mdir = run.dir.model_dir
    if not (mdir / "tokenizer_config.json").is_file():
        return None
    from transformers import (
        AutoTokenizer,  # deferred: heavy library, imported on first use
    )

    try:
        return AutoTokenizer.from_pretrained(mdir, trust_remote_code=run.config.trust_remote_code)
    except (OSError, ValueError):
        return None


def _scored_by(result: dict):
    return result.get("task_score_by") or result.get("scorer")


def _eval_section(run: RunData) -> str:
    ev = run.summary.eval if run.summary else None
    single = isinstance(ev, dict) and ev.get("kind") != "compare"
    out = ["<h2>Evaluation</h2>" if single else "<h2>Before and after</h2>"]
    if not isinstance(ev, dict):
        out.append('<p class="muted">No before/after evaluation stored with this run; run '
                   "<code>sftlab eval RUN --data EVAL --compare base --save</code>.</p>")
        return "".join(out)
    if ev.get("kind") == "compare":
        rows = []
        for r in ev.get("table", []):
            cls = {True: "better", False: "worse"}.get(r.get("improved"), "")
            delta = "-" if r.get("delta") is None else f"{r['delta']:+.4f}"
            rows.append((r.get("label"), r.get("before"), r.get("after"), (delta, cls)))
        out.append(f"<p>Eval data: {_e(ev.get('data'))}; scorer: {_e(_scored_by(ev.get('after') or {}))}; "
                   f"format check: {_e((ev.get('after') or {}).get('format_check'))}</p>")
        out.append(_table(rows, ("metric", ev.get("before_name", "base"), ev.get("after_name", "fine-tuned"), "change")))
        out.append(_per_source_compare(ev))
        f = ev.get("forgetting")
        if isinstance(f, dict) and {"relative", "flagged", "threshold", "before", "after"} <= set(f):
            line = format_forgetting(f)  # the same words as `sftlab eval`
            out.append(f"<p>{_e(line[:1].upper() + line[1:])}</p>")
        samples = [(s.get("prompt"), s.get("reference"), s.get("before"), s.get("after")) for s in ev.get("samples", [])]
        head = ("prompt", "reference", ev.get("before_name", "base"), ev.get("after_name", "fine-tuned"))
    else:
        res = ev.get("result", ev)  # `sftlab eval --save` without --compare: the fine-tune alone
        out.append(f"<p>Eval data: {_e(ev.get('data'))}; scorer: {_e(_scored_by(res))}; "
                   f"format check: {_e(res.get('format_check'))} (no base model: add --compare base for before and after)</p>")
        out.append(_table([(k, v) for k, v in (res.get("metrics") or {}).items()], ("metric", "value")))
        per = [(name, r.get("n_examples"), r.get("loss"), r.get("task_score"), r.get("scorer"), r.get("format_adherence"))
               for name, r in (res.get("sources") or {}).items() if isinstance(r, dict)]
        if per:
            out.append(_table(per, ("source", "examples", "loss", "task score", "scorer", "format adherence")))
        samples = [(s.get("prompt"), s.get("reference"), s.get("reply")) for s in res.get("samples", [])]
        head = ("prompt", "reference", "reply")
    if samples:
        out.append("<h3>Sample generations</h3>")
        out.append(_table([tuple(("" if c is None else str(c), "text") for c in row) for row in samples], head))
    return "".join(out)


# (key in a source's result, column label, which direction is better)
_SOURCE_METRICS = (("loss", "loss", "lower"), ("task_score", "task score", "higher"),
                   ("format_adherence", "format adherence", "higher"), ("tool_call_match_rate", "tool call match", "higher"))


def _per_source_compare(ev: dict) -> str:
    """Before and after per eval source of a saved ``--compare`` (several --data files), as `sftlab eval`
    prints them; "" for one source."""
    before, after = ((ev.get(k) or {}).get("sources") or {} for k in ("before", "after"))
    names = [n for n, r in after.items() if isinstance(r, dict)] if isinstance(after, dict) else []
    if not names:
        return ""
    before = before if isinstance(before, dict) else {}
    keys = [k for k in _SOURCE_METRICS if any(k[0] in after[n] for n in names)]
    b_name, a_name = ev.get("before_name", "base"), ev.get("after_name", "fine-tuned")
    rows = []
    for name in names:
        a, b = after[name], before.get(name) if isinstance(before.get(name), dict) else {}
        row: list = [name, a.get("n_examples"), a.get("scorer") or "-"]
        for key, _, better in keys:
            x, y = b.get(key), a.get(key)
            ok = isinstance(x, (int, float)) and isinstance(y, (int, float)) and x != y
            cls = ("better" if (y < x) == (better == "lower") else "worse") if ok else ""
            row += [x, (_fmt(y), cls) if cls else y]
        rows.append(tuple(row))
    head = ("source", "examples", "scorer") + tuple(f"{label} ({who})" for _, label, _ in keys for who in (b_name, a_name))
    return "<h3>Per source</h3>" + _table(rows, head)


def _diagnosis_section(diag: Diagnosis) -> str:
    out = ["<h2>Diagnosis</h2>"]
    if not diag.findings:
        out.append("<p>No problems found.</p>")
    for f in diag.findings:  # the CLI's text for each finding, in a box coloured by severity
        out.append(f'<div class="finding {_e(f.severity)}"><pre>{_e(format_findings([f]))}</pre></div>')
    if diag.skipped():
        out.append('<p class="muted">Not checked: ' + _e("; ".join(diag.skipped())) + "</p>")
    return "".join(out)


def render_report(run: RunData, diag: Diagnosis, plots: list[tuple[str, str]], *, doctor: bool = True) -> str:
    """The report page as one HTML string."""
    figs = "".join(f'<figure><img class="plot" alt="{_e(t)}" src="data:image/png;base64,{b}"></figure>' for t, b in plots)
    curves = (f'<div class="plots">{figs}</div>' if plots else '<p class="muted">No metrics were logged.</p>')
    title = f"sftlab report: {run.run_dir.name}"
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=\"muted\">{_e(run.run_dir)}</p>"
        f"{_summary_section(run)}<h2>Training curves</h2>{curves}"
        f'<p id="plot-check" class="muted" data-ok="unknown">plots rendered: unknown (needs JavaScript)</p>'
        f"{_data_section(run, doctor)}{_eval_section(run)}{_diagnosis_section(diag)}"
        f"<script>{_CHECK_SCRIPT}</script></body></html>"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, *, doctor: bool = True) -> dict:
    """Write the report (default ``RUN/report.html``) atomically; returns {"path", "plots", "findings"}."""

    run = load_run(run_dir)
    diag = diagnose_run(run)
    plots = make_plots(run)
    path = Path(out) if out else Path(run_dir) / REPORT
    atomic_write_text(path, render_report(run, diag, plots, doctor=doctor))
    return {"path": str(path), "plots": [t for t, _ in plots], "findings": len(diag.findings)}
