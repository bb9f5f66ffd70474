"""The pre-flight configuration checklist of `sftlab train`.

`auto` values are resolved by :mod:`sftlab.plan.auto`; its names are re-exported here for the training code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from sftlab import rundir as A
from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.core.findings import Finding
from sftlab.core.hardware import device_memory_gb
from sftlab.data.doctor_tools import template_tool_check
from sftlab.data.prepare import Prepared
from sftlab.data.turns import reasoning_lost_warning
from sftlab.plan.auto import (
    estimated_bytes,
    lr_for_size,
)
from sftlab.plan.render import gb
from sftlab.plan.shapes import (
    human_count,
)
from sftlab.train.checks_model import (
    attention_findings,
    context_findings,
    kernel_findings,
    lora_rank_findings,
    method_findings,
)
from sftlab.train.distributed import is_global_main, sharding_arguments


def _finding(rule: str, severity: str, message: str, fix: str) -> Finding:
    return Finding(rule, severity, message, fixes=[fix])


def step_shape(cfg: Config) -> tuple[int, int]:
    """(micro-batch, accumulation) the run's steps compute: batch x accumulation as one micro-batch where
    ``merge_micro_batches`` is true (train/merge.py); ``auto`` merges only after a trial, where it fits."""
    b, ga = int(cfg.batch_size), int(cfg.gradient_accumulation)
    return (b * ga, 1) if cfg.merge_micro_batches is True else (b, ga)


def step_bytes(cfg: Config, model_cfg, seq_len: int, device: str) -> int:
    """Estimated peak bytes of a step of ``cfg`` (resolved): the micro-batch that runs, with accumulation
    keeping the gradients through the next micro-batch, as `sftlab plan` estimates it."""
    batch, accum = step_shape(cfg)
    return estimated_bytes(cfg, model_cfg, batch=batch, seq_len=seq_len, device=device,
                           checkpointing=bool(cfg.gradient_checkpointing), grad_accum=accum)


def memory_line(cfg: Config, model_cfg, seq_len: int) -> str:
    """One line for `train --check`: the estimated peak memory of a step of ``cfg`` (resolved) with rows
    of ``seq_len`` tokens on this machine's device, against what it has (:mod:`sftlab.plan.memory`)."""
    device, mem_gb = device_memory_gb()
    need, (batch, accum) = step_bytes(cfg, model_cfg, seq_len, device), step_shape(cfg)
    where = "GPU memory" if device == "cuda" else "free RAM"
    return (f"memory: about {gb(need)} at the peak of a step (micro-batch {batch} x {seq_len} tokens"
            f"{f' x accumulation {accum}' if accum > 1 else ''}, {cfg.precision}, checkpointing "
            f"{'on' if cfg.gradient_checkpointing else 'off'}) of {gb(mem_gb * 2**30)} {where} "
            f"(`{plan_command(cfg, device, seq_len)}` breaks it down)")


PLAN_CONFIG = "sftlab plan CONFIG"  # `train --check` puts the user's config and overrides in place of CONFIG


def name_plan_command(findings: list[Finding], named: str | None) -> list[Finding]:
    """The findings with ``named`` (the user's `sftlab plan` command: their config and overrides) in place of
    :data:`PLAN_CONFIG`, so the command a memory line points to runs as printed; as they are without it."""
    if not named:
        return findings
    return [replace(f, message=f.message.replace(PLAN_CONFIG, named), fixes=[x.replace(PLAN_CONFIG, named) for x in f.fixes])
            for f in findings]


def plan_command(cfg: Config, device: str, seq_len: int) -> str:
    """The `sftlab plan` command that estimates the step of ``cfg`` (resolved) as :func:`step_bytes` does:
    the step's micro-batch, accumulation, precision and checkpointing as flags, which win over the config;
    liger-kernel and flash attention off where the estimate leaves them out (they cannot run there)."""
    batch, accum = step_shape(cfg)
    liger = device != "cuda" and True in (cfg.liger_kernels, cfg.fused_loss)
    flash = cfg.attn_implementation == "flash_attention_2" and (device != "cuda" or cfg.precision == "fp32")
    return (f"{PLAN_CONFIG} --device {device} --seq-len {seq_len} --batch {batch} --grad-accum {accum} "
            f"--precision {cfg.precision} --{'' if cfg.gradient_checkpointing else 'no-'}gradient-checkpointing"
            + (" --no-liger" if liger else "") + (" --attention sdpa" if flash else ""))


