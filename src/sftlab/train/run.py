"""train(cfg): one fine-tune as a sequence of named steps, each a function below, in order:

data (tokenizer, prepared train/eval/replay data) -> resolve and check (``auto`` values, pre-flight
checklist) -> model (+PEFT) -> batches -> run folder -> training arguments -> trainer (collator,
callbacks, EWC, attention switch) -> fit (train, final evaluation, save) -> summary.
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from sftlab import rundir as A
from sftlab.config import Config
from sftlab.core.attention import AttentionSwitch
from sftlab.core.errors import SftlabError
from sftlab.core.findings import Finding
from sftlab.core.hardware import peak_memory_mb
from sftlab.core.io import (
    atomic_write_text,
)
from sftlab.data.collate import PackedCollator, PadCollator
from sftlab.data.packing import pack
from sftlab.data.prepare import Prepared, prepare
from sftlab.eval.run import prompts_as_trained, training_eval
from sftlab.models import load_tokenizer, model_config
from sftlab.plan.auto import describe_auto, describe_precision, resolve_auto
from sftlab.plan.shapes import shape_from_config
from sftlab.rundir import Summary
from sftlab.train.callbacks import (
    MetricsLogger,
    SignalCheckpoint,
    put_before_trackers,
    route_tensorboard,
    set_train_malloc,
    tracker_env,
)
from sftlab.train.checks import (
    checklist,
    checkpoint_steps,
    name_plan_command,
    run_folder_findings,
    tools_dropped,
)
from sftlab.train.continual import ewc_from_examples, mix_replay
from sftlab.train.distributed import (
    distributed_summary,
    is_global_main,
    sharding_arguments,
    world_size,
)
from sftlab.train.epochs import drawn_epochs, epoch_rows
from sftlab.train.folder import save_failed, save_final, start_run_folder
from sftlab.train.kernels import fused_loss_fn
from sftlab.train.merge import check_preview, speed_choices
from sftlab.train.model import build_model
from sftlab.train.trainer import Divergence, SftlabTrainer

# torch's fused AdamW (transformers' own default since torch 2.8): one kernel per step, no temporaries; on CPU
# 9 ms against the per-tensor loop's 45 ms for the default model's 420 adapter tensors (2 cores).
_OPTIMIZERS = {"adamw": "adamw_torch_fused", "adam": "adamw_torch_fused", "sgd": "sgd", "adamw8bit": "adamw_bnb_8bit"}
_FINISHED = ("completed", "early_stopping")  # stops after which the model is evaluated and saved
# checklist errors the run cannot start with (the run-folder ones are checked first)
_FATAL = ("steps", "packing", "lora_target_modules", "max_seq_length", "sharding")  # max_seq_length: only past learned positions


@dataclass
class RunData:
    """The tokenizer and the prepared data: training, eval (optional), general replay data (optional)."""

    tok: object
    train: Prepared
    eval: Prepared | None
    general: Prepared | None


@dataclass
class Batches:
    """What the Trainer iterates: the dataset (examples, or packed rows), its collator, the example
    lengths for length-grouped sampling, and the sampler of a mixture drawn afresh each epoch (both
    None: Trainer's default sampler)."""

    dataset: list
    collator: object
    lengths: list[int] | None
    sampler: object = None


@dataclass
class Harness:
    """The Trainer and what runs beside it."""

    trainer: SftlabTrainer
    logger: MetricsLogger  # metrics.jsonl; its rows feed the summary
    stopper: SignalCheckpoint  # Ctrl-C / SIGTERM: checkpoint and stop
    switch: AttentionSwitch | None  # per-batch kernel under attn_implementation=auto
    notes: dict  # what the auto choices rest on: precision_probe, kernels


@dataclass
class Fitted:
    """What fitting did."""

    stopped: str  # completed | early_stopping | interrupted | diverged
    divergence: dict | None  # {"step", "loss"} when diverged
    result: object  # Trainer's TrainOutput; None when diverged
    elapsed: float  # seconds in Trainer.train
    final_eval: dict | None  # the eval row at the last step


def train(cfg: Config, *, check_only: bool = False, quiet: bool = False, callbacks: list | None = None,
          notes: dict | None = None) -> dict:
    """Run one fine-tune as configured; returns the summary written to the run folder.

    ``notes``: what the caller decided before the run, kept in the summary (``lr_sweep``: the
    learning-rate range test of ``train/find_lr.py``).

    ``check_only``: print nothing, train nothing; return ``{"findings": [Finding dicts], "resolved":
    the config with every auto value resolved, "precision_probe", "auto": the line saying what auto chose,
    "merge": what ``merge_micro_batches`` will do (``train/merge.py``'s preview), "memory": the estimate's line}``.
    """
    from transformers import set_seed  # deferred: heavy library, imported on first use

    set_seed(cfg.seed)
    blockers = run_folder_findings(cfg)  # cheap, and fatal: before any loading
    if blockers and not check_only:
        raise SftlabError(blockers[0].message, hint=blockers[0].fixes[0])
    data = load_data(cfg)
    rc, findings, resolved_notes = resolve_and_check(cfg, data)
    notes = {**resolved_notes, **(notes or {})}
    findings = name_plan_command(blockers + findings, notes.get("plan_command"))
    if check_only:
        lengths = None if rc.packing else [len(e.input_ids) for e in data.train.examples]
        mcfg, seq_len = model_config(cfg.model, trust_remote_code=cfg.trust_remote_code), max(lengths or [int(rc.max_seq_length)])
        return {"findings": [f.to_dict() for f in findings], "resolved": rc.to_dict(), "precision_probe": notes.get("precision_probe"),
                "auto": notes.get("auto"), **check_preview(rc, mcfg, lengths, seq_len=seq_len)}  # memory: of the micro-batch that runs
    raise_on_fatal(findings)  # one error line, not the checklist around it
    if not quiet:
        print_checks(findings, notes.get("auto"))
    set_train_malloc()  # before the model's tensors exist
    kernels: list = []
    model, ewc_loss_fn = build_model(rc, data.tok, data.train.added_tokens, kernels_out=kernels,
                                     template=data.train.template)
    general = data.general.examples if data.general else []
    train_examples, n_replay = mix_replay(data.train.examples, general, rc.replay_ratio, rc.seed)
    batches = training_batches(rc, train_examples, data.tok, model, data.train)
    rc = speed_choices(rc, model, batches, kernels, notes, quiet=quiet)
    run = Path(rc.output_dir)
    resume_from = start_run_folder(rc, run)
    args = training_arguments(rc, run / A.CHECKPOINTS, has_eval=data.eval is not None, quiet=quiet)
    trainer, switch = build_trainer(rc, data, model, ewc_loss_fn, args, batches, fused_ce=fused_loss_fn(kernels))
    logger, stopper = attach_callbacks(trainer, rc, run, quiet=quiet, extra=callbacks or [])
    h = Harness(trainer, logger, stopper, switch, notes)
    fitted = fit(h, rc, data, run, resume_from)
    summary = summarize(rc, data, h, fitted, n_replay=n_replay, findings=findings).to_dict()
    if h.trainer.args.should_save:
        atomic_write_text(run / A.SUMMARY, json.dumps(summary, indent=2, default=str))
    if fitted.stopped == "diverged":
        div = fitted.divergence
        raise SftlabError(f"training diverged: loss became {div['loss']} at step {div['step']}",
                          hint=f"lower the learning rate (now {float(rc.learning_rate):g}) "
                               "and check the data with `sftlab doctor`")
    return summary


# -- data, resolve and check ---------------------------------------------------------------------
def load_data(cfg: Config) -> RunData:
    """The tokenizer and every data set of the run, tokenized and labelled."""
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data = prepare(cfg, tok)
    evald = prepare(cfg, tok, data=cfg.eval_data, key="eval_data") if cfg.eval_data else None
    general = prepare(cfg, tok, data=cfg.replay_data) if cfg.replay_data else None
    if (cfg.replay_ratio > 0 or cfg.ewc_lambda > 0) and general is None:
        raise SftlabError("replay_ratio and ewc_lambda need general data", hint="--set replay_data=FILE")
    return RunData(tok, data, evald, general)


def _example_keys(examples: list | None) -> set[tuple]:
    return {tuple(e.input_ids) for e in examples} if examples else set()


def resolve_and_check(cfg: Config, data: RunData) -> tuple[Config, list[Finding], dict]:
    """The config with every ``auto`` resolved for this model, data and machine; the checklist's
    findings; notes on what the choices rest on (``precision_probe``: see :func:`resolve_auto`)."""
    examples = data.train.examples  # one epoch (a mixture's epochs draw from data.train.usable)
    mcfg = model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    n_params = shape_from_config(mcfg, "model").params
    longest = max(len(e.input_ids) for e in data.train.usable)
    seq_len = cfg.max_seq_length if cfg.packing else min(cfg.max_seq_length, longest)
    notes: dict = {}
    rc = resolve_auto(cfg, n_params=n_params, n_examples=len(examples), model_cfg=mcfg, seq_len=seq_len, notes=notes)
    notes["auto"] = describe_auto(cfg, rc, n_params=n_params, n_examples=len(examples), probe=notes.get("precision_probe"), batch=notes.pop("batch_size", None))
    findings = checklist(rc, n_params=n_params, n_examples=len(examples), seq_len=seq_len, model_cfg=mcfg,
                         train_keys=_example_keys(data.train.usable),  # any epoch may draw any of them
                         eval_keys=_example_keys(data.eval.examples if data.eval else None),
                         report=data.train.report, n_rows=epoch_rows(rc, examples, data.general.examples if data.general else [])) + tools_dropped(data.train)
    rc.eval_steps, rc.save_steps = checkpoint_steps(rc, has_eval=data.eval is not None)  # the checklist says why
    for key, prepared in (("data", data.train), ("eval_data", data.eval)):  # a mixture, as counts
        if prepared is not None and prepared.mixture is not None:
            setattr(rc, key, prepared.mixture.resolved())
            findings += prepared.mixture.unused_findings(key)
    if rc.packing and data.train.draw is not None:
        findings.append(Finding("mixture", "info", "packing: the mixture is drawn once for the run (its first epoch, "
                                "packed); every epoch trains on those rows", where="data",
                                fixes=["--set packing=false to draw every epoch afresh"]))
    return rc, findings, notes


def raise_on_fatal(findings: list[Finding]) -> None:
    """The first checklist error the run cannot start with, as one clear error."""
    if errors := [f for f in findings if f.rule in _FATAL and f.severity == "error"]:
        raise SftlabError(errors[0].message, hint=errors[0].fixes[0])


def print_checks(findings: list[Finding], chosen: str | None = None) -> None:
    """The checklist, then what the `auto` keys became (``chosen``: :func:`describe_auto`'s line)."""
    if chosen:
        print(chosen)
    for f in findings:
        print(f"check {f}")
    if not findings:
        print("check: configuration looks sound")


# -- batches, run folder, training arguments -----------------------------------------------------
def training_batches(rc: Config, examples: list, tok, model, prepared: Prepared | None = None) -> Batches:
    """Packed rows with a packed collator (``packing``), or the examples padded per batch.

    ``examples``: one epoch (``prepared.examples``), then any replay examples. When ``prepared`` is a
    weighted (or counted) mixture, each epoch without packing is a fresh draw from its pool
    (``train/epochs.py``); packing packs ``examples`` once and every epoch passes over those rows.
    """
    if not rc.packing and prepared is not None and prepared.draw is not None:
        group = int(rc.batch_size) * int(rc.gradient_accumulation) if rc.group_by_length else None
        replay = examples[len(prepared.examples):]
        dataset = drawn_epochs(prepared.pool, prepared.draw, replay, seed=rc.seed, group_size=group)
        return Batches(dataset, PadCollator(tok.pad_token_id), None, dataset.sampler)
    if not rc.packing:
        lengths = [len(e.input_ids) for e in examples] if rc.group_by_length else None
        return Batches(examples, PadCollator(tok.pad_token_id), lengths)
    if rc.method == "prefix":
        raise SftlabError("packing does not work with prefix tuning", hint="--set packing=false")
    attn = getattr(model.config, "_attn_implementation", "sdpa")
    collator = PackedCollator(tok.pad_token_id, mode="flash" if "flash" in str(attn) else "mask",
                              mask_dtype=None if attn == "sdpa" else model.dtype)
    return Batches(pack(examples, rc.max_seq_length), collator, None)


def training_arguments(rc: Config, ckpt_dir: Path, *, has_eval: bool, quiet: bool):
    """transformers.TrainingArguments for the resolved config; checkpoints fall on eval steps."""
    import torch  # deferred: heavy library, imported on first use
    from transformers import (
        TrainingArguments,  # deferred: heavy library, imported on first use
    )

    cuda = torch.cuda.is_available()
    eval_steps, save_steps = checkpoint_steps(rc, has_eval=has_eval)  # resolve_and_check says when they change
    args = TrainingArguments(
        output_dir=str(ckpt_dir), num_train_epochs=float(rc.epochs), max_steps=rc.max_steps,
        per_device_train_batch_size=int(rc.batch_size), per_device_eval_batch_size=int(rc.batch_size),
        gradient_accumulation_steps=int(rc.gradient_accumulation), learning_rate=float(rc.learning_rate),
        weight_decay=rc.weight_decay, warmup_steps=rc.warmup_ratio, lr_scheduler_type=rc.lr_scheduler,
        max_grad_norm=rc.max_grad_norm, optim=_OPTIMIZERS[rc.optimizer],
        bf16=rc.precision == "bf16", fp16=rc.precision == "fp16",
        logging_steps=rc.logging_steps, eval_strategy="steps" if has_eval else "no", eval_steps=eval_steps,
        save_strategy="steps", save_steps=save_steps, save_total_limit=rc.save_total_limit,
        load_best_model_at_end=rc.load_best_model_at_end and has_eval, metric_for_best_model="eval_loss",
        greater_is_better=False, report_to=list(rc.report_to) or "none", seed=rc.seed, data_seed=rc.seed,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=quiet,
        dataloader_pin_memory=cuda, use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and world_size() > 1 else None,
        activation_checkpointing=bool(rc.gradient_checkpointing) and not rc.fsdp,  # FSDP: its own, below
        activation_checkpointing_kwargs={"use_reentrant": False}, save_only_model=False,
        average_tokens_across_devices=True, ddp_find_unused_parameters=False,
        run_name=rc.run_name or Path(rc.output_dir).resolve().name, **({"project": rc.project} if rc.project else {}),
        **sharding_arguments(rc, cuda),
    )
    if rc.optimizer == "adam":
        args.weight_decay = 0.0
    return args


# -- trainer -------------------------------------------------------------------------------------
def build_trainer(rc: Config, data: RunData, model, ewc_loss_fn, args, batches: Batches,
                  fused_ce=None) -> tuple[SftlabTrainer, AttentionSwitch | None]:
    """The Trainer with sftlab's loss (``fused_ce``: the fused cross entropy chosen by ``fused_loss``),
    EWC, attention switch and evaluation (``training_eval``)."""
    ewc = None
    if rc.ewc_lambda > 0:
        ewc = ewc_from_examples(model, data.general.examples[: rc.ewc_samples], ewc_loss_fn, rc.ewc_lambda,
                                data.tok.pad_token_id)
    switch = None
    if rc.attn_implementation == "auto" and not rc.packing:
        switch = AttentionSwitch(model, compute_bytes=2 if rc.precision in ("bf16", "fp16") else 4)
    evald = data.eval
    trainer = SftlabTrainer(model=model, args=args, train_dataset=batches.dataset,
                            eval_dataset=evald.examples if evald else None, data_collator=batches.collator,
                            processing_class=data.tok, evaluate_fn=training_eval, attention_switch=switch,
                            loss_mode=rc.loss, label_smoothing=rc.label_smoothing, ewc=ewc,
                            group_lengths=batches.lengths, train_sampler=batches.sampler,
                            general_examples=data.general.examples if data.general else None,
                            gen_template=data.train.template,
                            gen_conversations=prompts_as_trained(evald.conversations, rc.reasoning) if evald else None,
                            gen_limit=rc.eval_generate, fused_ce=fused_ce)
    return trainer, switch


def attach_callbacks(trainer: SftlabTrainer, rc: Config, run: Path, *, quiet: bool,
                     extra: list) -> tuple[MetricsLogger, SignalCheckpoint]:
    """Our metrics logger (it draws the progress bar) replaces Trainer's printers; then the signal
    checkpoint, the caller's callbacks and early stopping."""
    from transformers import (
        EarlyStoppingCallback,  # deferred: heavy library, imported on first use
    )
    from transformers.trainer_callback import (  # deferred: heavy library, imported on first use
        PrinterCallback,
        ProgressCallback,
    )

    logger = MetricsLogger(run / A.METRICS, weakref.ref(trainer), quiet=quiet)
    stopper = SignalCheckpoint()
    trainer.remove_callback(ProgressCallback)  # our logger draws the bar with loss, lr and tokens/s
    trainer.remove_callback(PrinterCallback)
    put_before_trackers(trainer, logger)  # its throughput numbers reach the trackers' callbacks
    route_tensorboard(trainer, run / "tensorboard")
    for cb in (stopper, *extra):
        trainer.add_callback(cb)
    if trainer.eval_dataset is not None and rc.early_stopping_patience > 0:
        trainer.add_callback(EarlyStoppingCallback(rc.early_stopping_patience, rc.early_stopping_min_delta))
    return logger, stopper


# -- fit -----------------------------------------------------------------------------------------
def fit(h: Harness, rc: Config, data: RunData, run: Path, resume_from: str | None) -> Fitted:
    """Write the resolved config and prepare report, train, evaluate at the end, save the model."""
    if is_global_main():
        rc.save(run / A.CONFIG)
        comments = [h.notes["auto"]] if h.notes.get("auto") else []
        if (merge := h.notes.get("merge")) and merge["enabled"]:
            comments.append(f"merge_micro_batches: batch_size and gradient_accumulation above run the step as one "
                            f"micro-batch ({merge['reason']})")
        if h.notes.get("precision_probe"):
            comments.append(describe_precision(rc.precision, h.notes["precision_probe"]))
        if sweep := h.notes.get("lr_sweep"):
            comments.append(f"learning_rate from the range test (--find-lr): {sweep['reason']}")
        if comments:  # comments: the file stays a config that loads as it is
            atomic_write_text(run / A.CONFIG, (run / A.CONFIG).read_text() + "".join(f"# {c}\n" for c in comments))
        atomic_write_text(run / A.PREPARE_REPORT, json.dumps(data.train.report.to_dict(), indent=2))
    trainer = h.trainer
    t0 = time.perf_counter()
    stopped, divergence, result = "completed", None, None
    h.stopper.install()
    try:
        with tracker_env(rc.project):
            result = trainer.train(resume_from_checkpoint=resume_from)
    except Divergence as exc:
        stopped, divergence = "diverged", {"step": exc.step, "loss": exc.loss}
    except OSError as exc:
        raise save_failed(run / A.CHECKPOINTS, exc) from None
    finally:
        h.stopper.uninstall()
    elapsed = time.perf_counter() - t0
    if h.stopper.requested:
        stopped = "interrupted"
    elif stopped == "completed" and trainer.state.max_steps and trainer.state.global_step < trainer.state.max_steps:
        stopped = "early_stopping"
    final_eval = final_evaluation(h) if data.eval is not None and stopped in _FINISHED else None
    if stopped in _FINISHED:
        if trainer.args.should_save:
            h.logger.say(f"saving the model to {run / A.MODEL_DIR}")
        save_final(trainer, data.tok, data.train.template, run / A.MODEL_DIR)
    return Fitted(stopped, divergence, result, elapsed, final_eval)


def final_evaluation(h: Harness) -> dict:
    """The eval row of the weights the run ends with: the logged one when it was taken of them (the last
    step's, unless the best checkpoint was restored from an earlier step), else a fresh evaluation."""
    last = [r for r in h.logger.rows if r.get("split") == "eval"]
    state = h.trainer.state
    best = state.best_model_checkpoint if h.trainer.args.load_best_model_at_end else None
    same_weights = best is None or Path(best).name == f"checkpoint-{state.global_step}"
    if last and last[-1]["step"] == state.global_step and same_weights:
        return {k: v for k, v in last[-1].items() if k.startswith("eval_")}
    h.logger.say(f"final evaluation on {len(h.trainer.eval_dataset)} eval examples")
    h.logger.final = True  # its eval line reads "final", not a second "step N" line
    return h.trainer.evaluate()


# -- summary -------------------------------------------------------------------------------------
def _tokens_seen(trainer) -> tuple[int, int]:
    """(tokens read, tokens trained) by every process."""
    import torch  # deferred: heavy library, imported on first use

    tokens, trained = trainer.tokens_seen, trainer.trained_tokens_seen
    if world_size() > 1 and torch.distributed.is_initialized():  # count every process's tokens
        t = torch.tensor([tokens, trained], device=trainer.args.device)
        torch.distributed.all_reduce(t)
        tokens, trained = int(t[0]), int(t[1])
    return tokens, trained


def summarize(rc: Config, data: RunData, h: Harness, fitted: Fitted, *, n_replay: int,
              findings: list[Finding]) -> Summary:
    """summary.json: what the run did, from the trainer's state, the logged rows and the data report."""
    trainer, tok, report = h.trainer, data.tok, data.train.report
    tokens, trained = _tokens_seen(trainer)
    elapsed, final_eval = fitted.elapsed, fitted.final_eval
    train_rows = [r for r in h.logger.rows if r.get("split") == "train" and r.get("loss") is not None]
    eval_losses = [r["eval_loss"] for r in h.logger.rows if r.get("split") == "eval" and r.get("eval_loss") is not None]
    return Summary(
        method=rc.method, base_model=rc.model, template=data.train.template.name if data.train.template else None,
        steps=trainer.state.global_step, epochs=trainer.state.epoch,
        examples=len(data.train.examples), replay_examples=n_replay,
        train_tokens=tokens, trained_tokens=trained,
        time_s=round(elapsed, 2), tokens_per_second=tokens / max(elapsed, 1e-9),
        trained_tokens_per_second=trained / max(elapsed, 1e-9),
        peak_memory_mb=round(peak_memory_mb(), 1),
        final_train_loss=train_rows[-1]["loss"] if train_rows else (fitted.result.training_loss if fitted.result else None),
        final_eval_loss=final_eval["eval_loss"] if final_eval else None,
        best_eval_loss=min(eval_losses, default=None),
        stopped=fitted.stopped, divergence=fitted.divergence, prepare=report.to_dict(),
        pad_equals_eos=tok.pad_token_id == tok.eos_token_id, eos_trained=report.eos_trained,
        gradient_checkpointing=bool(rc.gradient_checkpointing), packing=rc.packing,
        attention_batches=dict(h.switch.counts) if h.switch is not None and h.switch.counts else None,
        findings=[str(f) for f in findings], precision=rc.precision, signal=h.stopper.requested,
        precision_probe=h.notes.get("precision_probe"), kernels=h.notes.get("kernels"), lr_sweep=h.notes.get("lr_sweep"),
        distributed=distributed_summary(trainer), learning_rate=float(rc.learning_rate), merge=h.notes.get("merge"),
        global_batch=trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
    )
