"""A LoRA linear's training step as one autograd function: ``y = x W^T + s (x A^T) B^T``.

peft computes an adapted linear as the base layer's output plus ``lora_B(lora_A(x)) * scaling``: under
autograd that is two full-width elementwise ops forward (the scaling and the sum) and two backward (the
scaling's gradient and the sum of the input's two gradients), each a pass over a ``[tokens, width]``
tensor, for every adapted linear (210 in the default model), and a new tensor for each. Here the
adapter's product is accumulated into the base output by the matmul itself (``addmm_``), forward and
backward, and the scale is applied to the rank-wide tensors only. What backward keeps is what peft's
layers keep: the input and the rank-wide ``x A^T``.

It runs where it computes what peft's forward would (up to bf16 rounding: the adapter's product is
rounded once, not three times): one active vanilla LoRA adapter (no DoRA or other variant, no dropout),
not merged nor disabled, a plain bias-free ``nn.Linear`` base whose weight is frozen, the input in the
dtype the matmuls run in (autocast's; without autocast, base and adapter weights all in the input's
dtype), no sharded (FSDP, DeepSpeed) parameters. Everything else takes peft's own forward. With or
without gradients: a checkpointed layer's forward and evaluation under autocast run it too.
"""

from __future__ import annotations

import torch
from torch import nn


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        a = torch.mm(x2, lora_a.t())
        y = torch.mm(x2, weight.t()).addmm_(a, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, a, weight, lora_a, lora_b)
        ctx.scale = scale
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, a, weight, lora_a, lora_b = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        ga = torch.mm(g2, lora_b).mul_(ctx.scale)  # d(x A^T): rank-wide, the scale applied here
        dx = d_a = d_b = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g2, weight).addmm_(ga, lora_a).view(*grad.shape[:-1], x2.shape[-1])
        if ctx.needs_input_grad[2]:
            d_a = torch.mm(ga.t(), x2)
        if ctx.needs_input_grad[3]:
            d_b = torch.mm(g2.t(), a).mul_(ctx.scale)
        return dx, None, d_a, d_b, None


def _fast_inputs(layer, x, args, kwargs):
    """(weight, A, B, scale) in the compute dtype when the fused path computes what peft would, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) \
            or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.bias is not None or base.weight.requires_grad:
        return None
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
    else:  # no autocast: peft runs the adapter in its own dtype (fp32 beside a bf16 base): only all-equal
        dtype = base.weight.dtype
        if a.dtype != dtype or b.dtype != dtype:
            return None
    if x.dtype != dtype or base.weight.dtype != dtype:
        return None
    return base.weight, a.to(dtype), b.to(dtype), float(layer.scaling[name])


def _forward(self, x, *args, **kwargs):
    fast = _fast_inputs(self, x, args, kwargs)
    if fast is None:
        return super(type(self), self).forward(x, *args, **kwargs)
    return _LoraLinear.apply(x, *fast)


_CLASSES: dict[type, type] = {}


def use_fused_lora(model) -> int:
    """Gives every peft ``lora.Linear`` of ``model`` the fused forward (a subclass with only ``forward``
    changed, so copies, merging and saving see peft's layer); returns how many. Not for FSDP or DeepSpeed
    (they gather and free parameters around each module's own call; this reads the base weight)."""
    from peft.tuners.lora.layer import Linear as LoraLinear  # deferred: heavy library

    if LoraLinear not in _CLASSES:
        _CLASSES[LoraLinear] = type("FusedLinear", (LoraLinear,), {"forward": _forward, "__module__": __name__})
    fused = _CLASSES[LoraLinear]
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    for m in layers:
        m.__class__ = fused
    return len(layers)


__all__ = ["use_fused_lora"]
