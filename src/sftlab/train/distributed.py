"""How a run spreads over processes: world size and the one writing process, the sharding arguments
(FSDP2, DeepSpeed) for TrainingArguments, and what really ran (for the summary)."""

from __future__ import annotations

import os

from sftlab.config import Config
from sftlab.core.errors import SftlabError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_global_main() -> bool:
    """Global rank 0 (torchrun, accelerate and Ray Train set RANK): the one process that writes the run
    folder. Not LOCAL_RANK: on N nodes there are N processes with local rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def sharding_arguments(rc: Config, cuda: bool) -> dict:
    """TrainingArguments for ``fsdp`` (accelerate's FSDP2: 'full_shard' or 'shard_grad_op', plus
    'offload', 'auto_wrap') and ``deepspeed``; FSDP's own activation checkpointing replaces Trainer's.
    On CPU processes (gloo) FSDP2 runs too (SftlabTrainer turns it on where accelerate would not)."""
    if not rc.fsdp and not rc.deepspeed:
        return {}
    opts = set((rc.fsdp or "").split())
    unknown = opts - {"full_shard", "shard_grad_op", "offload", "auto_wrap"}
    if unknown or {"full_shard", "shard_grad_op"} <= opts:
        raise SftlabError(f"fsdp={rc.fsdp!r}: FSDP2 takes 'full_shard' or 'shard_grad_op', plus 'offload', 'auto_wrap'",
                          hint="e.g. --set fsdp='full_shard auto_wrap'")
    if rc.deepspeed:
        if not cuda:  # accelerate turns DeepSpeed on only for GPUs: on CPU the run would silently be DDP
            raise SftlabError("deepspeed needs CUDA GPUs (accelerate ignores it on CPU)",
                              hint="unset it to train with DDP on CPU, or shard with fsdp under torchrun")
        return {"deepspeed": rc.deepspeed}
    if not cuda and "LOCAL_RANK" not in os.environ and world_size() <= 1:
        raise SftlabError("fsdp on CPU shards the model over processes, and this run is one process",
                          hint="launch it with torchrun --nproc-per-node 2 -m sftlab.cli train ...")
    if not cuda and "offload" in opts:  # FSDP2 pins offloaded shards in page-locked memory: a GPU call
        raise SftlabError("fsdp 'offload' needs a GPU (FSDP2 pins the offloaded shards; on CPU they are in CPU memory "
                          "already)", hint=f"--set fsdp='{' '.join(sorted(opts - {'offload'})) or 'full_shard'}'")
    return {"fsdp": True,
            "fsdp_config": {"version": 2, "reshard_after_forward": "shard_grad_op" not in opts,
                            "cpu_offload": "offload" in opts, "state_dict_type": "FULL_STATE_DICT",
                            "activation_checkpointing": bool(rc.gradient_checkpointing)}}


def distributed_summary(trainer) -> dict | None:
    """What really ran over several processes: FSDP2 when the parameters are DTensors (sharded)."""
    if world_size() <= 1:
        return None
    sharded = any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    kind = "deepspeed" if trainer.is_deepspeed_enabled else "fsdp2" if sharded else "ddp"
    return {"processes": world_size(), "sharding": kind}
