"""Decide the approach (`sftlab recommend`) and a training configuration that fits (`sftlab plan`).

- :func:`recommend` applies the decision framework to a :class:`UseCase` (prompting, few-shot, RAG,
  PEFT or full SFT) and says why.
- :func:`resolve_auto` resolves every `auto` of a training config (learning rate, epochs, batch,
  checkpointing, precision), for `sftlab train` and the recommendations here alike.
- :func:`estimate_memory` gives the peak memory of a training step for a :class:`ModelShape` (read from
  a real config by :func:`load_shape`, or typical for a size by :func:`shape_from_params`) and a
  :class:`TrainSetup`, part by part; :func:`make_plan` adds where it fits, the largest batch and length
  under a budget, and a recommended configuration.
"""

from sftlab.plan.allocator import release_freed_memory
from sftlab.plan.auto import (
    batch_for_memory,
    epochs_for_data,
    lr_for_size,
    resolve_auto,
)
from sftlab.plan.fit import (
    COMMON_GPUS_GB,
    Machine,
    Plan,
    Recommended,
    fits,
    make_plan,
    recommend_config,
    this_machine,
)
from sftlab.plan.memory import (
    ALL_LINEAR,
    METHODS,
    MemoryEstimate,
    TrainSetup,
    estimate_memory,
    layer_activation_bytes,
    logits_bytes,
    lora_param_count,
    max_batch,
    max_seq_len,
    static_bytes_per_param,
    static_parts,
    trainable_params,
)
from sftlab.plan.recommend import Recommendation, UseCase, load_use_case, recommend
from sftlab.plan.render import render_plan, render_recommendation
from sftlab.plan.shapes import (
    ModelShape,
    known_shapes,
    load_shape,
    parse_param_count,
    shape_from_config,
    shape_from_params,
)

__all__ = [
    "ALL_LINEAR", "COMMON_GPUS_GB", "METHODS", "Machine", "MemoryEstimate", "ModelShape", "Plan",
    "Recommendation", "Recommended", "TrainSetup", "UseCase", "batch_for_memory", "epochs_for_data",
    "estimate_memory", "fits", "known_shapes", "layer_activation_bytes", "load_shape", "load_use_case",
    "logits_bytes", "lora_param_count", "lr_for_size", "make_plan", "max_batch", "max_seq_len",
    "parse_param_count", "recommend", "recommend_config", "release_freed_memory", "render_plan",
    "render_recommendation", "resolve_auto", "shape_from_config", "shape_from_params", "static_bytes_per_param",
    "static_parts", "this_machine", "trainable_params",
]
