"""Every `auto` of the config, resolved in one place for `sftlab train`, `sftlab plan` and `sftlab recommend`.

- learning rate: :func:`lr_for_size`, one table by method and model size;
- epochs: :func:`epochs_for_data`, by number of training examples;
- batch and accumulation: :func:`batch_for_memory`, by GPU memory;
- gradient checkpointing: on only when the memory estimate (:mod:`sftlab.plan.memory`) would not fit;
- precision: bf16 where the hardware computes it natively (:func:`sftlab.core.hardware.fast_bf16`), else fp32.

:func:`resolve_auto` applies them all to a :class:`~sftlab.config.Config`.
"""

from __future__ import annotations

import dataclasses

from sftlab.config import Config
from sftlab.core.hardware import device_memory_gb, fast_bf16
from sftlab.plan.memory import TrainSetup, estimate_memory
from sftlab.plan.shapes import shape_from_config


def lr_for_size(n_params: float, method: str) -> float:
    """A starting peak learning rate for ``method`` on a model of ``n_params`` parameters.

    Full fine-tuning: 5e-5 under 1B, 2e-5 under 10B (Alpaca's 7B), 1e-5 under 40B (Vicuna/Alpaca 13B),
    5e-6 above (70B recipes). LoRA and QLoRA train a small adapter from zero and take about ten times
    more: 2e-4 under 10B, 1e-4 under 40B (the QLoRA paper: 2e-4 for 7B/13B, 1e-4 for 33B/65B), 5e-5 above.
    Prefix tuning learns a few virtual tokens and takes more still: 5e-3 at every size.
    """
    b = n_params / 1e9
    if method == "full":
        return 5e-5 if b < 1 else 2e-5 if b < 10 else 1e-5 if b < 40 else 5e-6
    if method == "prefix":
        return 5e-3
    return 2e-4 if b < 10 else 1e-4 if b < 40 else 5e-5


def epochs_for_data(n_examples: int) -> int:
    """Epochs by data size: small sets need more passes (5 under 1k examples, 3 under 10k, then 1)."""
    return 5 if n_examples < 1000 else 3 if n_examples < 10000 else 1


def batch_for_memory(gpu_gb: float | None) -> tuple[int, int]:
    """(micro-batch, accumulation) by GPU memory in GB, an effective batch of 16; ``None``: no GPU."""
    if gpu_gb is not None and gpu_gb >= 79:
        return 4, 4
    if gpu_gb is not None and gpu_gb >= 39:
        return 2, 8
    return 1, 16


def estimated_bytes(cfg: Config, model_cfg, *, batch: int, seq_len: int, checkpointing: bool, device: str) -> int:
    """Estimated peak memory (bytes) of one training step of ``cfg`` on ``device`` (see :mod:`sftlab.plan.memory`)."""
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
    """A copy of ``cfg`` with every `auto` replaced by the value that will be used on this machine."""
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


__all__ = ["batch_for_memory", "epochs_for_data", "estimated_bytes", "lr_for_size", "resolve_auto"]
