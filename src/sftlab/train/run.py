"""train(cfg): tokenizer -> data -> model (+PEFT) -> Trainer -> run folder. Fits on one screen."""

from __future__ import annotations

import json
import os
import time
import weakref
from pathlib import Path

from sftlab import rundir as A
from sftlab.config import Config
from sftlab.core.attention import AttentionSwitch
from sftlab.core.errors import SftlabError
from sftlab.core.hardware import peak_memory_mb
from sftlab.core.io import atomic_dir, atomic_write_text
from sftlab.data.collate import PackedCollator, PadCollator
from sftlab.data.packing import pack
from sftlab.data.prepare import prepare
from sftlab.models import load_tokenizer, model_config
from sftlab.plan.shapes import shape_from_config
from sftlab.train.callbacks import MetricsLogger, SignalCheckpoint
from sftlab.train.checks import checklist, resolve_auto
from sftlab.train.continual import EWC, mix_replay
from sftlab.train.model import build_model
from sftlab.train.trainer import Divergence, SFTTrainer


def _count_params(model_cfg) -> int:
    return shape_from_config(model_cfg, "model").params


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _example_key(ex) -> tuple:
    return tuple(ex.input_ids)


def train(cfg: Config, *, check_only: bool = False, quiet: bool = False, callbacks: list | None = None) -> dict:
    """Run one fine-tune as configured; returns the summary written to the run folder."""
    import torch  # deferred: heavy library, imported on first use
    from transformers import (  # deferred: heavy library, imported on first use
        TrainingArguments,
        set_seed,
    )

    set_seed(cfg.seed)
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data = prepare(cfg, tok)
    evald = prepare(cfg, tok, data=cfg.eval_data) if cfg.eval_data else None
    general = prepare(cfg, tok, data=cfg.replay_data) if cfg.replay_data else None
    if (cfg.replay_ratio > 0 or cfg.ewc_lambda > 0) and general is None:
        raise SftlabError("replay_ratio and ewc_lambda need general data", hint="--set replay_data=FILE")

    mcfg = model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    n_params = _count_params(mcfg)
    seq_len = min(cfg.max_seq_length, max(len(e.input_ids) for e in data.examples)) if not cfg.packing else cfg.max_seq_length
    rc = resolve_auto(cfg, n_params=n_params, n_examples=len(data.examples), model_cfg=mcfg, seq_len=seq_len)
    findings = checklist(rc, n_params=n_params, n_examples=len(data.examples), seq_len=seq_len, model_cfg=mcfg,
                         train_keys={_example_key(e) for e in data.examples},
                         eval_keys={_example_key(e) for e in evald.examples} if evald else set(), report=data.report)
    if not quiet or check_only:
        for f in findings:
            print(f"check {f}")
        if not findings:
            print("check: configuration looks sound")
    if check_only:
        return {"findings": [f.__dict__ for f in findings], "resolved": rc.to_dict()}

    model, ewc_loss_fn = build_model(rc, tok, data.added_tokens)
    train_examples, n_replay = mix_replay(data.examples, general.examples if general else [], rc.replay_ratio, rc.seed)

    attn = getattr(model.config, "_attn_implementation", "sdpa")
    if rc.packing:
        if rc.method == "prefix":
            raise SftlabError("packing does not work with prefix tuning", hint="--set packing=false")
        train_ds = pack(train_examples, rc.max_seq_length)
        mode = "flash" if "flash" in str(attn) else "mask"
        collator = PackedCollator(tok.pad_token_id, mode=mode,
                                  mask_dtype=None if attn == "sdpa" else model.dtype)
        lengths = None
    else:
        train_ds = train_examples
        collator = PadCollator(tok.pad_token_id)
        lengths = [len(e.input_ids) for e in train_examples] if rc.group_by_length else None

    run = Path(rc.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run / A.CHECKPOINTS
    resume_from = None
    if rc.resume:
        from transformers.trainer_utils import (
            get_last_checkpoint,  # deferred: heavy library, imported on first use
        )

        resume_from = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None
        if resume_from is None:
            raise SftlabError(f"{run}: no checkpoint to resume from", hint="start without resume=true")
    elif (run / A.METRICS).exists():
        (run / A.METRICS).unlink()  # a fresh run in an old folder starts a fresh log
    has_eval = evald is not None
    eval_steps = min(rc.eval_steps, rc.save_steps) if has_eval else rc.eval_steps
    save_steps = rc.save_steps if not has_eval else max(eval_steps, (rc.save_steps // eval_steps) * eval_steps)
    args = TrainingArguments(
        output_dir=str(ckpt_dir), num_train_epochs=float(rc.epochs), max_steps=rc.max_steps,
        per_device_train_batch_size=int(rc.batch_size), per_device_eval_batch_size=int(rc.batch_size),
        gradient_accumulation_steps=int(rc.gradient_accumulation), learning_rate=float(rc.learning_rate),
        weight_decay=rc.weight_decay, warmup_steps=rc.warmup_ratio, lr_scheduler_type=rc.lr_scheduler,
        max_grad_norm=rc.max_grad_norm,
        optim={"adamw": "adamw_torch", "adam": "adamw_torch", "sgd": "sgd", "adamw8bit": "adamw_bnb_8bit"}[rc.optimizer],
        bf16=rc.precision == "bf16", fp16=rc.precision == "fp16",
        logging_steps=rc.logging_steps, eval_strategy="steps" if has_eval else "no", eval_steps=eval_steps,
        save_strategy="steps", save_steps=save_steps, save_total_limit=rc.save_total_limit,
        load_best_model_at_end=rc.load_best_model_at_end and has_eval, metric_for_best_model="eval_loss",
        greater_is_better=False, report_to=list(rc.report_to) or "none", seed=rc.seed, data_seed=rc.seed,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=quiet,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and _world_size() > 1 else None,
        activation_checkpointing=bool(rc.gradient_checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False}, save_only_model=False,
        average_tokens_across_devices=True, ddp_find_unused_parameters=False,
        deepspeed=rc.deepspeed, fsdp=rc.fsdp or "",
    )
    if rc.optimizer == "adam":
        args.weight_decay = 0.0
    from transformers import (
        EarlyStoppingCallback,  # deferred: heavy library, imported on first use
    )

    ewc = None
    if rc.ewc_lambda > 0:
        sample = general.examples[: rc.ewc_samples]
        batches = [PadCollator(tok.pad_token_id)(sample[i:i + 4]) for i in range(0, len(sample), 4)]
        batches = [{k: v.to(model.device) for k, v in b.items()} for b in batches]
        ewc = EWC(model, batches, ewc_loss_fn, rc.ewc_lambda)

    switch = None
    if rc.attn_implementation == "auto" and not rc.packing:
        switch = AttentionSwitch(model, compute_bytes=2 if rc.precision in ("bf16", "fp16") else 4)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=evald.examples if evald else None,
                         data_collator=collator, processing_class=tok, attention_switch=switch,
                         loss_mode=rc.loss, label_smoothing=rc.label_smoothing, ewc=ewc, group_lengths=lengths,
                         general_examples=general.examples if general else None,
                         gen_template=data.template, gen_conversations=evald.conversations if evald else None,
                         gen_limit=rc.eval_generate)
    logger = MetricsLogger(run / A.METRICS, weakref.ref(trainer), quiet=quiet)
    stopper = SignalCheckpoint()
    from transformers.trainer_callback import (  # deferred: heavy library, imported on first use
        PrinterCallback,
        ProgressCallback,
    )

    trainer.remove_callback(ProgressCallback)  # our logger draws the bar with loss, lr and tokens/s
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(logger)
    trainer.add_callback(stopper)
    for cb in callbacks or []:
        trainer.add_callback(cb)
    if has_eval and rc.early_stopping_patience > 0:
        trainer.add_callback(EarlyStoppingCallback(rc.early_stopping_patience, rc.early_stopping_min_delta))

    rc.save(run / A.CONFIG)
    (run / A.PREPARE_REPORT).write_text(json.dumps(data.report.to_dict(), indent=2))
    t0 = time.perf_counter()
    stopped, divergence = "completed", None
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except Divergence as exc:
        stopped, divergence, result = "diverged", {"step": exc.step, "loss": exc.loss}, None
    finally:
        stopper.uninstall()
    elapsed = time.perf_counter() - t0
    if stopper.requested:
        stopped = "interrupted"
    elif stopped == "completed" and trainer.state.max_steps and trainer.state.global_step < trainer.state.max_steps:
        stopped = "early_stopping"

    final_eval = None
    if has_eval and stopped in ("completed", "early_stopping"):
        last = [r for r in logger.rows if r.get("split") == "eval"]
        if last and last[-1]["step"] == trainer.state.global_step and not args.load_best_model_at_end:
            final_eval = {k: v for k, v in last[-1].items() if k.startswith("eval_")}
        else:
            final_eval = trainer.evaluate()
    if stopped in ("completed", "early_stopping") and trainer.args.should_save:
        _save_final(trainer, tok, data.template, run / A.MODEL_DIR)

    tokens, trained = trainer.tokens_seen, trainer.trained_tokens_seen
    if _world_size() > 1 and torch.distributed.is_initialized():  # count every process's tokens
        t = torch.tensor([tokens, trained], device=trainer.args.device)
        torch.distributed.all_reduce(t)
        tokens, trained = int(t[0]), int(t[1])
    train_rows = [r for r in logger.rows if r.get("split") == "train" and r.get("loss") is not None]
    eval_rows = [r for r in logger.rows if r.get("split") == "eval"]
    summary = {
        "method": rc.method, "base_model": rc.model, "template": data.template.name if data.template else None,
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "examples": len(data.examples), "replay_examples": n_replay,
        "train_tokens": tokens, "trained_tokens": trained,
        "time_s": round(elapsed, 2), "tokens_per_second": tokens / max(elapsed, 1e-9),
        "trained_tokens_per_second": trained / max(elapsed, 1e-9),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "final_train_loss": train_rows[-1]["loss"] if train_rows else (result.training_loss if result else None),
        "final_eval_loss": final_eval["eval_loss"] if final_eval else None,
        "best_eval_loss": min((r["eval_loss"] for r in eval_rows if r.get("eval_loss") is not None), default=None),
        "stopped": stopped, "divergence": divergence, "prepare": data.report.to_dict(),
        "pad_equals_eos": tok.pad_token_id == tok.eos_token_id, "eos_trained": True,
        "gradient_checkpointing": bool(rc.gradient_checkpointing), "packing": rc.packing,
        "attention_batches": dict(switch.counts) if switch is not None and switch.counts else None,
        "findings": [str(f) for f in findings],
    }
    if trainer.args.should_save:
        atomic_write_text(run / A.SUMMARY, json.dumps(summary, indent=2, default=str))
    if stopped == "diverged":
        raise SftlabError(f"training diverged: loss became {divergence['loss']} at step {divergence['step']}",
                          hint=f"lower the learning rate (now {float(rc.learning_rate):g}) and check the data with `sftlab doctor`")
    return summary


def _save_final(trainer, tok, template, out: Path) -> None:
    """The adapter or model, and the tokenizer carrying the exact chat template used in training."""

    with atomic_dir(out) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle: never ship one
        if template is not None:
            tok.chat_template = template.source
        tok.save_pretrained(str(tmp))
