"""Every `auto` of the config, resolved in one place for `sftlab train`, `sftlab plan` and `sftlab recommend`.

- learning rate: :func:`lr_for_size`, one table by method and model size, scaled for the LoRA scale
  alpha/r and the global batch by :func:`auto_learning_rate`;
- epochs: :func:`epochs_for_data`, by number of training examples;
- batch and accumulation: :func:`auto_batch`, the largest micro-batch whose memory estimate for this model
  and its rows fits, and accumulation to a global batch of 16;
- gradient checkpointing: on only when the memory estimate (:mod:`sftlab.plan.memory`) would not fit;
- precision: :func:`choose_precision`: bf16 on a GPU that supports it; on a CPU, bf16 only where a
  short probe of the model's own matmul shapes (:func:`sftlab.core.hardware.probe_precision`) measures
  it faster than fp32.

:func:`resolve_auto` applies them all to a :class:`~sftlab.config.Config`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from sftlab.config import Config
from sftlab.core.hardware import PrecisionProbe, device_memory_gb, probe_precision
from sftlab.models import DEFAULT_MODEL
from sftlab.plan.memory import TrainSetup, estimate_memory
from sftlab.plan.setup import lora_targets
from sftlab.plan.shapes import human_count, shape_from_config


def lr_for_size(n_params: float, method: str) -> float:
    """A starting peak learning rate for ``method`` on a model of ``n_params`` parameters, at the
    reference global batch (:data:`REFERENCE_BATCH`) and LoRA scale (:data:`REFERENCE_LORA_SCALE`).

    Full fine-tuning: 1e-4 under 0.5B, 5e-5 under 1B, 2e-5 under 10B (Alpaca's 7B), 1e-5 under 40B
    (Vicuna/Alpaca 13B), 5e-6 above (70B recipes). LoRA and QLoRA train a small adapter from zero and
    take about ten times more ("LoRA Without Regret", Thinking Machines 2025: the best LoRA rate is
    ~10x full fine-tuning's; more for short runs): 2e-3 under 0.5B (measured here: 10 LoRA steps on the
    demo task, exact match 29% at 1e-3, 62% at 2e-3, 54% at 3e-3), 5e-4 under 1B, 2e-4 under 10B, 1e-4 under 40B (the
    QLoRA paper: 2e-4 for 7B/13B, 1e-4 for 33B/65B), 5e-5 above. Prefix tuning learns a few virtual
    tokens and takes more still: 5e-3 at every size (Li & Liang 2021 used 5e-5..8e-5 on full models'
    prefix MLPs; peft's examples 1e-2..3e-2 without one).
    """
    b = n_params / 1e9
    if method == "full":
        return 1e-4 if b < 0.5 else 5e-5 if b < 1 else 2e-5 if b < 10 else 1e-5 if b < 40 else 5e-6
    if method == "prefix":
        return 5e-3
    return 2e-3 if b < 0.5 else 5e-4 if b < 1 else 2e-4 if b < 10 else 1e-4 if b < 40 else 5e-5


REFERENCE_BATCH = 8  # the global batch the table is for (sequences per optimizer step)
REFERENCE_LORA_SCALE = 2.0  # alpha / r of the table's runs (peft's r=16 with alpha=32, sftlab's default)


def auto_learning_rate(n_params: float, method: str, *, global_batch: int, lora_r: int = 16,
                       lora_alpha: int = 32) -> float:
    """The table's rate (:func:`lr_for_size`) for this run's global batch and LoRA scale.

    - batch: square-root scaling from :data:`REFERENCE_BATCH` (Adam's noise-scale rule, Malladi et al.
      2022), the factor clamped to 0.5..2;
    - LoRA/QLoRA: the adapter's update is scaled by alpha/r, so the rate is divided by
      (alpha/r) / :data:`REFERENCE_LORA_SCALE` (at fixed alpha/r, the best rate barely moves with the rank:
      LoRA Without Regret), the factor clamped to 0.25..4.
    """
    lr = lr_for_size(n_params, method)
    lr *= min(2.0, max(0.5, (max(1, global_batch) / REFERENCE_BATCH) ** 0.5))
    if method in ("lora", "qlora"):
        lr *= min(4.0, max(0.25, REFERENCE_LORA_SCALE / (lora_alpha / max(1, lora_r))))
    return float(f"{lr:.3g}")


def epochs_for_data(n_examples: int) -> int:
    """Epochs by data size: small sets need more passes (5 under 1k examples, 3 under 10k, then 1)."""
    return 5 if n_examples < 1000 else 3 if n_examples < 10000 else 1


AUTO_GLOBAL_BATCH = 16  # sequences per optimizer step that `batch_size`/`gradient_accumulation: auto` aim for
CPU_MAX_MICRO = 4  # on a CPU, merge_micro_batches (a measured trial) decides whether larger micro-batches pay


def batch_for_memory(gpu_gb: float | None) -> tuple[int, int]:
    """(micro-batch, accumulation) by GPU memory in GB alone, a global batch of 16; ``None``: no GPU.
    A rough table for when no model is known; `batch_size: auto` uses :func:`auto_batch`, which sizes
    the micro-batch with the memory estimate of the run's own model and rows."""
    if gpu_gb is not None and gpu_gb >= 79:
        return 4, 4
    if gpu_gb is not None and gpu_gb >= 39:
        return 2, 8
    return 1, 16


def auto_global_batch(n_examples: int | None) -> int:
    """The global batch `auto` aims for: :data:`AUTO_GLOBAL_BATCH`, or less for small data, where the
    checklist calls a global batch above a quarter of the examples (and above 8) implausible."""
    return AUTO_GLOBAL_BATCH if n_examples is None else min(AUTO_GLOBAL_BATCH, max(8, n_examples // 4))


def auto_batch(cfg: Config, model_cfg, *, seq_len: int, device: str, mem_gb: float,
               n_examples: int | None = None) -> tuple[int, int, str]:
    """(micro-batch, accumulation, why) for `batch_size` and/or `gradient_accumulation: auto`.

    The micro-batch is the largest power of two up to 16 on a GPU (up to :data:`CPU_MAX_MICRO` on a
    CPU) whose estimated peak (:mod:`sftlab.plan.memory`: this model, method, precision and rows of
    ``seq_len`` tokens) stays within 90% of ``mem_gb``; 1 when none does (then `gradient_checkpointing:
    auto` turns on). Accumulation makes the global batch (micro-batch x accumulation x processes) at
    least :func:`auto_global_batch` (16; 8 up to 16 for under 64 ``n_examples``), without going above what the
    checklist finds plausible for ``n_examples``. A value the config sets is kept.
    """
    budget, target = 0.9 * mem_gb * 2**30, auto_global_batch(n_examples)
    if cfg.batch_size != "auto":
        micro, why = int(cfg.batch_size), ""
    else:
        cap = min(target, AUTO_GLOBAL_BATCH if device == "cuda" else CPU_MAX_MICRO)
        accum = 1 if cfg.gradient_accumulation == "auto" else int(cfg.gradient_accumulation)
        micro = 1
        for b in (16, 8, 4, 2):
            if b <= cap and estimated_bytes(cfg, model_cfg, batch=b, seq_len=seq_len, grad_accum=accum,
                                            checkpointing=cfg.gradient_checkpointing is True, device=device) <= budget:
                micro = b
                break
        # in GB as the memory line of `train --check` and plan print it (mem_gb is GiB: 24.4 GB was "23 GB")
        where = f"{mem_gb * 2**30 / 1e9:.2f} GB of {'GPU memory' if device == 'cuda' else 'free RAM'}"
        why = (f"the largest micro-batch of {seq_len}-token rows whose estimate fits 90% of {where}"
               + (f", at most {cap} on a CPU" if device != "cuda" else ""))
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))  # under torchrun each process takes a micro-batch
    if cfg.gradient_accumulation != "auto":
        return micro, int(cfg.gradient_accumulation), why
    accum = max(1, -(-target // (micro * world)))
    limit = max(8, n_examples // 4) if n_examples is not None else None  # the checklist's plausible global batch
    while limit is not None and accum > 1 and micro * accum * world > limit:
        accum -= 1
    return micro, accum, why


def estimated_bytes(cfg: Config, model_cfg, *, batch: int, seq_len: int, checkpointing: bool, device: str,
                    grad_accum: int = 1) -> int:
    """Estimated peak memory (bytes) of one training step of ``cfg`` on ``device`` (see :mod:`sftlab.plan.memory`)."""
    shape = shape_from_config(model_cfg, cfg.model)
    setup = TrainSetup(method=cfg.method, grad_accum=max(1, grad_accum),
                       batch=batch, seq_len=seq_len, gradient_checkpointing=checkpointing,
                       device=device, lora_r=cfg.lora_r, prefix_tokens=cfg.prefix_tokens,
                       lora_targets=lora_targets(cfg.lora_target_modules),
                       precision=cfg.precision if cfg.precision in ("bf16", "fp16", "fp32") else "auto",
                       optimizer=cfg.optimizer,  # bitsandbytes keeps 8-bit Adam state on a CPU too (0.50: uint8 + absmax)
                       lora_dropout=cfg.lora_dropout, ewc=cfg.ewc_lambda > 0,
                       attention="sdpa" if (cfg.packing and cfg.attn_implementation == "auto") or (  # flash where it cannot
                           cfg.attn_implementation == "flash_attention_2" and (device != "cuda" or cfg.precision == "fp32"))
                       else cfg.attn_implementation,  # run: the checklist's attention error says so
                       # set true, they run (or the run stops); auto waits for a trial on the GPU: plan without
                       liger_kernels=cfg.liger_kernels is True and device == "cuda",
                       fused_loss=cfg.fused_loss is True and device == "cuda")
    return estimate_memory(shape, setup).total_bytes


PREFIX_NO_CHECKPOINTING = ("gradient checkpointing does not work with prefix tuning: transformers drops the "
                           "prefix's keys and values from a checkpointed layer, and the step fails")


def choose_precision(device: str, probe: PrecisionProbe | None, *, cuda_bf16: bool = True) -> str:
    """The rule of `precision: auto`. On CUDA: bf16 where the GPU supports it, else fp32. On a CPU: bf16
    only where the probe measured it at least 5% faster than fp32 (it rounds: a tie goes to fp32)."""
    if device == "cuda":
        return "bf16" if cuda_bf16 else "fp32"
    return "bf16" if probe is not None and probe.bf16_ms <= 0.95 * probe.fp32_ms else "fp32"


def resolve_precision(device: str, hidden: int, intermediate: int) -> tuple[str, PrecisionProbe | None]:
    """(precision, the probe) for `precision: auto` on ``device`` for a model of these shapes; no probe
    on CUDA (planning for a GPU this machine lacks assumes one with bf16, as every current training GPU has)."""
    if device == "cuda":
        import torch  # deferred: heavy library, imported on first use

        cuda_bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
        return choose_precision(device, None, cuda_bf16=cuda_bf16), None
    probe = probe_precision(hidden, intermediate)
    return choose_precision(device, probe), probe


def describe_precision(precision: str, probe: dict | None) -> str:
    """One line: the precision `auto` chose and the probe's figures (``probe``: :meth:`PrecisionProbe.to_dict`)."""
    if not probe:
        return f"precision: {precision}"
    return (f"precision: auto -> {precision} (probe on {probe['cpu']}, {probe['threads']} threads: "
            f"{probe['hidden']}x{probe['hidden']} and {probe['hidden']}x{probe['intermediate']} linears, "
            f"{probe['tokens']} rows, forward+backward: fp32 {probe['fp32_ms']:.2f} ms, bf16 {probe['bf16_ms']:.2f} ms "
            f"CPU time, bf16 {probe['bf16_speedup']:.2f}x{'; cached' if probe.get('cached') else ''})")


def describe_auto(cfg: Config, resolved: Config, *, n_params: float, n_examples: int,
                  probe: dict | None = None, batch: str | None = None) -> str | None:
    """One line: what each `auto` key of ``cfg`` became in ``resolved`` and on what grounds; None when
    nothing was `auto`."""
    why = {
        "epochs": f"{n_examples} examples",
        "learning_rate": f"the {cfg.method} table for {human_count(n_params)} parameters at a global batch of "
                         f"{int(resolved.batch_size) * int(resolved.gradient_accumulation)}"
                         + (f" and a LoRA scale alpha/r of {cfg.lora_alpha / cfg.lora_r:g}" if cfg.method in ("lora", "qlora")
                            and cfg.lora_alpha / cfg.lora_r != REFERENCE_LORA_SCALE else ""),
        "precision": f"bf16 {probe['bf16_speedup']:.2f}x fp32 on this CPU" if probe else "",
        "batch_size": batch or "",
        "gradient_accumulation": f"a global batch of about {auto_global_batch(n_examples)}"
                                 + (f" for {n_examples} examples" if auto_global_batch(n_examples) < AUTO_GLOBAL_BATCH else ""),
        "gradient_checkpointing": "the estimate would not fit without it" if resolved.gradient_checkpointing
                                  else "prefix tuning runs without it" if cfg.method == "prefix" else "fits without it",
    }
    parts = []
    for key in ("epochs", "batch_size", "gradient_accumulation", "learning_rate", "precision", "gradient_checkpointing"):
        if getattr(cfg, key) != "auto":
            continue
        value = getattr(resolved, key)
        shown = f"{value:g}" if isinstance(value, float) else str(value).lower()
        parts.append(f"{key} {shown}" + (f" ({why[key]})" if why.get(key) else ""))
    return "auto chose: " + ", ".join(parts) if parts else None


def _model_widths(model_cfg) -> tuple[int, int]:
    """(hidden, intermediate) of a transformers config; GPT-2 style configs name them differently."""
    hidden = getattr(model_cfg, "hidden_size", None) or getattr(model_cfg, "n_embd", None) or 768
    inter = getattr(model_cfg, "intermediate_size", None) or getattr(model_cfg, "n_inner", None) or 4 * hidden
    return int(hidden), int(inter)


def _absolute(value):
    """A path relative to the current folder that exists here, made absolute; anything else as it is."""
    if not isinstance(value, str) or not value.strip():
        return value
    local = Path(value).expanduser()
    return str(local.absolute()) if not local.is_absolute() and local.exists() else value


def resolve_auto(cfg: Config, *, n_params: int, n_examples: int, model_cfg, seq_len: int,
                 notes: dict | None = None) -> Config:
    """A copy of ``cfg`` with every `auto` replaced by the value that will be used on this machine, and a
    ``model`` or data path relative to the current folder made absolute (the run folder is read from anywhere).

    ``notes``, when given, receives what the choices were based on: ``precision_probe`` (the probe's
    figures, :meth:`PrecisionProbe.to_dict`) when `precision: auto` ran one.
    """
    device, mem_gb = device_memory_gb()
    out = dataclasses.replace(cfg)
    for key in ("model", "data", "eval_data", "replay_data"):
        # a file or folder named from the current folder: the run's config names it from anywhere
        value = getattr(out, key)
        if isinstance(value, list):  # a mixture: each source's path (a source's name stays its file's stem)
            setattr(out, key, [{**v, "path": _absolute(v.get("path"))} if isinstance(v, dict) and "path" in v
                               else _absolute(v) for v in value])
        elif key != "model" or not isinstance(value, str) or value.strip().lower() != DEFAULT_MODEL:
            setattr(out, key, _absolute(value))
    if out.epochs == "auto":
        out.epochs = epochs_for_data(n_examples)
    if out.precision == "auto":
        out.precision, probe = resolve_precision(device, *_model_widths(model_cfg))
        if probe is not None and notes is not None:
            notes["precision_probe"] = probe.to_dict()
    if out.batch_size == "auto" or out.gradient_accumulation == "auto":  # after the precision: it sizes the estimate
        out.batch_size, out.gradient_accumulation, why = auto_batch(out, model_cfg, seq_len=seq_len, device=device,
                                                                    mem_gb=mem_gb, n_examples=n_examples)
        if notes is not None and why:
            notes["batch_size"] = why
    if out.learning_rate == "auto":  # after the batch: the rate follows the global batch
        out.learning_rate = auto_learning_rate(
            n_params, cfg.method, global_batch=int(out.batch_size) * int(out.gradient_accumulation),
            lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    if out.gradient_checkpointing == "auto":
        need = estimated_bytes(out, model_cfg, batch=int(out.batch_size), seq_len=seq_len, checkpointing=False,
                               device=device)
        # prefix tuning cannot run with it (PREFIX_NO_CHECKPOINTING): off, and the memory check says if it does not fit
        out.gradient_checkpointing = need > 0.9 * mem_gb * 2**30 and cfg.method != "prefix"
    return out


__all__ = ["PREFIX_NO_CHECKPOINTING", "REFERENCE_BATCH", "REFERENCE_LORA_SCALE", "auto_learning_rate", "auto_batch", "auto_global_batch", "batch_for_memory", "choose_precision",
           "describe_auto", "describe_precision", "epochs_for_data", "estimated_bytes", "lr_for_size", "resolve_auto", "resolve_precision"]