def _fits_with(cfg: Config, model_cfg, seq_len: int, device: str, budget: float, **changes) -> bool:
    return step_bytes(dataclasses.replace(cfg, **changes), model_cfg, seq_len, device) <= budget


def memory_findings(cfg: Config, model_cfg, seq_len: int) -> list[Finding]:
    """An error where the step (as memory_line estimates it) does not fit this machine, with the changes
    that make it fit: a smaller micro-batch at the same global batch, checkpointing, shorter rows."""
    device, mem_gb = device_memory_gb()
    budget, need = mem_gb * 2**30, step_bytes(cfg, model_cfg, seq_len, device)
    if need <= budget:
        return []
    (batch, accum), fixes = step_shape(cfg), []
    unmerge = {"merge_micro_batches": False} if cfg.merge_micro_batches is True else {}
    micro = batch // 2  # the largest power-of-two fraction of the micro-batch that fits
    while micro >= 1 and not _fits_with(cfg, model_cfg, seq_len, device, budget, batch_size=micro,
                                        gradient_accumulation=2, **unmerge):
        micro //= 2
    if micro >= 1:
        fixes.append(f"--set batch_size={micro} --set gradient_accumulation={-(-batch * accum // micro)}"
                     + (" --set merge_micro_batches=false" if unmerge else "") + " (the same global batch)")
    if not cfg.gradient_checkpointing and cfg.method != "prefix":  # prefix tuning cannot run with it
        fixes.append("--set gradient_checkpointing=true")
    if not fixes:
        cheaper = {"full": " or --set method=lora (or qlora)", "lora": " or --set method=qlora"}.get(cfg.method, "")
        fixes.append(f"lower max_seq_length (now {cfg.max_seq_length}){cheaper}")
    fixes.append(f"`{plan_command(cfg, device, seq_len)}` breaks it down and recommends what fits")
    sharded = cfg.fsdp or cfg.deepspeed  # the estimate is of one process holding everything: not a verdict
    return [Finding("memory", "warning" if sharded else "error", f"micro-batch {batch} x {seq_len} tokens needs about "
                    f"{gb(need)} at the peak of a step, {gb(budget)} {'GPU memory' if device == 'cuda' else 'free RAM'} "
                    "available" + (" (unsharded: fsdp/deepspeed split it over the GPUs, not estimated)" if sharded else ""),
                    fixes=fixes)]


