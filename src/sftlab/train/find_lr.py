"""`sftlab train --find-lr`: a learning-rate range test before training (Smith 2017, "Cyclical Learning
Rates for Training Neural Networks", section 3.3; fastai's ``lr_find``).

The run's own model, data, batch, precision and loss train for up to ``steps`` optimizer steps while the
rate grows geometrically from ``LOW`` to ``HIGH`` times the table's rate (``learning_rate: auto``,
:func:`sftlab.plan.auto.auto_learning_rate`), one step at each. The sweep stops early once the smoothed
loss is above ``STOP_FACTOR`` times its lowest value, or not finite. The model of the sweep is thrown
away; training then starts from the base weights at the chosen rate.

The choice (:func:`suggest`): a third (``FACTOR``) of the rate at which the smoothed loss was lowest.
Above that rate the loss climbs: it is the edge of stable training, and a run's peak rate belongs
below it. fastai's first rule took a tenth and Lightning's takes the steepest descent; on the demo task
both land at about 6e-4, where 10 LoRA steps reach 29% exact match against 62% at 2e-3, the rate a third
gives (benchmarks/RESULTS.md, with the check of the rule on full fine-tuning). Short sweeps are noisy
(each step sees other examples), so the smoothing is light (``BETA``): a heavier one lags by several
steps, which in a geometric sweep means a rate several times too high.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import tempfile
from dataclasses import dataclass

from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.train.callbacks import set_train_malloc
from sftlab.train.checks import run_folder_findings
from sftlab.train.distributed import is_global_main
from sftlab.train.model import build_model
from sftlab.train.run import (
    RunData,
    build_trainer,
    load_data,
    raise_on_fatal,
    resolve_and_check,
    train,
    training_arguments,
    training_batches,
)
from sftlab.train.trainer import Divergence

STEPS = 40  # optimizer steps of a sweep (fewer when the loss blows up first)
LOW, HIGH = 1e-2, 1e2  # the sweep's range, as multiples of the table's rate: four decades around it
STOP_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of its lowest value
BETA = 0.6  # exponential smoothing of the per-step loss (bias-corrected)
FACTOR = 3.0  # the choice: the rate of the lowest smoothed loss divided by this
SKIP = 2  # first steps left out of the choice: Adam's first updates are not yet at the set rate's size


@dataclass
class LrSweep:
    """The range test: the rate and loss of each step, the smoothed loss, the choice and why."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    choice: float
    reason: str
    stopped: str  # "diverged" (loss above STOP_FACTOR x its lowest, or not finite) | "completed"
    table_lr: float  # learning_rate: auto's value, the centre of the range

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average (the first value is the first loss)."""
    out, avg = [], 0.0
    for i, x in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float], *, skip: int = SKIP) -> tuple[float, str]:
    """The rate to train at (module docstring), and the reason in words."""
    finite = [i for i, s in enumerate(smoothed) if math.isfinite(s)]
    if len(finite) < skip + 3:
        raise SftlabError(f"the learning-rate sweep has only {len(finite)} usable steps",
                          hint="give it more steps (--find-lr 40) or more training data")
    low = min(finite[skip:], key=lambda i: smoothed[i])
    if low <= skip + 1:
        return lrs[skip], (f"the loss was lowest at the start of the sweep ({lrs[low]:.2g}): its lowest rate, "
                           "the range starts too high for this run")
    why = f"1/{FACTOR:g} of the rate of the lowest loss, {lrs[low]:.2g}"
    if low == len(lrs) - 1:
        why += "; the loss was still falling at the sweep's end, a higher rate may do"
    return lrs[low] / FACTOR, why


def describe_sweep(sweep: LrSweep, width: int = 40, rows: int = 12) -> str:
    """The curve as text (rate, smoothed loss, a bar) and the choice."""
    n = len(sweep.lrs)
    picks = sorted({round(i * (n - 1) / max(rows - 1, 1)) for i in range(rows)}) if n else []
    vals = [sweep.smoothed[i] for i in picks if math.isfinite(sweep.smoothed[i])]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    lines = [f"learning-rate sweep: {n} steps from {sweep.lrs[0]:.2g} to {sweep.lrs[-1]:.2g} ({sweep.stopped}); "
             f"learning_rate auto would be {sweep.table_lr:.3g}", "        lr   loss (smoothed)"]
    for i in picks:
        s = sweep.smoothed[i]
        bar = "#" * (1 + round((width - 1) * (s - lo) / max(hi - lo, 1e-12))) if math.isfinite(s) else "(not finite)"
        lines.append(f"  {sweep.lrs[i]:8.2e}  {s:7.4f} {bar}")
    lines.append(f"learning_rate: {sweep.choice:.3g} ({sweep.reason})")
    return "\n".join(lines)


def _stop_callback(trainer, sweep_losses: list[float], sweep_lrs: list[float], factor: float):
    from transformers import (
        TrainerCallback,  # deferred: heavy library, imported on first use
    )

    class _Record(TrainerCallback):
        """Keeps each step's rate (the optimizer's, as the step starts) and loss; stops the sweep once the
        smoothed loss blows up."""

        def on_step_begin(self, args, state, control, **kwargs):
            sweep_lrs.append(float(trainer.optimizer.param_groups[0]["lr"]))  # callbacks get no optimizer

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                sweep_losses.append(float(logs["loss"]))
                s = smooth(sweep_losses)
                if not math.isfinite(s[-1]) or (len(s) > SKIP + 2 and s[-1] > factor * min(s)):
                    control.should_training_stop = True

    return _Record()


def _geometric_scheduler(trainer, low: float, high: float, steps: int):
    """Replace the trainer's scheduler with one step per rate, ``low`` to ``high`` (``args.learning_rate = high``)."""
    import torch  # deferred: heavy library, imported on first use

    ratio = low / high
    span = max(steps - 1, 1)

    def create_scheduler(num_training_steps, optimizer=None):
        if trainer.lr_scheduler is None:
            trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or trainer.optimizer, lambda s: ratio ** (1 - min(s, span) / span))
            trainer._created_lr_scheduler = True  # Trainer resets a scheduler it made before the next train()
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


