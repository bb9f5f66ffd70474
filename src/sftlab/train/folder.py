"""The run folder's writes during training: creating it (and finding the checkpoint to resume from),
removing what a cut-off save left, turning a failed write into one line, and the final save."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from sftlab import rundir as A
from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.core.io import USER_ERRNOS, atomic_dir, describe_os_error, write_error
from sftlab.train.checks import checkpoints, last_good_checkpoint


def start_run_folder(rc: Config, run: Path) -> str | None:
    """Create the run folder; returns the checkpoint to resume from (``resume``), else None."""
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(run, exc, kept=False) from None
    if not rc.resume:  # the folder holds no run (run_folder_findings): nothing old to clear
        return None
    ckpt_dir = run / A.CHECKPOINTS
    resume_from = last_good_checkpoint(ckpt_dir)
    if resume_from is None:
        raise SftlabError(f"{run}: no complete checkpoint to resume from", hint="start without resume=true")
    drop_incomplete_checkpoints(ckpt_dir, after=resume_from)
    return str(resume_from)


def drop_incomplete_checkpoints(ckpt_dir: Path, *, after: Path | None) -> list[Path]:
    """Remove what a kill or a full disk left of a save: the trainer's staging folders, and any checkpoint
    folder without its trainer state newer than ``after``, so a resume never takes one for the last
    checkpoint. Returns what was removed."""
    last = int(after.name.split("-")[-1]) if after is not None else -1
    cut = [p for step, p, ok in checkpoints(ckpt_dir) if not ok and step > last]
    cut += sorted(ckpt_dir.glob(".staging-checkpoint-*")) if ckpt_dir.is_dir() else []
    for p in cut:
        print(f"removing {p}: an incomplete checkpoint (the save was cut off)", file=sys.stderr, flush=True)
        shutil.rmtree(p, ignore_errors=True)
    return cut


def save_failed(ckpt_dir: Path, exc: OSError) -> SftlabError:
    """A write failed during training (a checkpoint save, the metrics log): drop the cut-off checkpoint,
    keep the last good one, and say so in one line. Errors no user can fix are re-raised as they are."""
    if exc.errno not in USER_ERRNOS:
        raise exc
    good = last_good_checkpoint(ckpt_dir)
    drop_incomplete_checkpoints(ckpt_dir, after=good)
    what = describe_os_error(exc)
    if good is None:
        return SftlabError(f"training stopped: cannot write in {ckpt_dir.parent}: {what}; no checkpoint was kept",
                           hint="free some space and run again")
    return SftlabError(f"training stopped: cannot write in {ckpt_dir.parent}: {what}; the last good checkpoint "
                       f"{good.name} is kept", hint="free some space, then continue with --resume")


def save_final(trainer, tok, template, out: Path) -> None:
    """The adapter or model, and the tokenizer carrying the exact chat template used in training.

    Written by the main process only; under FSDP/DeepSpeed every process joins the gather of the
    sharded weights (Trainer.save_model writes on the main process alone)."""
    if not trainer.args.should_save:
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            trainer.save_model(str(out))
        return
    with atomic_dir(out) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle: never ship one
        if template is not None:
            tok.chat_template = template.source
        tok.save_pretrained(str(tmp))
