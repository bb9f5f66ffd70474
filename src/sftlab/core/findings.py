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


def format_findings(findings: list[Finding], *, detail: bool = True) -> str:
    """Findings errors first; with ``detail`` each one's evidence and fixes on indented lines."""
    out = []
    for f in sorted(findings, key=lambda f: SEVERITIES.index(f.severity)):
        if not detail:
            out.append(f.line())
            continue
        where = f" {f.where}:" if f.where else ""
        out.append(f"[{f.severity}] {f.rule}:{where} {f.message}")
        out += [f"    seen: {e}" for e in f.evidence]
        out += [f"    fix:  {x}" for x in f.fixes]
    return "\n".join(out)


def worst(findings: list[Finding]) -> str | None:
    """The most severe severity present (``None`` for no findings)."""
    present = {f.severity for f in findings}
    return next((s for s in SEVERITIES if s in present), None)
