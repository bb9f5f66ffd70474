"""`auto` values and the pre-flight configuration checklist."""

from __future__ import annotations

import dataclasses
import os

from sftlab.config import Config
from sftlab.core.findings import Finding
from sftlab.core.hardware import device_memory_gb, fast_bf16
from sftlab.plan.memory import TrainSetup, estimate_memory
from sftlab.plan.shapes import shape_from_config


def lr_for_size(n_params: int, method: str) -> float:
    """Learning rate by model size (1B: 1e-4, 7B: 2e-5, 13B: 1e-5, 70B: 5e-6)."""
    b = n_params / 1e9
    lr = 1e-4 if b < 4 else 2e-5 if b < 10 else 1e-5 if b < 40 else 5e-6
    return lr


def epochs_for_data(n_examples: int) -> int:
    return 5 if n_examples < 1000 else 3 if n_examples < 10000 else 1


def batch_for_memory(gpu_gb: float | None) -> tuple[int, int]:
    if gpu_gb is not None and gpu_gb >= 79:
        return 4, 4
    if gpu_gb is not None and gpu_gb >= 39:
        return 2, 8
    return 1, 16


def estimated_bytes(cfg: Config, model_cfg, *, batch: int, seq_len: int, checkpointing: bool, device: str) -> int:
    shape = shape_from_config(model_cfg, cfg.model)
    setup = TrainSetup(method=cfg.method,
                       batch=batch, seq_len=seq_len, gradient_checkpointing=checkpointing,
                       device=device, lora_r=cfg.lora_r, prefix_tokens=cfg.prefix_tokens,
                       precision=cfg.precision if cfg.precision in ("bf16", "fp16", "fp32") else "auto",
                       optimizer=cfg.optimizer if cfg.optimizer != "adamw8bit" or device == "cuda" else "adamw",
                       lora_dropout=cfg.lora_dropout,
                       attention="sdpa" if cfg.packing and cfg.attn_implementation == "auto" else cfg.attn_implementation)
    return estimate_memory(shape, setup).total_bytes


def resolve_auto(cfg: Config, *, n_params: int, n_examples: int, model_cfg, seq_len: int) -> Config:
    """A copy of ``cfg`` with every `auto` replaced by the value that will be used."""
    device, mem_gb = device_memory_gb()
    out = dataclasses.replace(cfg)
    if out.learning_rate == "auto":
        out.learning_rate = lr_for_size(n_params, cfg.method)
    if out.epochs == "auto":
        out.epochs = epochs_for_data(n_examples)
    if out.batch_size == "auto" or out.gradient_accumulation == "auto":
        b, ga = batch_for_memory(mem_gb if device == "cuda" else None)
        if out.batch_size == "auto":
            out.batch_size = b
        if out.gradient_accumulation == "auto":
            out.gradient_accumulation = ga
    if out.precision == "auto":
        out.precision = "bf16" if fast_bf16(device) else "fp32"
    if out.gradient_checkpointing == "auto":
        need = estimated_bytes(out, model_cfg, batch=int(out.batch_size), seq_len=seq_len, checkpointing=False,
                               device=device)
        out.gradient_checkpointing = need > 0.9 * mem_gb * 2**30
    return out


def _finding(rule: str, severity: str, message: str, fix: str) -> Finding:
    return Finding(rule, severity, message, fixes=[fix])


def checklist(cfg: Config, *, n_params: int, n_examples: int, seq_len: int, model_cfg,
              train_keys: set, eval_keys: set, report) -> list[Finding]:
    """The configuration checklist, each finding with its fix. ``cfg`` is resolved (no `auto`)."""
    out: list[Finding] = []
    lr = float(cfg.learning_rate)
    ref = lr_for_size(n_params, cfg.method)
    lo, hi = (ref / 10, ref * 10) if cfg.method == "full" else (ref / 10, ref * 30)
    if not lo <= lr <= hi:
        out.append(_finding("learning_rate", "warning", f"learning rate {lr:g} is outside the usual range {lo:g}..{hi:g} for a "
                           f"{n_params / 1e9:.2g}B model ({cfg.method})", f"--set learning_rate={ref:g}"))
    device, mem_gb = device_memory_gb()
    need = estimated_bytes(cfg, model_cfg, batch=int(cfg.batch_size), seq_len=seq_len,
                           checkpointing=bool(cfg.gradient_checkpointing), device=device)
    if need > mem_gb * 2**30:
        out.append(_finding("memory", "error", f"batch {cfg.batch_size} x {seq_len} tokens needs about {need / 2**30:.1f} GiB, "
                           f"{mem_gb:.1f} GiB available", "lower batch_size and raise gradient_accumulation, "
                           "or --set gradient_checkpointing=true"))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = int(cfg.batch_size) * int(cfg.gradient_accumulation) * world
    steps_per_epoch = max(1, -(-n_examples // global_batch))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else int(steps_per_epoch * float(cfg.epochs))
    if global_batch > max(8, n_examples // 4):
        out.append(_finding("global_batch", "warning", f"global batch {global_batch} is implausible for {n_examples} examples "
                           f"({steps_per_epoch} optimizer steps per epoch)",
                           f"--set gradient_accumulation={max(1, n_examples // (8 * int(cfg.batch_size)))}"))
    warmup = int(cfg.warmup_ratio * total_steps)
    if total_steps <= 2 or warmup >= total_steps:
        out.append(_finding("warmup", "warning", f"warmup ({warmup} steps) is as long as the run ({total_steps} steps)",
                           "lower warmup_ratio or train longer"))
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
    return out
