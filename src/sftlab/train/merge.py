"""``merge_micro_batches``: run an optimizer step's accumulation micro-batches as one.

``batch_size: 4, gradient_accumulation: 2`` asks for steps of 8 examples, computed 4 at a time. The loss
is normalised by the step's trained tokens (``core/loss.py``), so one micro-batch of 8 gives the same
step (up to rounding); it is faster where larger matmuls use the hardware better and the fixed cost of a
forward and backward is paid once. Measured on the 2-core Xeon with AMX (benchmarks/RESULTS.md): 1.09x
(90-token rows) to 1.31x (60-token rows) in bf16, but 0.97x in fp32. So ``auto`` measures: a trial on
the run's own model and a typical step of its own examples (forward and backward, the two ways
alternating, wall time) merges only where it is at least :data:`SPEEDUP` faster and the memory estimate
of the merged micro-batch fits. Decisions are cached per machine, model shape and step shape.

``auto`` stays off on a GPU (not measured there yet) and with several processes (each would decide on
its own: every process must run the same step).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass

from sftlab.config import Config
from sftlab.core.attention import AttentionSwitch
from sftlab.core.hardware import device_memory_gb, machine_key
from sftlab.core.io import cached_entry, store_entry
from sftlab.core.loss import hidden_states_instead_of_logits, sft_loss
from sftlab.plan.auto import estimated_bytes
from sftlab.train.distributed import world_size

SPEEDUP = 1.05  # merged must be at least 5% faster
FIT = 0.8  # the merged micro-batch's estimate must fit in this share of the memory budget
REPS = 2
CACHE = "merge-trial.json"  # in core.io.cache_root()


@dataclass
class MergeChoice:
    """Whether the step's micro-batches run as one, why, and the trial behind an ``auto`` decision
    (``micro_ms``: the step as configured, ``merged_ms``: as one micro-batch)."""

    enabled: bool
    reason: str
    batch_size: int  # the micro-batch that runs
    gradient_accumulation: int
    micro_ms: float | None = None
    merged_ms: float | None = None
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _typical_step(batches, n: int) -> list | None:
    """``n`` examples of about the median length (a length-grouped step), or the first ``n`` rows."""
    data = batches.dataset
    if len(data) < n:
        return None
    if batches.lengths is None:
        return [data[i] for i in range(n)]
    order = sorted(range(len(batches.lengths)), key=batches.lengths.__getitem__)
    start = max(0, min(len(order) - n, len(order) // 2 - n // 2))
    return [data[i] for i in order[start:start + n]]


def _fwd_bwd(model, batch, switch, precision: str) -> None:
    import torch  # deferred: heavy library, imported on first use

    if switch is not None:
        switch.before(batch["input_ids"])
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        with hidden_states_instead_of_logits(model) as head:
            hidden = model(**fwd, use_cache=False).logits
            loss = sft_loss(hidden, head, batch["labels"])
    loss.backward()


def measure_merge(model, examples: list, collator, *, micro: int, precision: str, attention_auto: bool,
                  reps: int = REPS) -> tuple[float, float]:
    """(ms of the step as ``len(examples) / micro`` micro-batches, ms as one), forward and backward,
    each the median of ``reps`` after a warm-up, alternating; gradients are cleared afterwards."""
    micro_batches = [collator(examples[i:i + micro]) for i in range(0, len(examples), micro)]
    merged = collator(examples)
    switch = AttentionSwitch(model, compute_bytes=2 if precision in ("bf16", "fp16") else 4) if attention_auto else None
    was_training = model.training
    model.train()

    def run(batches_) -> float:
        t0 = time.perf_counter()
        for b in batches_:
            _fwd_bwd(model, b, switch, precision)
        ms = (time.perf_counter() - t0) * 1e3
        model.zero_grad(set_to_none=True)
        return ms

    try:
        run(micro_batches), run([merged])  # warm-up: allocator, oneDNN primitives
        times: dict[str, list[float]] = {"micro": [], "merged": []}
        for _ in range(reps):
            times["micro"].append(run(micro_batches))
            times["merged"].append(run([merged]))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return statistics.median(times["micro"]), statistics.median(times["merged"])


def _why_not(rc: Config, model, world_size: int) -> str | None:
    """Why ``auto`` cannot merge here (None: it may, after the memory check and the trial)."""
    if world_size > 1:
        return "several processes (each would decide alone; set true or false for all)"
    if next(model.parameters()).device.type != "cpu" or _cuda_available():
        return "a GPU (not measured there yet)"
    if rc.deepspeed or rc.fsdp:
        return "sharded training"
    return None


def _threads() -> int:
    import torch  # deferred: heavy library, imported on first use

    return torch.get_num_threads()


def _cuda_available() -> bool:
    import torch  # deferred: heavy library, imported on first use

    return torch.cuda.is_available()


def decide_merge(rc: Config, model, batches, *, seq_len: int, world_size: int = 1, measure=measure_merge) -> MergeChoice:
    """Whether ``rc``'s step runs as one micro-batch (see the module docstring). ``seq_len``: the longest
    row the run trains on (for the memory estimate)."""
    b, ga = int(rc.batch_size), int(rc.gradient_accumulation)
    as_set = MergeChoice(False, "", b, ga)
    if ga == 1:
        return dataclasses.replace(as_set, reason="one micro-batch per step already")
    if rc.merge_micro_batches is False:
        return dataclasses.replace(as_set, reason="off in the config")
    if rc.merge_micro_batches is True:
        return MergeChoice(True, "on in the config", b * ga, 1)
    if why := _why_not(rc, model, world_size):
        return dataclasses.replace(as_set, reason=why)
    need = estimated_bytes(rc, model.config, batch=b * ga, seq_len=seq_len,
                           checkpointing=bool(rc.gradient_checkpointing), device="cpu")
    budget = device_memory_gb()[1] * 2**30
    if need > FIT * budget:
        return dataclasses.replace(as_set, reason=f"a micro-batch of {b * ga} would need {need / 2**30:.1f} GiB "
                                                  f"(over {FIT:.0%} of {budget / 2**30:.1f} GiB)")
    examples = _typical_step(batches, b * ga)
    if examples is None:
        return dataclasses.replace(as_set, reason="fewer examples than one step")
    shape = model.config
    key = (f"{machine_key()}|{type(model).__name__}|{shape.hidden_size}x{shape.num_hidden_layers}x{shape.vocab_size}|"
           f"{rc.method} r{rc.lora_r}|{rc.precision}|gc {bool(rc.gradient_checkpointing)}|{rc.attn_implementation}|"
           f"{b}x{ga}|longest {max(len(e.input_ids) for e in examples) // 16 * 16}|threads {_threads()}")
    entry = cached_entry(CACHE, key)
    if entry is None or not {"micro_ms", "merged_ms"} <= set(entry):
        entry = None
        micro_ms, merged_ms = measure(model, examples, batches.collator, micro=b, precision=rc.precision,
                                      attention_auto=rc.attn_implementation == "auto" and not rc.packing)
        store_entry(CACHE, key, {"micro_ms": round(micro_ms, 1), "merged_ms": round(merged_ms, 1)})
    else:
        micro_ms, merged_ms = entry["micro_ms"], entry["merged_ms"]
    ratio = micro_ms / max(merged_ms, 1e-9)
    trial = dict(micro_ms=round(micro_ms, 1), merged_ms=round(merged_ms, 1), cached=entry is not None)
    if ratio < SPEEDUP:
        return MergeChoice(False, f"one micro-batch of {b * ga} measured {ratio:.2f}x {ga} of {b} (needs {SPEEDUP:g}x)",
                           b, ga, **trial)
    return MergeChoice(True, f"one micro-batch of {b * ga} measured {ratio:.2f}x faster than {ga} of {b}",
                       b * ga, 1, **trial)


def merged_config(rc: Config, choice: MergeChoice) -> Config:
    """``rc`` with the micro-batch that runs (the same examples per optimizer step)."""
    return dataclasses.replace(rc, batch_size=choice.batch_size, gradient_accumulation=choice.gradient_accumulation)


def speed_choices(rc: Config, model, batches, kernels: list, notes: dict, *, quiet: bool) -> Config:
    """Record (and on a GPU print) the kernel decisions; decide ``merge_micro_batches``; returns ``rc``
    with the micro-batch that runs."""
    notes["kernels"] = [k.to_dict() for k in kernels]
    if not quiet and any(k.enabled or k.trial for k in kernels):  # a GPU: say what the trials decided
        print("kernels: " + "; ".join(f"{k.name} {'on' if k.enabled else 'off'} ({k.reason})" for k in kernels))
    merge = decide_merge(rc, model, batches, world_size=world_size(),
                         seq_len=max(batches.lengths) if batches.lengths else int(rc.max_seq_length))
    notes["merge"] = merge.to_dict()
    if not quiet and merge.micro_ms is not None:
        print(f"merge_micro_batches: {'on' if merge.enabled else 'off'} ({merge.reason})")
    return merged_config(rc, merge)


__all__ = ["MergeChoice", "decide_merge", "measure_merge", "merged_config", "speed_choices"]
