"""The checks of `sftlab train --check` on what the model and method refuse or waste: flash attention and
liger-kernel where they cannot run, rows past the model's context, a LoRA rank past a layer's width, LoRA
target modules the model lacks, packing with prefix tuning. :mod:`sftlab.train.checks` runs them."""

from __future__ import annotations

import importlib.util

from sftlab.config import Config
from sftlab.core.findings import Finding
from sftlab.plan.auto import PREFIX_NO_CHECKPOINTING
from sftlab.plan.setup import lora_targets
from sftlab.plan.shapes import lora_rank_past_width, past_context, shape_from_config
from sftlab.train.kernels import liger_available


def _finding(rule: str, severity: str, message: str, fix: str) -> Finding:
    return Finding(rule, severity, message, fixes=[fix])


def attention_findings(cfg: Config, device: str) -> list[Finding]:
    """flash_attention_2 where loading the model refuses it: without the flash-attn package, off CUDA, in fp32."""
    if cfg.attn_implementation != "flash_attention_2":
        return []
    why = ("a CUDA GPU" if device != "cuda" else "bf16 or fp16" if cfg.precision == "fp32"
           else "the flash-attn package" if importlib.util.find_spec("flash_attn") is None else None)
    if why is None:
        return []
    return [_finding("attn_implementation", "error", f"attn_implementation flash_attention_2 needs {why} "
                     f"(here: {cfg.precision} on {device}); loading the model would fail",
                     "--set attn_implementation=sdpa")]


def kernel_findings(cfg: Config, device: str) -> list[Finding]:
    """liger_kernels or fused_loss set true where they cannot run (off CUDA, without liger-kernel): loading
    the model would fail (train/kernels.py), as `sftlab plan` refuses to plan them there."""
    on = [key for key in ("liger_kernels", "fused_loss") if getattr(cfg, key) is True]
    why = ("a CUDA GPU" if device != "cuda" else "liger-kernel (pip install 'sftlab[gpu]')"
           if not liger_available() else None)
    if not on or why is None:
        return []
    return [_finding(on[0], "error", f"{' and '.join(on)} true: liger-kernel's kernels need {why} (here: {device}); "
                     "loading the model would fail", " ".join(f"--set {key}=auto" for key in on))]


def context_findings(cfg: Config, model_cfg, seq_len: int) -> list[Finding]:
    """A warning where rows of ``seq_len`` tokens (with packing: the longest example, as positions restart at each
    example of a packed row) after prefix tuning's virtual tokens are longer than the model's context
    (max_position_embeddings): positions past it were never trained (a model with learned positions has none)."""
    context = shape_from_config(model_cfg, cfg.model).context
    if (over := past_context(context, seq_len, cfg.method, int(cfg.prefix_tokens))) is None:
        return []
    fix = (f"--set max_seq_length={over[1]}" if over[1] else f"--set prefix_tokens={context // 2}")
    what = "examples (packed: positions restart at each)" if cfg.packing else "rows"  # data/collate.py
    if _learned_positions(model_cfg):  # GPT-2, OPT: no embedding past the last position, an IndexError at the first step
        return [_finding("max_seq_length", "error", f"{what} of up to {over[0]} are longer than the model's context of "
                         f"{context}: its positions are learned, with no embedding past it, so the step fails", fix)]
    return [_finding("max_seq_length", "warning", f"{what} of up to {over[0]} are longer than the model's context "
                     f"of {context} (max_position_embeddings): it never trained on the positions past it", fix)]


_ROTARY = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct", "partial_rotary_factor")


def _learned_positions(model_cfg) -> bool:
    """A table of learned position embeddings (GPT-2, OPT), not rotary (Llama, Qwen, GPT-J) or ALiBi positions."""
    return not any(hasattr(model_cfg, a) for a in _ROTARY) and not getattr(model_cfg, "alibi", False)


def lora_rank_findings(cfg: Config, model_cfg) -> list[Finding]:
    """A warning where lora_r is above the width of a layer LoRA adapts (as `sftlab plan` notes it)."""
    if cfg.method not in ("lora", "qlora"):
        return []
    def has_layer(name: str) -> bool:  # built (on the meta device) only when the rank is past a width
        try:
            return any(n.rsplit(".", 1)[-1] == name for n in _module_names(model_cfg, cfg.trust_remote_code))
        except Exception:  # a model transformers cannot build from its config: loading it says why
            return False

    wide = lora_rank_past_width(shape_from_config(model_cfg, cfg.model), int(cfg.lora_r),
                                lora_targets(cfg.lora_target_modules), has_layer)
    return [_finding("lora_r", "warning", wide[0], f"--set lora_r={wide[1]}")] if wide else []


def _module_names(model_cfg, trust_remote_code: bool) -> dict[str, str]:
    """Every module of the model ``model_cfg`` describes (name -> class name), built on the meta device
    (no weights)."""
    import torch  # deferred: heavy library, imported on first use
    from transformers import (
        AutoModelForCausalLM,  # deferred: heavy library, imported on first use
    )

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_cfg, trust_remote_code=trust_remote_code)
    return {name: type(m).__name__ for name, m in model.named_modules()}


def method_findings(cfg: Config, model_cfg) -> list[Finding]:
    """What the method refuses once the model is loaded: packing or gradient checkpointing with prefix tuning
    (its virtual tokens break packed rows; checkpointed layers drop them), LoRA target modules the model does not have (a warning when only some are
    missing: peft adapts the others)."""
    if cfg.method == "prefix" and cfg.packing:
        return [_finding("packing", "error", "packing does not work with prefix tuning", "--set packing=false")]
    if cfg.method == "prefix" and cfg.gradient_checkpointing is True:
        return [_finding("gradient_checkpointing", "error", PREFIX_NO_CHECKPOINTING,
                         "--set gradient_checkpointing=false (or auto)")]
    if cfg.method not in ("lora", "qlora") or cfg.lora_target_modules == "all-linear":
        return []
    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    try:
        names = _module_names(model_cfg, cfg.trust_remote_code)
    except Exception:  # a model transformers cannot build from its config: loading it says why, in one line
        return []
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return []
    leaves = sorted({n.rsplit(".", 1)[-1] for n, kind in names.items() if kind in ("Linear", "Conv1D")} - {"lm_head"})
    fix = f"--set lora_target_modules={','.join(leaves) + ' or all-linear' if leaves else 'all-linear'}"
    if len(missing) == len(targets):
        return [_finding("lora_target_modules", "error", f"lora_target_modules: the model has no module "
                         f"{', '.join(missing)}", fix)]
    return [_finding("lora_target_modules", "warning", f"lora_target_modules: the model has no module "
                     f"{', '.join(missing)}; LoRA adapts only the others", fix)]
