"""One training configuration for the memory estimator, and the byte sizes its tensors take.

:class:`TrainSetup` is what :mod:`sftlab.plan.memory` and :mod:`sftlab.plan.heap` estimate for; both
read the same dtype sizes (:func:`dtype_bytes`) and the same attention kernel (:func:`attention_kernel`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sftlab import qlora
from sftlab.config import Attention, Method, Optimizer, Precision, choices
from sftlab.core.attention import pick_attention
from sftlab.core.errors import SftlabError
from sftlab.plan.allocator import MALLOCS, train_malloc
from sftlab.plan.shapes import ModelShape

METHODS = choices(Method)
OPTIMIZERS = choices(Optimizer)
PRECISIONS = choices(Precision)
ATTENTION = choices(Attention)
DEVICES = ("cuda", "cpu")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_targets(modules: str) -> tuple[str, ...]:
    """The layers a LoRA estimate adapts for ``lora_target_modules`` (the config's: all-linear, or names, comma
    separated): the Llama block's linears it names; all of them for all-linear, or for names of another
    architecture (c_attn, ...), whose layers the Llama-style shape stands in for."""
    named = tuple(dict.fromkeys(t.strip() for t in str(modules).split(",") if t.strip() in ALL_LINEAR))
    return named or ALL_LINEAR


@dataclass(frozen=True)
class TrainSetup:
    """One training configuration. ``batch`` is the micro-batch, ``seq_len`` tokens per row."""

    method: str = "full"
    batch: int = 1
    seq_len: int = 512
    precision: str = "auto"  # auto: bf16 mixed precision on cuda, fp32 on cpu
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    grad_accum: int = 1
    device: str = "cuda"
    lora_r: int = 16
    lora_alpha: int = 32  # the adapter's scale alpha / r: no memory, but `learning_rate: auto` follows it
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ALL_LINEAR
    prefix_tokens: int = 20
    loss_chunk: int = 2048  # rows projected to the vocabulary at a time (sftlab.core.loss)
    trained_fraction: float = 1.0  # share of positions with a trained label (prompt masking lowers it)
    attention: str = "sdpa"  # sdpa, eager, flash_attention_2, or auto (sftlab.core.attention decides)
    # The C library's malloc `sftlab train` runs with on a CPU: "glibc" (its default), "lean"
    # (SFTLAB_MALLOC=lean) or "other". By default, what `train` would use here (sftlab.plan.allocator).
    malloc: str = field(default_factory=train_malloc)
    # liger-kernel on a GPU (``liger_kernels``: its RMSNorm, SwiGLU and RoPE; ``fused_loss``: its fused
    # linear cross entropy): what they keep, as liger-kernel 0.8.5 writes them (train/kernels.py)
    liger_kernels: bool = False
    fused_loss: bool = False
    ewc: bool = False  # EWC (ewc_lambda > 0): an anchor copy and a Fisher diagonal of every trained parameter

    def __post_init__(self):
        validate_setup(self)

    @property
    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.device == "cuda" else "fp32"

    @property
    def mixed(self) -> bool:
        return self.resolved_precision in ("bf16", "fp16")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["precision"] = self.resolved_precision
        return d


def validate_setup(s: TrainSetup) -> None:
    """Raise :class:`SftlabError` naming the first bad field of ``s``."""
    for name, value, allowed in (("method", s.method, METHODS), ("optimizer", s.optimizer, OPTIMIZERS),
                                 ("precision", s.precision, PRECISIONS), ("device", s.device, DEVICES)):
        if value not in allowed:
            raise SftlabError(f"unknown {name} {value!r}", hint=f"use one of: {', '.join(allowed)}")
    for name in ("batch", "seq_len", "grad_accum", "lora_r", "lora_alpha", "prefix_tokens", "loss_chunk"):
        if int(getattr(s, name)) < 1:
            raise SftlabError(f"{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if not 0.0 < s.trained_fraction <= 1.0:
        raise SftlabError(f"trained fraction must be in (0, 1], got {s.trained_fraction}")

    if s.malloc not in MALLOCS:
        raise SftlabError(f"unknown malloc {s.malloc!r}", hint=f"use one of: {', '.join(MALLOCS)}")
    if s.attention not in ATTENTION:
        raise SftlabError(f"unknown attention {s.attention!r}", hint=f"use one of: {', '.join(ATTENTION)}")
    if not 0.0 <= s.lora_dropout < 1.0:
        raise SftlabError(f"lora dropout must be in [0, 1), got {s.lora_dropout}")
    bad = [t for t in s.lora_targets if t not in ALL_LINEAR]
    if bad or not s.lora_targets:
        raise SftlabError(f"unknown LoRA target {bad[0] if bad else '(none)'!r}", hint=f"use some of: {', '.join(ALL_LINEAR)}")
    if s.attention == "flash_attention_2" and (s.device != "cuda" or not s.mixed):
        raise SftlabError(f"attention flash_attention_2 runs on CUDA GPUs in bf16 or fp16, not {s.resolved_precision} "
                          f"on {s.device} (sftlab train refuses it there)",
                          hint="plan it with --device cuda and --precision bf16, or use --attention sdpa")
    if (s.liger_kernels or s.fused_loss) and s.device != "cuda":
        raise SftlabError("liger-kernel's kernels (liger_kernels, fused_loss) run on CUDA GPUs",
                          hint="plan them with --device cuda, or without them: --no-liger")
    if s.method == "qlora" and s.device == "cpu":
        # bitsandbytes trains NF4 on CPU too, from the version sftlab.qlora names (the one rule). A plan
        # for CUDA is often made away from the GPU, so it does not ask for bitsandbytes here.
        qlora.require_qlora("cpu")


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of the kinds of tensors a training step holds."""

    compute: int   # matmul outputs, logits
    residual: int  # the residual stream and norm outputs
    weight: int    # frozen or trained base weights as stored
    mask: int      # a dropout mask element


def dtype_bytes(shape: ModelShape, s: TrainSetup) -> Bytes:
    cb = 2 if s.mixed else 4
    # Full fine-tuning under autocast keeps fp32 weights, so the residual stream stays fp32; the
    # frozen-base methods load the base in the compute dtype, so everything is in that dtype.
    rb = 4 if (not s.mixed or s.method == "full") else cb
    wb = 4 if not s.mixed else 2
    # CPU dropout multiplies by a float noise tensor; CUDA's fused dropout keeps a bool mask.
    mb = 1 if s.device == "cuda" else cb
    return Bytes(cb, rb, wb, mb)


def attention_kernel(shape: ModelShape, s: TrainSetup) -> str:
    """The kernel training will run for this setting (``auto`` decides as the trainer does)."""
    return pick_attention(s.attention, device=s.device, batch=s.batch, seq_len=s.seq_len, n_heads=shape.n_heads,
                          n_layers=shape.n_layers, compute_bytes=2 if s.mixed else 4)


__all__ = ["ALL_LINEAR", "ATTENTION", "DEVICES", "METHODS", "OPTIMIZERS", "PRECISIONS", "Bytes", "TrainSetup",
           "attention_kernel", "dtype_bytes", "lora_targets", "validate_setup"]
