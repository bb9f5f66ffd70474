"""The pre-flight configuration checklist of `sftlab train`.

`auto` values are resolved by :mod:`sftlab.plan.auto`; its names are re-exported here for the training code.
"""

from __future__ import annotations

import os

from sftlab.config import Config
from sftlab.core.findings import Finding
from sftlab.core.hardware import device_memory_gb, fast_bf16
from sftlab.plan.auto import (
    batch_for_memory,
    epochs_for_data,
    estimated_bytes,
    lr_for_size,
    resolve_auto,
)


def _finding(rule: str, severity: str, message: str, fix: str) -> Finding:
    return Finding(rule, severity, message, fixes=[fix])


def checklist(cfg: Config, *, n_params: int, n_examples: int, seq_len: int, model_cfg,
              train_keys: set, eval_keys: set, report) -> list[Finding]:
    """The configuration checklist, each finding with its fix. ``cfg`` is resolved (no `auto`)."""
    out: list[Finding] = []
    lr = float(cfg.learning_rate)
    ref = lr_for_size(n_params, cfg.method)
    lo, hi = ref / 10, ref * 10  # the table is per method: an order of magnitude either way is unusual
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


__all__ = ["batch_for_memory", "checklist", "device_memory_gb", "epochs_for_data", "estimated_bytes", "fast_bf16",
           "lr_for_size", "resolve_auto"]
