"""Callbacks: metrics.jsonl, signal-safe checkpoints, progress line, what the end of a run is doing, and
the trackers' run name and project.

Signals: SIGINT (Ctrl-C) or SIGTERM (a job scheduler) finishes the current step, saves a checkpoint and
stops; the command then exits 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process those
signals ended. A second signal stops at once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from sftlab import rundir as A
from sftlab.core.hardware import peak_memory_mb
from sftlab.core.io import atomic_write_text
from sftlab.plan.allocator import keep_freed_pages, release_freed_memory, train_malloc


class MetricsLogger(TrainerCallback):
    """Appends one JSON object per log event to metrics.jsonl (train rows and eval rows)."""

    def __init__(self, path, trainer_ref, *, quiet: bool = False):
        self.path = path
        self.trainer_ref = trainer_ref
        self.quiet = quiet
        self._last = (time.perf_counter(), 0, 0)
        self.rows: list[dict] = []
        self.final = False  # set before the final evaluation: its line says "final", not "step N"
        self._said: set[str] = set()  # status lines printed (each once)
        self._eval_steps: set[int] = set()  # steps whose eval line was printed

    def say(self, line: str) -> None:
        """Print a status line once (above the progress bar when one is drawn); nothing when quiet."""
        if self.quiet or line in self._said:
            return
        self._said.add(line)
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save and state.global_step > 0:  # resumed: its checkpoint's step is where the log goes on
            drop_rows_after(self.path, state.global_step)
        t = self.trainer_ref()
        self._last = (time.perf_counter(), t.tokens_seen, t.trained_tokens_seen)
        self._bar = None
        if not self.quiet and args.should_save:
            from tqdm.auto import tqdm  # deferred: heavy library, imported on first use

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.update(state.global_step - bar.n)
        if state.global_step >= state.max_steps:  # the last step's train row, whatever logging_steps says:
            control.should_log = True  # a run shorter than logging_steps would leave no metrics.jsonl
        last = state.global_step >= state.max_steps or control.should_training_stop
        if last and args.should_save:  # after the bar's last tick: say what the wait is for
            if control.should_evaluate:
                self.say(f"step {state.global_step}: evaluating")
            if control.should_save:
                self.say(f"step {state.global_step}: saving checkpoint-{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        """Beside each checkpoint, the global batch and rate it was trained at: a resume compares against
        them (config.yaml is rewritten by every resume attempt, a checkpoint only by its own run)."""
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and ckpt.is_dir():
            batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
            atomic_write_text(ckpt / A.CHECKPOINT_BATCH,
                              json.dumps({"global_batch": batch, "learning_rate": args.learning_rate}))

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not args.should_save or not logs:
            return
        if "train_runtime" in logs and args.load_best_model_at_end and state.best_model_checkpoint:
            # Trainer logs its run totals just before it loads the best checkpoint back
            best = f" (eval_loss {state.best_metric:.4f})" if state.best_metric is not None else ""
            self.say(f"restoring the best checkpoint {state.best_model_checkpoint.rsplit('/', 1)[-1]}{best}")
        t = self.trainer_ref()
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "eval_loss" in logs:
            row["split"] = "eval"
            row.update({k: v for k, v in logs.items() if k.startswith(("eval_", "gen_", "general_"))})
        elif "loss" in logs:
            now = time.perf_counter()
            t0, tok0, tr0 = self._last
            dt = max(now - t0, 1e-9)
            row.update({"split": "train", "loss": logs["loss"], "learning_rate": logs.get("learning_rate"),
                        "grad_norm": logs.get("grad_norm"),
                        "tokens_per_second": (t.tokens_seen - tok0) / dt,
                        "trained_tokens_per_second": (t.trained_tokens_seen - tr0) / dt,
                        "tokens": t.tokens_seen, "trained_tokens": t.trained_tokens_seen,
                        "memory_mb": round(peak_memory_mb(), 1)})
            if "ewc_penalty" in logs:  # EWC: the penalty added to the loss above
                row["ewc_penalty"] = logs["ewc_penalty"]
            self._last = (now, t.tokens_seen, t.trained_tokens_seen)
            # The same dict goes on to the trackers' callbacks (tensorboard, wandb, ...): give them throughput too.
            logs.update({k: row[k] for k in _TRACKED})
        else:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        bar = getattr(self, "_bar", None)
        if bar is not None and row["split"] == "train":
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{row['learning_rate']:.2e}",
                            tok_s=f"{row['tokens_per_second']:.0f}", refresh=True)
        elif row["split"] == "eval" and (self.final or row["step"] not in self._eval_steps):
            self._eval_steps.add(row["step"])
            head = "final" if self.final else f"step {row['step']:>5}"
            self.say(f"{head}  eval_loss {logs['eval_loss']:.4f}  ppl {logs.get('eval_perplexity', float('nan')):.2f}")


def drop_rows_after(path: Path, step: int) -> int:
    """Remove from metrics.jsonl the rows of steps after ``step``, the checkpoint a run resumes from: a run
    killed past its last checkpoint (no signal to save one: out of memory, a lost node) logged steps that the
    resumed run trains and logs again, and the log held both. Returns how many rows were removed; a line
    that is no JSON row is kept."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0

    def after(line: str) -> bool:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        s = row.get("step") if isinstance(row, dict) else None
        return isinstance(s, (int, float)) and not isinstance(s, bool) and s > step

    keep = [line for line in lines if not after(line)]
    if len(keep) < len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


