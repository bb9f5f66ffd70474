"""How far a run got and what ended it, for the rules of `sftlab diagnose` (``diagnose_rules.py``): the
steps and epochs it trained, whether max_steps, early stopping or the epochs ended it, the config change
that trains longer, its last complete checkpoint. ``run`` is a :class:`sftlab.diagnose_rules.RunData`."""

from __future__ import annotations

import math


def _num(x) -> float | None:
    """A float for numbers (NaN/inf kept, including the strings 'nan'/'inf'), None otherwise."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(x)
    return None


def _finite(x) -> bool:
    v = _num(x)
    return v is not None and math.isfinite(v)


def _cfg(run, key: str, default=None):
    return getattr(run.config, key, default)


def _steps(run) -> int | None:
    """Optimizer steps the run took: the summary's, else the last logged step."""
    if run.summary is not None and isinstance(run.summary.steps, int) and run.summary.steps > 0:
        return run.summary.steps
    logged = [r.get("step") for r in run.train + run.evals if isinstance(r.get("step"), int)]
    return max(logged) if logged else None


def _epochs_trained(run) -> float | None:
    """Epochs the run actually trained: the summary's, else the last logged ``epoch``."""
    if run.summary is not None and _finite(run.summary.epochs):
        return float(run.summary.epochs)
    done = [float(r["epoch"]) for r in run.train + run.evals if _finite(r.get("epoch"))]
    return max(done) if done else None


def _ended_by(run) -> str:
    """What ended the run: "early_stopping", "max_steps" (before the configured epochs were done) or "epochs"."""
    if run.summary is not None and run.summary.stopped == "early_stopping":
        return "early_stopping"
    max_steps, epochs = _cfg(run, "max_steps", -1), _cfg(run, "epochs")
    if isinstance(max_steps, int) and max_steps > 0:
        done, steps = _epochs_trained(run), _steps(run)
        if done is not None and isinstance(epochs, (int, float)):
            return "max_steps" if done < epochs * 0.99 else "epochs"
        if steps is not None and steps >= max_steps:
            return "max_steps"
    return "epochs"


def _of_epochs(run) -> str:
    done, epochs = _epochs_trained(run), _cfg(run, "epochs")
    total = f" of the {epochs:g} configured" if isinstance(epochs, (int, float)) else ""
    return f"after {done:.2g}{total} epochs" if done is not None else "before the configured epochs were done"


def _train_longer(run) -> str | None:
    """The config change that trains longer, in terms of what ended the run (eval loss still falling)."""
    ended, epochs = _ended_by(run), _cfg(run, "epochs")
    if ended == "max_steps":
        max_steps, steps, done = _cfg(run, "max_steps"), _steps(run) or _cfg(run, "max_steps"), _epochs_trained(run)
        why = f"the run stopped at max_steps {_of_epochs(run)}; eval loss was still falling at the end"
        if done and isinstance(epochs, (int, float)) and steps * epochs / done <= 2 * max_steps:
            return f"max_steps: {max_steps} -> -1 (remove it: all {epochs:g} epochs are about {round(steps * epochs / done)} steps; {why})"
        return f"max_steps: {max_steps} -> {2 * max_steps} ({why})"
    if ended == "early_stopping":
        p, d = _cfg(run, "early_stopping_patience", 0) or 0, _cfg(run, "early_stopping_min_delta", 0.0) or 0.0
        return (f"early_stopping_patience: {p} -> {p + 2} (early stopping ended the run {_of_epochs(run)}, yet eval loss "
                f"was still falling, by less than early_stopping_min_delta {d:g} per evaluation)")
    if isinstance(epochs, (int, float)):
        return f"epochs: {epochs:g} -> {epochs + 1:g} (eval loss was still falling at the end)"
    return None

# --- rules ---------------------------------------------------------------------------------------

def _last_checkpoint(run) -> str | None:
    """The newest complete checkpoint folder's name (one with its trainer state), or None."""
    d = run.dir.checkpoints_dir
    done = [p for p in d.glob("checkpoint-*") if (p / "trainer_state.json").is_file()] if d.is_dir() else []
    steps = [(int(p.name.split("-")[-1]), p.name) for p in done if p.name.split("-")[-1].isdigit()]
    return max(steps)[1] if steps else None