def _sweep_config(rc: Config, steps: int, high: float) -> Config:
    return dataclasses.replace(rc, max_steps=steps, learning_rate=high, lr_scheduler="constant", warmup_ratio=0.0,
                               logging_steps=1, save_steps=10**9, eval_steps=10**9, report_to=[],
                               early_stopping_patience=0, load_best_model_at_end=False)


def _run_sweep(rc: Config, data: RunData, steps: int, low: float, high: float) -> tuple[list[float], list[float], str]:
    """Train a throw-away model on the geometric schedule; each step's rate and loss, and how it stopped."""
    from transformers.trainer_callback import (  # deferred: heavy library, imported on first use
        PrinterCallback,
        ProgressCallback,
    )

    losses: list[float] = []
    lrs: list[float] = []
    model, ewc_loss_fn = build_model(rc, data.tok, data.train.added_tokens, template=data.train.template)
    batches = training_batches(rc, data.train.examples, data.tok, model, data.train)
    stopped = "completed"
    with tempfile.TemporaryDirectory(prefix="sftlab-lr-sweep-") as tmp:
        sweep_cfg = _sweep_config(rc, steps, high)
        args = training_arguments(sweep_cfg, tmp, has_eval=False, quiet=True)
        trainer, _ = build_trainer(sweep_cfg, dataclasses.replace(data, eval=None), model, ewc_loss_fn, args, batches)
        for cb in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(cb)
        trainer.add_callback(_stop_callback(trainer, losses, lrs, STOP_FACTOR))
        _geometric_scheduler(trainer, low, high, steps)
        try:
            trainer.train()
        except Divergence:
            losses.append(float("nan"))
        if len(losses) < steps:
            stopped = "diverged"
        del trainer, model
        gc.collect()
    return lrs[:len(losses)], losses, stopped


def find_lr(cfg: Config, *, steps: int = STEPS) -> LrSweep:
    """The learning-rate range test of ``cfg``'s run (module docstring); trains nothing that is kept."""
    from transformers import set_seed  # deferred: heavy library, imported on first use

    if steps < SKIP + 4:
        raise SftlabError(f"--find-lr {steps}: a sweep needs at least {SKIP + 4} steps", hint="--find-lr 40")
    set_seed(cfg.seed)
    data = load_data(cfg)
    rc, findings, _ = resolve_and_check(dataclasses.replace(cfg, learning_rate="auto"), data)
    raise_on_fatal(findings)
    table = float(rc.learning_rate)
    low, high = table * LOW, table * HIGH
    set_train_malloc()
    lrs, losses, stopped = _run_sweep(rc, data, steps, low, high)
    sm = smooth(losses)
    choice, reason = suggest(lrs, sm)
    return LrSweep(lrs, losses, sm, float(f"{choice:.3g}"), reason, stopped, table)


def train_with_found_lr(cfg: Config, *, steps: int = STEPS, quiet: bool = False, callbacks: list | None = None) -> dict:
    """:func:`find_lr`, then ``train`` at the chosen rate; the sweep is printed (unless ``quiet``) and
    saved in the run's summary (``lr_sweep``) and, as a comment, in its config.yaml."""
    if blockers := run_folder_findings(cfg):  # before the sweep's minutes, as train() would after them
        raise SftlabError(blockers[0].message, hint=blockers[0].fixes[0])
    sweep = find_lr(cfg, steps=steps)
    if not quiet and is_global_main():  # under torchrun every process ran the sweep; one prints it
        print(describe_sweep(sweep))
    return train(dataclasses.replace(cfg, learning_rate=sweep.choice), quiet=quiet, callbacks=callbacks,
                 notes={"lr_sweep": sweep.to_dict()})


__all__ = ["LrSweep", "describe_sweep", "find_lr", "smooth", "suggest", "train_with_found_lr"]
