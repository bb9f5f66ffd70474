"""One Finding type for every check in sftlab (train's pre-flight checklist, the data doctor, the
run diagnosis), and one printer, so a finding reads the same wherever it comes from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    """What a check found: how bad, what, where, what was seen, and how to fix it.

    ``rule`` is the check's stable id (``"eos"``, ``"duplicates"``, ``"learning_rate"``); ``where`` is
    ``file:line``, a run folder or a config key (empty when the finding is about the whole input);
    ``fixes`` are concrete changes, ``"--set key=value"`` where a config key fixes it.
    """

    rule: str
    severity: str  # one of SEVERITIES
    message: str
    where: str = ""
    evidence: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {SEVERITIES}")

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line: ``severity: [where: ]message -> fix``."""
        where = f"{self.where}: " if self.where else ""
        fix = f" -> {'; '.join(self.fixes)}" if self.fixes else ""
        return f"{self.severity}: {where}{self.message}{fix}"

    def __str__(self) -> str:
        return self.line()


def _details(f: Finding, indent: str) -> list[str]:
    return [f"{indent}seen: {e}" for e in f.evidence] + [f"{indent}fix:  {x}" for x in f.fixes]


def format_findings(findings: list[Finding], *, detail: bool = True, limit: int | None = None,
                    headings: dict[str, str] | None = None) -> str:
    """Findings errors first; with ``detail`` each one's evidence and fixes on indented lines.

    Without ``detail``: one :meth:`Finding.line` each. With it, a rule found once is one heading line
    ``[severity] rule: where: message``; a rule found several times (or one named in ``headings``,
    rule -> what it checks) is a heading ``[severity] rule (count): heading`` over one
    ``where: message`` line per finding, at most ``limit`` of them.
    """
    ordered = sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
    if not detail:
        return "\n".join(f.line() for f in ordered)
    groups: dict[tuple[str, str], list[Finding]] = {}
    for f in ordered:
        groups.setdefault((f.severity, f.rule), []).append(f)
    out = []
    for (severity, rule), group in groups.items():
        heading = (headings or {}).get(rule)
        if heading is None and len(group) == 1:
            f = group[0]
            where = f" {f.where}:" if f.where else ""
            out.append(f"[{severity}] {rule}:{where} {f.message}")
            out += _details(f, "    ")
            continue
        out.append(f"[{severity}] {rule} ({len(group)}): {heading or group[0].message}")
        for f in group[:limit]:
            out.append(f"    {f.where + ': ' if f.where else ''}{f.message}")
            out += _details(f, "        ")
        if limit is not None and len(group) > limit:
            out.append(f"    ... and {len(group) - limit} more (--json lists all)")
    return "\n".join(out)


def worst(findings: list[Finding]) -> str | None:
    """The most severe severity present (``None`` for no findings)."""
    present = {f.severity for f in findings}
    return next((s for s in SEVERITIES if s in present), None)


def exit_code(findings: list[Finding]) -> int:
    """The CLI's exit code for findings: 2 with any error, 1 with only warnings, 0 otherwise."""
    return {"error": 2, "warning": 1}.get(worst(findings), 0)
