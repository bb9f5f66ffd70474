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
from sftlab.plan.auto import estimated_bytes
from sftlab.plan.render import gb
from sftlab.train.checks import memory_line
from sftlab.train.distributed import world_size
from sftlab.train.trainer import forward_loss

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


def _typical_indices(lengths: list[int] | None, total: int, n: int) -> list[int] | None:
    """Indices of ``n`` examples of about the median length (a length-grouped step), or the first ``n``."""
    if total < n:
        return None
    if lengths is None:
        return list(range(n))
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    start = max(0, min(len(order) - n, len(order) // 2 - n // 2))
    return order[start:start + n]


def _typical_step(batches, n: int) -> list | None:
    idx = _typical_indices(batches.lengths, len(batches.dataset), n)
    return None if idx is None else [batches.dataset[i] for i in idx]


def _fwd_bwd(model, batch, switch, precision: str) -> None:
    import torch  # deferred: heavy library, imported on first use

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        loss, _ = forward_loss(model, batch, switch=switch, loss_weights=batch.get("loss_weights"),
                               position_ids=batch.get("position_ids"))
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


def _why_not(rc: Config, on_gpu: bool, world_size: int) -> str | None:
    """Why ``auto`` cannot merge here (None: it may, after the memory check and the trial)."""
    if world_size > 1:
        return "several processes (each would decide alone; set true or false for all)"
    if on_gpu:
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


def _before_trial(rc: Config, model_cfg, *, on_gpu: bool, world_size: int, seq_len: int) -> MergeChoice | None:
    """The decision where the rule settles it without a trial (None: the trial decides)."""
    b, ga = int(rc.batch_size), int(rc.gradient_accumulation)
    as_set = MergeChoice(False, "", b, ga)
    if ga == 1:
        return dataclasses.replace(as_set, reason="one micro-batch per step already")
    if rc.merge_micro_batches is False:
        return dataclasses.replace(as_set, reason="off in the config")
    if rc.merge_micro_batches is True:
        return MergeChoice(True, "on in the config", b * ga, 1)
    if why := _why_not(rc, on_gpu, world_size):
        return dataclasses.replace(as_set, reason=why)
    need = estimated_bytes(rc, model_cfg, batch=b * ga, seq_len=seq_len,
                           checkpointing=bool(rc.gradient_checkpointing), device="cpu")
    budget = device_memory_gb()[1] * 2**30
    if need > FIT * budget:
        # in GB as the memory line beside it says them (22.6 GiB of free RAM was 24.29 GB there)
        return dataclasses.replace(as_set, reason=f"a micro-batch of {b * ga} would need {gb(need)} "
                                                  f"(over {FIT:.0%} of {gb(budget)})")
    return None


def _cache_key(rc: Config, model_cfg, longest: int) -> str:
    """Per machine, model shape and step shape (``longest``: the typical step's longest example)."""
    c = model_cfg
    return (f"{machine_key()}|{c.model_type}|{c.hidden_size}x{c.num_hidden_layers}x{c.vocab_size}|"
            f"{rc.method} r{rc.lora_r}|{rc.precision}|gc {bool(rc.gradient_checkpointing)}|{rc.attn_implementation}|"
            f"{rc.batch_size}x{rc.gradient_accumulation}|longest {longest // 16 * 16}|threads {_threads()}")


def _from_trial(rc: Config, micro_ms: float, merged_ms: float, cached: bool) -> MergeChoice:
    b, ga = int(rc.batch_size), int(rc.gradient_accumulation)
    micro_ms, merged_ms = round(micro_ms, 1), round(merged_ms, 1)  # as cached: a cached trial reads the same
    ratio = micro_ms / max(merged_ms, 1e-9)
    trial = dict(micro_ms=micro_ms, merged_ms=merged_ms, cached=cached)
    if ratio < SPEEDUP:
        return MergeChoice(False, f"one micro-batch of {b * ga} measured {ratio:.2f}x {ga} of {b} (needs {SPEEDUP:g}x)",
                           b, ga, **trial)
    return MergeChoice(True, f"one micro-batch of {b * ga} measured {ratio:.2f}x faster than {ga} of {b}",
                       b * ga, 1, **trial)


def decide_merge(rc: Config, model, batches, *, seq_len: int, world_size: int = 1, measure=measure_merge) -> MergeChoice:
    """Whether ``rc``'s step runs as one micro-batch (see the module docstring). ``seq_len``: the longest
    row the run trains on (for the memory estimate)."""
    on_gpu = next(model.parameters()).device.type != "cpu" or _cuda_available()
    if (settled := _before_trial(rc, model.config, on_gpu=on_gpu, world_size=world_size, seq_len=seq_len)) is not None:
        return settled
    b, ga = int(rc.batch_size), int(rc.gradient_accumulation)
    examples = _typical_step(batches, b * ga)
    if examples is None:
        return MergeChoice(False, "fewer examples than one step", b, ga)
    key = _cache_key(rc, model.config, max(len(e.input_ids) for e in examples))
    entry = cached_entry(CACHE, key)
    if entry is not None and {"micro_ms", "merged_ms"} <= set(entry):
        return _from_trial(rc, entry["micro_ms"], entry["merged_ms"], cached=True)
    micro_ms, merged_ms = measure(model, examples, batches.collator, micro=b, precision=rc.precision,
                                  attention_auto=rc.attn_implementation == "auto" and not rc.packing)
    store_entry(CACHE, key, {"micro_ms": round(micro_ms, 1), "merged_ms": round(merged_ms, 1)})
    return _from_trial(rc, micro_ms, merged_ms, cached=False)


def _preview_choice(rc: Config, model_cfg, lengths: list[int] | None, *, seq_len: int) -> MergeChoice | None:
    """The rule's decision, or this machine's cached trial for the same shapes (None: a trial at the start decides)."""
    settled = _before_trial(rc, model_cfg, on_gpu=_cuda_available(), world_size=world_size(), seq_len=seq_len)
    b, ga = int(rc.batch_size), int(rc.gradient_accumulation)
    idx = _typical_indices(lengths, len(lengths) if lengths is not None else 0, b * ga) if settled is None else None
    if settled is None and idx is not None:
        entry = cached_entry(CACHE, _cache_key(rc, model_cfg, max(lengths[i] for i in idx)))
        if entry is not None and {"micro_ms", "merged_ms"} <= set(entry):
            settled = _from_trial(rc, entry["micro_ms"], entry["merged_ms"], cached=True)
    return settled


def preview_merge(rc: Config, model_cfg, lengths: list[int] | None, *, seq_len: int) -> str:
    """What ``merge_micro_batches`` will do, for `train --check` (which loads no model): the rule, or
    this machine's cached trial for the same shapes, or that a trial at the start decides."""
    return check_preview(rc, model_cfg, lengths, seq_len=seq_len)["merge"]


def check_preview(rc: Config, model_cfg, lengths: list[int] | None, *, seq_len: int) -> dict:
    """`train --check`'s ``merge`` line (:func:`preview_merge`) and ``memory`` line, the latter for the
    micro-batch that will run: one of batch x accumulation where the rule or a cached trial merges them."""
    settled = _preview_choice(rc, model_cfg, lengths, seq_len=seq_len)
    b, ga = int(rc.batch_size), int(rc.gradient_accumulation)
    runs = merged_config(rc, settled) if settled is not None else rc
    memory = memory_line(runs, model_cfg, seq_len)
    if settled is None:
        return {"memory": memory, "merge": f"merge_micro_batches: auto: a trial at the start decides ({ga} micro-batches "
                                           f"of {b} against one, on this run's model and examples)"}
    if settled.micro_ms is not None:
        line = f"merge_micro_batches: {'on' if settled.enabled else 'off'} (this machine's earlier trial: {settled.reason})"
    else:
        line = f"merge_micro_batches: {'on' if settled.enabled else 'off'} ({settled.reason})"
    return {"memory": memory, "merge": line}


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


__all__ = ["MergeChoice", "check_preview", "decide_merge", "measure_merge", "merged_config", "preview_merge", "speed_choices"]