_TRACKED = ("tokens_per_second", "trained_tokens_per_second")  # our train-row scalars the trackers also get


def put_before_trackers(trainer, callback) -> None:
    """Add ``callback`` ahead of the trackers' callbacks, so its ``on_log`` changes reach them; but after
    Trainer's flow callback, so ``control`` already says whether this step evaluates and saves."""
    cbs = trainer.callback_handler.callbacks
    flow = next((i for i, cb in enumerate(cbs) if isinstance(cb, DefaultFlowCallback)), -1)
    cbs.insert(flow + 1, callback)


def route_tensorboard(trainer, log_dir) -> None:
    """transformers' TensorBoardCallback writes to ``log_dir`` (RUN/tensorboard) instead of a dated folder
    under the checkpoints; ``TENSORBOARD_LOGGING_DIR`` set by the user still wins."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", None) is None:
            cb.logging_dir = str(log_dir)


@contextmanager
def tracker_env(project: str | None):
    """While training: ``WANDB_PROJECT`` and ``MLFLOW_EXPERIMENT_NAME`` = ``project`` (restored after).

    Those two integrations read the project only from the environment; trackio takes
    ``TrainingArguments.project``. No project: the environment is left as it is.
    """
    keys = ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME")
    old = {k: os.environ.get(k) for k in keys}
    if project:
        os.environ.update(dict.fromkeys(keys, project))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SignalCheckpoint(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the current step, save a checkpoint, stop cleanly."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return  # Python allows handlers in the main thread only; Ray Train runs train() in another
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
        print(f"\n{self.requested} received: saving a checkpoint after this step, then stopping "
              f"(exit {exit_code_for(self.requested)}; {again} to stop at once)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


def set_train_malloc() -> str:
    """The CPU allocator's settings for training, called once before the model loads; returns what was
    set: ``"lean"``, ``"keep"`` or ``""`` (nothing: a GPU, or a C library other than glibc).

    With ``SFTLAB_MALLOC=lean``, freed tensor memory goes back to the OS at once, so the process peaks
    where its live tensors do (:mod:`sftlab.plan.allocator`): measured here 1.8x slower LoRA steps for
    14% less peak memory. By default glibc keeps its freed pages instead of trimming and faulting them
    in again each step (1.10x faster, the same peak). `sftlab plan` counts what glibc keeps
    (:mod:`sftlab.plan.heap`)."""
    import torch  # deferred: heavy library, imported on first use

    if torch.cuda.is_available():
        return ""
    if train_malloc() == "lean":  # the rule `sftlab plan` reads too
        return "lean" if release_freed_memory() else ""
    return "keep" if keep_freed_pages() else ""


def exit_code_for(signal_name: str | None) -> int:
    """The exit code of a run a signal stopped: 128 + the signal's number (130 SIGINT, 143 SIGTERM)."""
    if not signal_name:
        return 130
    return 128 + int(getattr(signal, signal_name, signal.SIGINT))
