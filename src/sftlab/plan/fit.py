"""Where a training setup fits, and a configuration that fits a memory budget.

Builds on :mod:`sftlab.plan.memory`: checks the estimate against common GPUs and this machine, finds the
largest batch or sequence length under a budget, and recommends batch, accumulation, checkpointing,
method and learning rate (:func:`sftlab.plan.auto.auto_learning_rate`, the table training uses).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from sftlab import qlora
from sftlab.core.errors import SftlabError
from sftlab.core.hardware import device_memory_gb, device_name
from sftlab.plan.auto import auto_learning_rate, resolve_precision
from sftlab.plan.memory import (
    GB,
    MemoryEstimate,
    TrainSetup,
    estimate_memory,
    max_batch,
    max_seq_len,
)
from sftlab.plan.shapes import ModelShape, longest_row

# Usable memory of common training GPUs, in GB as sold (1e9 bytes): RTX 3090/4090/A10 (24),
# A100-40GB (40), A6000/L40S (48), A100/H100-80GB (80), H200 (141).
COMMON_GPUS_GB = (24, 40, 48, 80, 141)


@dataclass
class Machine:
    """This machine's memory for training: its first GPU if CUDA is there, else free RAM."""

    device: str
    name: str
    capacity_bytes: int


def this_machine() -> Machine:
    device, gb = device_memory_gb()
    if device == "cuda":
        return Machine("cuda", f"this machine's {device_name()}", int(gb * 2**30))
    return Machine("cpu", "this machine's free RAM", int(gb * 2**30))


def _gpu_kernels(device: str, setup: TrainSetup) -> dict:
    """liger-kernel's kernels and flash-attn run only on a GPU: a CPU plan of the same setup is without them."""
    if device == "cuda":
        return {}
    return {"liger_kernels": False, "fused_loss": False,
            "attention": "sdpa" if setup.attention == "flash_attention_2" else setup.attention}


def fits(shape: ModelShape, setup: TrainSetup, machine: Machine | None = None) -> dict[str, dict]:
    """Fit on each common GPU (estimated for CUDA) and on this machine (estimated for its device)."""
    gpu_setup = setup if setup.device == "cuda" else replace(setup, device="cuda", precision="auto")
    gpu_need = estimate_memory(shape, gpu_setup).total_bytes
    out = {f"{gb} GB GPU": {"fits": gpu_need <= gb * GB, "needed_bytes": gpu_need, "capacity_bytes": int(gb * GB)}
           for gb in COMMON_GPUS_GB}
    m = machine or this_machine()
    unavailable = qlora.qlora_unavailable("cpu") if m.device == "cpu" and setup.method == "qlora" else None
    if unavailable:
        out["this machine"] = {"fits": False, "needed_bytes": None, "capacity_bytes": m.capacity_bytes,
                               "note": unavailable}
    else:
        local = setup if setup.device == m.device else replace(setup, device=m.device, precision="auto",
                                                              **_gpu_kernels(m.device, setup))
        if local is not setup and local.device == "cpu":  # a GPU plan: what `train` would run here, as the probe decides
            local = replace(local, precision=resolve_precision("cpu", shape.hidden, shape.intermediate)[0])
        need = estimate_memory(shape, local).total_bytes
        note = m.name if m.device == "cuda" else f"{m.name}, CPU training in {local.resolved_precision}"
        out["this machine"] = {"fits": need <= m.capacity_bytes, "needed_bytes": need,
                               "capacity_bytes": m.capacity_bytes, "note": note, "precision": local.resolved_precision}
    return out


@dataclass
class Recommended:
    """A configuration that fits ``budget_bytes`` with 10% to spare; ``fits`` is false when nothing tried does."""

    fits: bool
    method: str
    batch: int
    grad_accum: int
    gradient_checkpointing: bool
    learning_rate: float
    seq_len: int
    budget_bytes: int
    estimated_bytes: int | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _cheaper_methods(method: str, device: str) -> list[str]:
    order = {"full": ["full", "lora", "qlora"], "lora": ["lora", "qlora"], "qlora": ["qlora"], "prefix": ["prefix"]}[method]
    # QLoRA is a fallback on CPU only where bitsandbytes can train it there (sftlab.qlora).
    return [m for m in order if m == method or m != "qlora" or device != "cpu" or not qlora.qlora_unavailable("cpu")]


def _lr(shape: ModelShape, method: str, setup: TrainSetup, effective: int) -> float:
    """The learning rate `learning_rate: auto` gives this method, model, global batch and LoRA scale."""
    return auto_learning_rate(shape.params, method, global_batch=effective, lora_r=setup.lora_r,
                              lora_alpha=setup.lora_alpha)


_FIXED = ("cuda_context", "overhead", "process baseline")  # what a step holds whatever the model's size and rows
HEADROOM = 0.9  # a recommendation leaves 10% of the budget for estimate error and fragmentation