def checklist(cfg: Config, *, n_params: int, n_examples: int, seq_len: int, model_cfg,
              train_keys: set, eval_keys: set, report, n_rows: int | None = None) -> list[Finding]:
    """The configuration checklist, each finding with its fix. ``cfg`` is resolved (no `auto`). ``n_rows``:
    the rows an epoch iterates (:func:`sftlab.train.epochs.epoch_rows`: with replay, packed), which the
    step count follows; default ``n_examples``."""
    out: list[Finding] = []
    lr = float(cfg.learning_rate)
    ref = lr_for_size(n_params, cfg.method)
    lo, hi = ref / 10, ref * 10  # the table is per method: an order of magnitude either way is unusual
    if not lo <= lr <= hi:
        out.append(Finding("learning_rate", "warning", f"learning rate {lr:g} is outside the usual range {lo:g}..{hi:g} "
                           f"for a {human_count(n_params)}-parameter model ({cfg.method})",
                           fixes=[f"--set learning_rate={ref:g}", "sftlab train ... --check --find-lr (measure it)"]))
    out += attention_findings(cfg, device_memory_gb()[0]) + kernel_findings(cfg, device_memory_gb()[0])
    # packed rows restart positions at each example (data/collate.py): the longest example is what reaches the context
    longest = min(seq_len, max(map(len, train_keys))) if cfg.packing and train_keys else seq_len
    out += memory_findings(cfg, model_cfg, seq_len) + context_findings(cfg, model_cfg, longest)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = int(cfg.batch_size) * int(cfg.gradient_accumulation) * world
    rows = n_examples if n_rows is None else n_rows
    steps_per_epoch = max(1, -(-rows // global_batch))
    # as Trainer counts them: a started epoch is a step
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * float(cfg.epochs))
    if global_batch > max(8, rows // 4):
        what = f"{n_examples} examples" if rows == n_examples else (
            f"{rows} rows per epoch ({n_examples} examples{' and replay' if cfg.replay_ratio > 0 else ''}"
            f"{', packed' if cfg.packing else ''})")
        accum = max(1, rows // (8 * int(cfg.batch_size)))  # a global batch near an eighth of the rows
        fix = (f"--set gradient_accumulation={accum}"  # unless accumulation alone cannot get there (or is 1 already)
               if accum < int(cfg.gradient_accumulation) and int(cfg.batch_size) * accum * world <= max(8, rows // 4)
               else f"--set batch_size={max(1, rows // (8 * world))} --set gradient_accumulation=1")
        out.append(_finding("global_batch", "warning", f"global batch {global_batch} is implausible for {what} "
                           f"({steps_per_epoch} optimizer steps per epoch)", fix))
    out += sharding_findings(cfg, device_memory_gb()[0])
    out += warmup_findings(cfg, total_steps) + max_steps_findings(cfg, steps_per_epoch)
    out += step_findings(total_steps) + schedule_findings(cfg, total_steps)
    out += method_findings(cfg, model_cfg) + lora_rank_findings(cfg, model_cfg)
    if cfg.weight_decay > 0.1:
        out.append(_finding("weight_decay", "warning", f"weight decay {cfg.weight_decay:g} is high for fine-tuning", "--set weight_decay=0.01"))
    if eval_keys:
        shared = train_keys & eval_keys
        if shared and shared == eval_keys:
            out.append(_finding("eval_overlap", "error", "the eval data is identical to the training data",
                               "hold out a separate eval split"))
        elif shared:
            out.append(_finding("eval_overlap", "warning", f"{len(shared)} eval examples also appear in the training data",
                               "remove them from the eval split (`sftlab doctor --eval` lists them)"))
    if report is not None and report.n_input:
        lost = report.n_dropped_too_long + report.n_truncated + report.n_turns_cut
        if lost / report.n_input > 0.05:
            out.append(_finding("truncation", "warning", f"max_seq_length {cfg.max_seq_length} cuts or drops {lost} of "
                               f"{report.n_input} examples", "raise max_seq_length"))
    if report is not None and (lost_reasoning := reasoning_lost_warning(report.n_reasoning_lost, cfg.reasoning, cfg.masking)):
        out.append(_finding("reasoning_lost", "warning", *lost_reasoning))
    has_eval = bool(eval_keys)  # eval data is never empty
    return out + checkpoint_step_findings(cfg, has_eval=has_eval) + eval_step_findings(cfg, total_steps, has_eval)


def checkpoint_steps(cfg: Config, *, has_eval: bool) -> tuple[int, int]:
    """(eval_steps, save_steps) as the run uses them: the config's, unless load_best_model_at_end (with eval
    data) needs them changed. It restores the best evaluated checkpoint, so transformers wants every checkpoint
    at an evaluation (save_steps a multiple of eval_steps): eval_steps above save_steps is lowered to it, else
    save_steps is rounded down to a multiple of eval_steps."""
    ev, sv = cfg.eval_steps, cfg.save_steps
    if not (cfg.load_best_model_at_end and has_eval) or sv % ev == 0:
        return ev, sv
    return (sv, sv) if ev > sv else (ev, sv // ev * ev)


def checkpoint_step_findings(cfg: Config, *, has_eval: bool) -> list[Finding]:
    """An info finding when :func:`checkpoint_steps` changes the config's eval_steps or save_steps."""
    ev, sv = checkpoint_steps(cfg, has_eval=has_eval)
    changed = [f"{key} {was} -> {now}" for key, was, now in
               (("eval_steps", cfg.eval_steps, ev), ("save_steps", cfg.save_steps, sv)) if was != now]
    if not changed:
        return []
    keep = -(-cfg.save_steps // cfg.eval_steps) * cfg.eval_steps  # the next multiple of the config's eval_steps
    return [_finding("checkpoint_steps", "info", f"{' and '.join(changed)}: load_best_model_at_end needs every "
                     "checkpoint at an evaluation (save_steps a multiple of eval_steps)",
                     f"--set save_steps={keep} (a multiple of eval_steps) to keep yours, or "
                     "--set load_best_model_at_end=false")]


def eval_step_findings(cfg: Config, total_steps: int, has_eval: bool) -> list[Finding]:
    """An info finding when eval_steps (as the run uses it) is past the run's last step: the eval data is
    then evaluated once, after training, so there is no eval curve and early stopping never acts."""
    ev = checkpoint_steps(cfg, has_eval=has_eval)[0]
    if not has_eval or total_steps <= 0 or ev <= total_steps:
        return []
    stop = ", and early stopping never acts" if cfg.early_stopping_patience > 0 else ""
    return [_finding("eval_steps", "info", f"eval_steps {ev} is past the run's {total_steps} steps: the eval data is "
                     f"evaluated only once, after training (no eval curve{stop})",
                     f"--set eval_steps={max(1, total_steps // 5)} to evaluate during the run")]


def warmup_steps(cfg: Config, total_steps: int) -> int:
    """The warmup's optimizer steps, as transformers counts them: ceil(total x warmup_ratio) (its
    ``get_warmup_steps`` for a ratio below 1); none under the constant schedule, which has no warmup."""
    if cfg.lr_scheduler == "constant" or total_steps <= 0:
        return 0
    return math.ceil(total_steps * cfg.warmup_ratio)


def max_steps_findings(cfg: Config, steps_per_epoch: int) -> list[Finding]:
    """An info finding when ``max_steps`` runs past ``epochs``: Trainer then trains max_steps whatever the
    epochs say (epochs is not a limit beside it), so the data is passed over more often than configured."""
    planned = math.ceil(steps_per_epoch * float(cfg.epochs))
    if cfg.max_steps <= planned:
        return []
    return [_finding("max_steps", "info", f"max_steps {cfg.max_steps} runs past epochs {float(cfg.epochs):g} "
                     f"({planned} steps): the run trains {cfg.max_steps / steps_per_epoch:.3g} epochs, as max_steps "
                     "overrides epochs", f"--set max_steps=-1 to train {float(cfg.epochs):g} epoch"
                     f"{'' if float(cfg.epochs) == 1 else 's'}, or "
                     f"--set max_steps={planned}")]


def sharding_findings(cfg: Config, device: str) -> list[Finding]:
    """``fsdp``/``deepspeed`` settings the run refuses (:func:`sharding_arguments`: unknown words, DeepSpeed or
    fsdp offload off CUDA, fsdp in one CPU process): --check says so, and the run stops before loading."""
    try:
        sharding_arguments(cfg, cuda=device == "cuda")
    except SftlabError as e:
        message = str(e).removesuffix(f" ({e.hint})") if e.hint else str(e)
        return [_finding("sharding", "error", message, e.hint or "unset fsdp and deepspeed")]
    return []


def warmup_findings(cfg: Config, total_steps: int) -> list[Finding]:
    """A warning when the warmup is a quarter of the run or more: its first step trains at lr 0 (the
    linear warmup starts there), and a warmup as long as the run never reaches the peak rate."""
    warmup = warmup_steps(cfg, total_steps)
    if warmup == 0 or warmup * 4 < total_steps or cfg.resume:  # resumed: the warmup ran (and was warned of)
        return []
    what = ("lasts the whole run: the learning rate never reaches its peak" if warmup >= total_steps
            else f"is {warmup / total_steps:.0%} of the run")
    return [_finding("warmup", "warning", f"warmup ({warmup} of {total_steps} steps) {what}, and step 1 trains at "
                     "lr 0", "--set warmup_ratio=0 for a run this short, or train longer")]


# -- what the run hits before its first step: the run folder, resume, the step count ----------------
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_complete(folder: Path) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint without a readable one was cut off mid-save."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of every checkpoint-N folder, by step."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [(step, p, checkpoint_complete(p)) for step, p in sorted(found)]


def last_good_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (a kill during a save leaves a newer, incomplete one)."""
    good = [p for _, p, ok in checkpoints(ckpt_dir) if ok]
    return good[-1] if good else None


def checkpoint_state(folder: Path) -> dict:
    """The checkpoint's trainer_state.json ({} when unreadable): global_step, epoch, max_steps (the run's
    planned total), num_train_epochs."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _evaluations_waited(state: dict) -> int:
    """Early stopping's count of evaluations without improvement, as the checkpoint saved it (0: none)."""
    saved = (state.get("stateful_callbacks") or {}).get("EarlyStoppingCallback")
    saved = saved[0] if isinstance(saved, list) and saved else saved
    count = saved.get("attributes", {}).get("early_stopping_patience_counter") if isinstance(saved, dict) else None
    return count if isinstance(count, int) else 0


def _complete_run(cfg: Config, state: dict, saved_epochs) -> Finding | None:
    """An error when the checkpoint to resume from already reached ``cfg``'s end, its steps or epochs or
    the step early stopping stopped it at: Trainer would train a step past it (at lr 0) and evaluate twice
    (an early-stopped run trained on to its next evaluation and replaced its model). ``saved_epochs``: the run's own (resolved) epochs, which
    ``epochs: auto`` resolves to again."""
    step, epoch = int(state.get("global_step") or 0), float(state.get("epoch") or 0.0)
    epochs = saved_epochs if cfg.epochs == "auto" else cfg.epochs
    if cfg.max_steps > 0 and step >= cfg.max_steps:
        done, more = f"{step}/{cfg.max_steps} steps", "max_steps"
    elif cfg.max_steps < 0 and isinstance(epochs, (int, float)) and epoch >= float(epochs) - 1e-6:
        done, more = f"{epoch:g}/{float(epochs):g} epochs", "epochs"
    elif cfg.eval_data and 0 < cfg.early_stopping_patience <= (waited := _evaluations_waited(state)):
        done, more = f"early stopping at step {step}: {waited} evaluations without improvement", "early_stopping_patience"
    else:
        return None
    return _finding("resume", "error", f"run already complete ({done}); raise {more} to train on",
                    f"--set {more}=<more> --resume, or a new --output-dir")


def schedule_findings(cfg: Config, total_steps: int) -> list[Finding]:
    """``resume`` with another step count than the run was planned for: its learning-rate schedule is
    rebuilt for the new total (the resumed steps train at the new schedule's rate for their step); with
    another global batch than the run trained at, also a warning: the data position is counted in steps."""
    run = Path(cfg.output_dir).expanduser()
    if not cfg.resume or (ckpt := last_good_checkpoint(run / A.CHECKPOINTS)) is None:
        return []
    state = checkpoint_state(ckpt)
    planned, step = state.get("max_steps"), int(state.get("global_step") or 0)
    out = batch_change_findings(cfg, run, step)
    if not planned or planned == total_steps or step >= total_steps:
        return out
    fix = ("keep the global batch as it was" if out else
           f"keep max_steps/epochs as they were ({planned} steps)") + " to continue the old schedule"
    return out + [_finding("resume", "info", f"resume: the run was planned for {planned} steps, now {total_steps}: its "
                           f"learning-rate schedule ({cfg.lr_scheduler}) is rebuilt for {total_steps} steps, from step "
                           f"{step + 1} on", fix)]


def batch_change_findings(cfg: Config, run: Path, step: int) -> list[Finding]:
    """A warning when ``resume`` changes the global batch (batch_size x gradient_accumulation) of the run in
    ``run``: Trainer finds its place in the data by the step count, so at another batch the resumed run skips
    examples of the interrupted epoch (a larger batch) or trains some twice (a smaller one)."""
    old, lr_was = _trained_batch(run)
    if old is None:
        return []
    new = int(cfg.batch_size) * int(cfg.gradient_accumulation) * int(os.environ.get("WORLD_SIZE", "1"))
    if old == new:
        return []
    unit = "packed rows" if cfg.packing else "examples"
    lr = float(cfg.learning_rate)
    lr_note = (f"; the learning rate is {lr:g} now, {lr_was:g} before (learning_rate: auto follows the global batch)"
               if isinstance(lr_was, (int, float)) and not isinstance(lr_was, bool) and lr_was != lr else "")
    return [_finding("resume", "warning", f"resume: the run trained at a global batch of {old} (batch_size x "
                     f"gradient_accumulation x processes), now {new}: Trainer counts the data position in steps, so resumed at "
                     f"step {step} it takes {step * new} {unit} as trained where the run trained {step * old} "
                     f"({'some are skipped' if new > old else 'some are trained twice'}){lr_note}",
                     f"keep batch_size x gradient_accumulation x processes at {old} (a smaller batch_size with more "
                     "accumulation trains the same steps), or a new --output-dir")]


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def _writable(folder: Path) -> str | None:
    """None if a file can be created in ``folder``, else why not (a probe file, removed at once:
    os.access says yes to root on a read-only file system)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sftlab-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def _trained_batch(run: Path) -> tuple[int | None, float | None]:
    """(global batch, learning rate) the last complete checkpoint of ``run`` was trained at: its own record
    (:data:`sftlab.rundir.CHECKPOINT_BATCH`), else the run's config.yaml; None when unknown."""
    ckpt = last_good_checkpoint(run / A.CHECKPOINTS)
    try:
        rec = json.loads((ckpt / A.CHECKPOINT_BATCH).read_text(encoding="utf-8")) if ckpt else None
    except (OSError, ValueError):
        rec = None
    if isinstance(rec, dict) and isinstance(rec.get("global_batch"), int):
        return rec["global_batch"], rec.get("learning_rate")
    was = (_saved(run, "batch_size"), _saved(run, "gradient_accumulation"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in was):
        return None, None
    # a run from before the record: assume the processes it ran on are today's
    return was[0] * was[1] * int(os.environ.get("WORLD_SIZE", "1")), _saved(run, "learning_rate")


def _saved(run: Path, key: str):
    """``key`` of the run already in ``run`` (its config.yaml), None when there is none to read."""
    try:
        saved = yaml.safe_load((run / A.CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return saved.get(key) if isinstance(saved, dict) else None


def run_folder_findings(cfg: Config) -> list[Finding]:
    """Errors the run would meet before its first step: an output_dir that is (or sits under) a file,
    is not writable or already holds a run (without ``resume``: a new run would mix its files with the
    old run's), ``resume`` with no complete checkpoint or of a run already complete, ``max_steps`` 0."""
    out: list[Finding] = []
    run = Path(cfg.output_dir).expanduser()
    where = _nearest_existing(run.absolute())
    if where.exists() and not where.is_dir():
        what = "is a file" if where == run.absolute() else f"is under {where}, which is a file"
        out.append(_finding("output_dir", "error", f"output_dir {cfg.output_dir} {what}",
                            "--output-dir a folder (new or existing)"))
    elif (why := _writable(where)) is not None:
        out.append(_finding("output_dir", "error", f"output_dir {cfg.output_dir} cannot be written in {where}: {why}",
                            "--output-dir a folder you can write"))
    # global rank 0 alone: another process (a later node, a Ray worker) may already see its first files
    elif not cfg.resume and is_global_main() and (held := A.RunDir(run).run_files()):
        out.append(Finding("output_dir", "error", f"{cfg.output_dir} holds a run", where="output_dir",
                           evidence=[f"found: {', '.join(held)}"],
                           fixes=["pass --resume to continue it, choose another --output-dir, or remove it"]))
    elif cfg.resume and last_good_checkpoint(run / A.CHECKPOINTS) is None:
        out.append(_finding("resume", "error", f"resume: {run / A.CHECKPOINTS} holds no complete checkpoint",
                            "start without --resume (or point --output-dir at the interrupted run)"))
    elif cfg.resume and (was := _saved(run, "method")) not in (None, cfg.method):
        out.append(_finding("resume", "error", f"resume: the run in {run} trained with method {was}, not {cfg.method}",
                            f"--method {was} to continue it, or a new --output-dir"))
    elif cfg.resume and (done := _complete_run(cfg, checkpoint_state(last_good_checkpoint(run / A.CHECKPOINTS)),
                                               _saved(run, "epochs"))):
        out.append(done)
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        out.append(_finding("max_steps", "error", f"max_steps {cfg.max_steps} trains nothing",
                            "--set max_steps=-1 to run every epoch, or a positive step count"))
    return out + tracker_findings(cfg.report_to)


# report_to's items -> the modules any of which transformers' callback for it imports, and the package to install
_TRACKER_MODULES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
                    "mlflow": (("mlflow",), "mlflow"), "trackio": (("trackio",), "trackio")}


def tracker_findings(report_to: list) -> list[Finding]:
    """An error for a tracker in ``report_to`` whose package is not installed: transformers' callback
    would raise (a traceback) when the Trainer is built, after the model and data were loaded."""
    out = []
    for name in report_to:
        modules, package = _TRACKER_MODULES.get(name, ((name,), name))
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            out.append(_finding("report_to", "error", f"report_to {name}: the {package} package is not installed",
                                f"pip install {package}, or drop {name} from report_to"))
    return out


def step_findings(total_steps: int) -> list[Finding]:
    """An error when the run would take no optimizer step."""
    if total_steps > 0:
        return []
    return [_finding("steps", "error", "the run has 0 optimizer steps", "raise epochs or max_steps, or add data")]


def tools_dropped(prepared: Prepared) -> list[Finding]:
    """A warning when the data offers tools the template does not render (calls it drops are an error
    in labelling already): the model trains without ever seeing the schemas it is meant to use."""
    found: list[Finding] = []
    if prepared.template is not None and any(c.tools for c in prepared.conversations):
        template_tool_check([c for c in prepared.conversations if c.tools], prepared.template, found)
    return [replace(f, severity="warning") for f in found]
