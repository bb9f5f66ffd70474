"""Report plots that are not curves over steps: the length histogram, the before/after bars and the
learning-rate sweep of `train --find-lr`.

Each builder takes plain dicts from the run folder (the prepare report, the stored comparison) and a
matplotlib ``pyplot`` module, and returns ``(title, figure)`` or None when the run has no such data;
:func:`sftlab.report.make_plots` encodes the figures.
"""

from __future__ import annotations

import math


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def length_histogram_figure(plt, prepare: dict | None, max_seq_length: int | None):
    """Bars of the kept examples' lengths (``prepare["length_histogram"]``), a line at max_seq_length."""
    hist = (prepare or {}).get("length_histogram") if isinstance(prepare, dict) else None
    if not isinstance(hist, dict):
        return None
    width, counts = hist.get("bin_width"), hist.get("counts")
    if not _num(width) or width <= 0 or not isinstance(counts, list) or not counts or not all(_num(c) for c in counts):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar([i * width for i in range(len(counts))], counts, width=width, align="edge", color="#4c72b0",
           edgecolor="white", label=f"examples ({sum(counts)})")
    if _num(max_seq_length):
        ax.axvline(max_seq_length, color="#cf222e", linestyle="--", label=f"max_seq_length {max_seq_length}")
    ax.set_title("Example lengths (tokens)")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return "Example lengths (tokens)", fig


def before_after_figure(plt, ev: dict | None):
    """One small panel per compared metric: the base model's bar and the fine-tuned one's."""
    if not isinstance(ev, dict) or ev.get("kind") != "compare":
        return None
    rows = [r for r in ev.get("table") or [] if isinstance(r, dict) and _num(r.get("before")) and _num(r.get("after"))]
    if not rows:
        return None
    names = (str(ev.get("before_name") or "base"), str(ev.get("after_name") or "fine-tuned"))
    fig, axes = plt.subplots(1, len(rows), figsize=(max(6.4, 1.9 * len(rows)), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows):
        color = {True: "#1a7f37", False: "#cf222e"}.get(r.get("improved"), "#888888")
        bars = ax.bar([0, 1], [r["before"], r["after"]], color=["#9aa4b1", color])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks([0, 1], names, fontsize=8)
        better = r.get("better")
        ax.set_title(f"{r.get('label') or r.get('metric')}" + (f"\n({better} is better)" if better else ""), fontsize=9)
        ax.margins(y=0.15)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Before and after")
    fig.tight_layout()
    return "Before and after", fig


def lr_sweep_figure(plt, sweep: dict | None):
    """The range test of `train --find-lr` (``summary["lr_sweep"]``): loss against the rate (log scale),
    raw and smoothed, a line at the rate the run trained at."""
    if not isinstance(sweep, dict):
        return None
    lrs, losses, smoothed = sweep.get("lrs"), sweep.get("losses"), sweep.get("smoothed")
    if not (isinstance(lrs, list) and isinstance(losses, list) and isinstance(smoothed, list)) or len(lrs) < 2:
        return None
    pts = [(x, y, z) for x, y, z in zip(lrs, losses, smoothed) if _num(x) and x > 0 and _num(y) and _num(z)]
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", color="#9aa4b1", label="loss of each step")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "-", color="#4c72b0", label="smoothed")
    if _num(sweep.get("choice")):
        ax.axvline(sweep["choice"], color="#1a7f37", linestyle="--", label=f"chosen {sweep['choice']:.3g}")
    ax.set_xscale("log")
    ax.set_title("Learning-rate sweep (--find-lr)")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return "Learning-rate sweep (--find-lr)", fig
