"""Diagnose a finished (or stopped) run: symptom -> evidence -> cause -> a concrete config change.

Reads only the run folder (config.yaml, metrics.jsonl, summary.json, the tokenizer files in model/);
never loads weights. Each rule (in :mod:`sftlab.diagnose_rules`) is one small function
``(RunData, Thresholds) -> Finding | None`` and reports the numbers and steps it saw. Rules:
    interrupted        the run stopped before its end (or has no summary.json): where, and how to resume
    overfitting        eval loss rising over the last evaluations while train loss falls, gap too wide
    forgetting         general-data loss up by more than the threshold
    worse_than_base    eval loss of the fine-tune far above the base model's (`eval --compare base --save`)
    format             low format adherence of generated replies
    repetition         high n-gram repetition in generated replies
    divergence         NaN/inf, or exploding loss or gradient norm
    plateau            train loss that barely fell over the run (learned almost nothing)
    eos                the end-of-turn/EOS token of trained replies is not trained (worst: pad == EOS)
    truncation         examples dropped or cut because they were longer than max_seq_length
    template_mismatch  the template saved for inference differs from the one used in training
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftlab.core.findings import SEVERITIES, Finding, exit_code, format_findings
from sftlab.core.io import json_safe
from sftlab.diagnose_rules import RULES, RunData, Skip, Thresholds
from sftlab.rundir import RunDir

__all__ = ["RULES", "Diagnosis", "RunData", "Thresholds", "diagnose", "diagnose_run", "load_run"]


@dataclass
class Diagnosis:
    run_dir: str
    findings: list[Finding]
    checked: dict[str, str]  # rule -> "ok" | "found" | "skipped: why"

    @property
    def exit_code(self) -> int:
        return exit_code(self.findings)

    def to_dict(self) -> dict:
        return json_safe({"run_dir": self.run_dir, "findings": [f.to_dict() for f in self.findings],
                           "checked": self.checked, "exit_code": self.exit_code})

    def skipped(self) -> list[str]:
        """``rule (why)`` for each rule that could not judge this run."""
        return [f"{r} ({s.removeprefix('skipped: ')})" for r, s in self.checked.items() if s.startswith("skipped")]

    def format_text(self) -> str:
        out = [f"diagnosis of {self.run_dir}", ""]
        out.append(format_findings(self.findings) if self.findings else "no problems found")
        if self.skipped():
            out.append("\nnot checked: " + "; ".join(self.skipped()))
        return "\n".join(out)


def load_run(run_dir: str | Path) -> RunData:
    """Read and check the run folder; missing or damaged files are one-line SftlabErrors."""
    d = RunDir(run_dir).require()
    cfg = d.config()
    train, evals = d.curves()
    return RunData(d, cfg, train, evals, d.summary() if d.has_summary() else None)


def diagnose(run_dir: str | Path, thresholds: Thresholds | None = None) -> Diagnosis:
    """Run every rule on the run folder; findings sorted errors first."""
    return diagnose_run(load_run(run_dir), thresholds)


def diagnose_run(run: RunData, thresholds: Thresholds | None = None) -> Diagnosis:
    """Run every rule on an already loaded run (see :func:`load_run`)."""
    th = thresholds or Thresholds()
    findings, checked = [], {}
    for name, rule in RULES.items():
        try:
            f = rule(run, th)
        except Skip as why:
            checked[name] = f"skipped: {why}"
            continue
        checked[name] = "found" if f else "ok"
        if f:
            findings.append(f)
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return Diagnosis(str(run.run_dir), findings, checked)