def recommend_config(shape: ModelShape, setup: TrainSetup, budget_bytes: float, headroom: float = HEADROOM) -> Recommended:
    """Keep the effective batch ``setup.batch * setup.grad_accum``; change as little as needed to fit
    ``headroom * budget_bytes``.

    Tries, in order: the setup as given; a smaller micro-batch with more accumulation; the same with
    gradient checkpointing; then cheaper methods (full -> LoRA -> QLoRA).
    """
    full_budget, budget_bytes = budget_bytes, budget_bytes * headroom
    effective = setup.batch * setup.grad_accum
    for method in _cheaper_methods(setup.method, setup.device):
        # prefix tuning cannot run checkpointed (auto.PREFIX_NO_CHECKPOINTING)
        for ckpt in ([False] if method == "prefix" else [True] if setup.gradient_checkpointing else [False, True]):
            base = replace(setup, method=method, gradient_checkpointing=ckpt, batch=effective, grad_accum=1)
            if estimate_memory(shape, base).total_bytes <= budget_bytes:
                micro, accum = effective, 1
            else:  # accumulation keeps the gradients alive through the next micro-batch's forward
                micro = max_batch(shape, replace(base, grad_accum=2), budget_bytes, limit=effective - 1) if effective > 1 else 0
                if micro < 1:
                    continue
                accum = -(-effective // micro)
                micro = -(-effective // accum)  # as even as that accumulation allows: 4 x 2 for 8, not 5 x 2
            final = replace(base, batch=micro, grad_accum=accum)
            notes = []
            if method != setup.method:
                notes.append(f"{setup.method} does not fit {full_budget / GB:.3g} GB at {setup.seq_len} tokens; {method} does")
            if ckpt and not setup.gradient_checkpointing:
                notes.append("gradient checkpointing on: activations are recomputed in backward (about 30% slower)")
            if accum > 1:
                notes.append(f"micro-batch {micro} x accumulation {accum} keeps the effective batch of {effective}"
                             + ("" if micro * accum == effective else f" (rounded up to {micro * accum})"))
            return Recommended(True, method, micro, accum, ckpt, _lr(shape, method, setup, effective), setup.seq_len,
                               int(full_budget), estimate_memory(shape, final).total_bytes, notes)
    notes = []
    last = _cheaper_methods(setup.method, setup.device)[-1]
    within, ckpt = longest_row(shape.context, last, setup.prefix_tokens), last != "prefix"  # not past the context
    longest = max_seq_len(shape, replace(setup, method=last, batch=1, grad_accum=1, gradient_checkpointing=ckpt),
                          budget_bytes, limit=min(setup.seq_len, within))
    floor = estimate_memory(shape, replace(setup, method=last, batch=1, seq_len=1, grad_accum=1, gradient_checkpointing=ckpt))
    fixed = sum(v for k, v in floor.breakdown.items() if k in _FIXED)
    if not longest and fixed > budget_bytes:  # sharding or a smaller model cannot help: the budget is below the fixed part
        what = "process baseline and framework overhead" if setup.device == "cpu" else "CUDA context and framework overhead"
        notes.append(f"nothing fits {full_budget / GB:.3g} GB at any length: the {what} alone take {fixed / GB:.3g} GB "
                     f"(a step of {last} with batch 1 needs at least {floor.total_bytes / GB:.3g} GB); give a larger budget")
        return Recommended(False, last, 1, effective, ckpt, _lr(shape, last, setup, effective), setup.seq_len,
                           int(full_budget), None, notes)
    notes.append(f"nothing fits {full_budget / GB:.3g} GB at {setup.seq_len} tokens, even {last} with batch 1"
                 + (" and checkpointing" if ckpt else "") + (f"; the longest that fits is {longest} tokens" if longest else "")
                 + (f" (the model's context{' after the prefix' if within < shape.context else ''})"
                    if longest and longest == within else "")
                 + ("; use a machine with more memory, a smaller model or shorter rows" if setup.device == "cpu" else
                    "; shard over GPUs (FSDP/DeepSpeed ZeRO-3) or offload optimizer state"))
    return Recommended(False, last, 1, effective, ckpt, _lr(shape, last, setup, effective), setup.seq_len, int(full_budget),
                       None, notes)


@dataclass
class Plan:
    """Everything `sftlab plan` reports."""

    model: dict
    estimate: MemoryEstimate
    fits: dict
    recommended: Recommended
    budget: dict

    def to_dict(self) -> dict:
        e = self.estimate
        return {"total_bytes": e.total_bytes, "breakdown": e.breakdown, "fits": self.fits,
                "recommended": self.recommended.to_dict(), "peak_phase": e.peak_phase, "phases": e.phases,
                "params": e.params, "trainable_params": e.trainable_params,
                "activation_bytes_per_layer": e.activation_bytes_per_layer, "setup": e.setup,
                "model": self.model, "budget": self.budget}


def make_plan(shape: ModelShape, setup: TrainSetup, budget_gb: float | None = None,
              machine: Machine | None = None) -> Plan:
    """Estimate, fits, the largest batch and length under the budget, and a recommended configuration.

    The budget is ``budget_gb`` if given, else this machine's memory when the setup is for its device,
    else 80 GB (one A100/H100).
    """
    if budget_gb is not None and not 0 < budget_gb < float("inf"):
        raise SftlabError(f"--budget-gb {budget_gb:g}: a memory budget must be a number of GB above 0",
                          hint="e.g. --budget-gb 24")
    m = machine or this_machine()
    est = estimate_memory(shape, setup)
    if budget_gb is not None:
        budget, source = budget_gb * GB, f"--budget-gb {budget_gb:g}"
    elif setup.device == m.device:
        budget, source = float(m.capacity_bytes), m.name
    else:
        budget, source = 80 * GB, "default 80 GB GPU (set --budget-gb)"
    budget_info = {"bytes": int(budget), "source": source,
                   "max_batch": max_batch(shape, replace(setup, grad_accum=1), budget),
                   # no longer than the model's context: beyond it the positions were never trained
                   "max_seq_len": max_seq_len(shape, replace(setup, grad_accum=1), budget,
                                              limit=longest_row(shape.context, setup.method, setup.prefix_tokens))}
    return Plan(model=shape.to_dict(), estimate=est, fits=fits(shape, setup, m),
                recommended=recommend_config(shape, setup, budget), budget=budget_info)
