"""What glibc's malloc keeps resident beyond the live tensors in a CPU training step.

Measured on SmolLM2-135M (benchmarks/RESULTS.md, every large malloc and free traced; the allocator side
in :mod:`sftlab.plan.allocator`): PyTorch allocates each CPU tensor with ``posix_memalign(64)``, and
glibc (2.36 here) never gives a freed tensor's block to a later tensor of the same size (it asks for 112
bytes more than the block), nor, mostly, merges it with the freed block beside it (the alignment
remainders between them wait in its cache). The widest per-token tensors of a layer are the MLP's
intermediate-width ones, so a freed intermediate-width block only ever takes narrower tensors, and each
intermediate-width temporary (a tensor the layer's forward creates and frees before it ends: with peft's
LoRA forward the base output, adapter output and its scaling at ``gate_proj`` and ``up_proj``, ...) takes
fresh heap. glibc returns heap to the OS only from its top, above which the saved activations sit, so it
stays resident:

* with grad (no checkpointing), the narrower tensors that fill those blocks are the next layers' saved
  activations, which stay until backward: every intermediate-width temporary of every layer stays in the
  heap (traced: from the second step on, each layer the old heap cannot hold grows it by its saved
  activations plus all six such LoRA temporaries);
* without grad (the forward of checkpointed layers), everything is freed within a few operations, so
  only the most intermediate-width temporaries alive at once are fresh per layer (traced: the first
  checkpointed forward grows the heap by four such blocks per layer with LoRA).

So the process peaks at the live tensors plus ``n_layers x tokens x`` :func:`layer_wide_temporary_bytes`
(the heap stops growing by the third step). Where no intermediate-width temporary is freed with grad
(full fine-tuning keeps them all for backward; so does LoRA on sftlab's fused linear), the widest freed
temporaries are hidden-width and take fresh heap the same way (:func:`hidden_wide_temporary_bytes`).
The heap's state before training matters: a stack of layers run alone, on a fresh heap, keeps less
without grad and somewhat more with it (tests/plan/test_heap.py measures the per-layer count op by op,
benchmarks/plan_memory.py ``--glibc-default`` the whole process). 0 on CUDA (the caching allocator
reuses blocks by size; its slack is in sftlab.plan.memory), with ``SFTLAB_MALLOC=lean`` and where the
C library is not glibc.
"""

from __future__ import annotations

from sftlab.plan.setup import TrainSetup, dtype_bytes
from sftlab.plan.shapes import ModelShape


def layer_wide_temporary_bytes(shape: ModelShape, s: TrainSetup, *, grad: bool = True) -> int:
    """Per token, a decoder layer's forward temporaries of intermediate width: with ``grad`` all of them
    summed, without (a checkpointed forward) the most alive at once. With ``grad`` and none of
    intermediate width, the widest there are instead (:func:`hidden_wide_temporary_bytes`).

    From the Llama MLP, ``down(act(gate(x)) * up(x))``, as sftlab runs its linears:
    * LoRA without dropout runs sftlab's fused linear (train/lora_fast.py), which adds the adapter's
      product into the base output in place: no temporary of its own. Its input (the product
      ``act(gate) * up`` at ``down_proj``) is kept for backward;
    * with dropout, peft's forward: a wrapped ``gate_proj`` or ``up_proj`` makes three, the base output,
      ``B``'s output and its scaling (the sum with the base output is the linear's output), and a wrapped
      ``down_proj`` adds, without grad, dropout's noise and output (with grad ``A`` keeps the output);
      sftlab's trainer skips peft's cast of the input to the fp32 adapter dtype under autocast
      (train/model.py), so there is no fp32 copy;
    * the product ``act(gate) * up`` is a temporary unless a linear keeps it for backward (full
      fine-tuning does; LoRA's ``A`` or the fused linear does without dropout);
    * without grad the outputs of ``gate``, ``act`` and ``up`` are temporaries too.
    (FSDP runs peft's forward: not modelled here.) Checked op by op (a TorchDispatchMode over one layer)
    on SmolLM2 and a tiny Llama.
    """
    b = dtype_bytes(shape, s)
    c, i = b.compute, shape.intermediate
    adapted = set(s.lora_targets) if s.method in ("lora", "qlora") else set()
    dropout = bool(adapted) and s.lora_dropout > 0
    peft_path = bool(adapted) and (s.method == "qlora" or dropout)  # else the fused linear, or no adapter
    gate_up = len(adapted & {"gate_proj", "up_proj"}) if peft_path else 0
    if grad:
        kept = s.method == "full" or ("down_proj" in adapted and not dropout)
        product = 0 if kept else i * c
        return (3 * i * c * gate_up + product) or hidden_wide_temporary_bytes(shape, s)
    noise_and_output = 2 * i * c if dropout and "down_proj" in adapted else 0
    down = i * c + noise_and_output                             # the product, then down's own
    mlp = 3 * i * c                                             # act(gate), up and their product
    if peft_path and "up_proj" in adapted:                      # gate's output while up's adapter runs
        mlp = max(mlp, i * c + 3 * i * c)
    return max(mlp, down)


def hidden_wide_temporary_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """Per token, with grad, a layer's freed temporaries of the widest size a token has among them when no
    intermediate-width one is freed (full fine-tuning, and LoRA on sftlab's fused linear): each takes
    fresh heap, as no freed block is wider (the module docstring's premise). These are hidden-width,
    counted op by op (a TorchDispatchMode over one layer of SmolLM2 and of a tiny Llama, 2026-11-30):

    * fp32: the outputs of ``q_proj``, ``o_proj`` and ``down_proj`` (RoPE and the residual adds do not
      keep them), RoPE's two products and its ``cat`` for q, each norm's ``pow`` and, where its weight is
      frozen (LoRA), its ``x * rsqrt``: 10 with LoRA, 8 with full fine-tuning;
    * under bf16/fp16 autocast the widest are fp32, the rest (compute dtype) fall into their blocks:
      LoRA (base in the compute dtype) each norm's ``pow`` and ``x * rsqrt`` (its fp32 copy of the input
      is kept, by ``pow``): 4;
      full fine-tuning (fp32 residual stream) the norms' ``pow`` and fp32 output (the linears keep its
      cast), and RoPE's two products and their sum for q, which the fp32 cos and sin promote: 7.

    glibc kept about 80% (fp32) and 93% (bf16) of this in the measured LoRA runs (benchmarks/RESULTS.md):
    a few neighbouring holes do merge. The term counts all of it, so the plan errs high by the rest.
    """
    h, q, kv = shape.hidden, shape.q_width, shape.kv_width
    c = 2 if s.mixed else 4
    full = s.method == "full"
    rope = 4 if s.mixed and full else c  # fp32 cos and sin promote RoPE's products over fp32 weights
    blocks = [(h, c), (h, c), (q, c), (kv, c)]  # outputs of o_proj, down_proj, q_proj, k_proj
    blocks += [(q, rope)] * 3 + [(kv, rope)] * 3  # RoPE: two products and their sum (their cat in fp32)
    # each norm (in fp32): pow; x * rsqrt where its weight is frozen (a trained weight keeps it), or under
    # autocast the fp32 output of full fine-tuning's norm (the linears keep its cast instead)
    per_norm = 1 + (not full or s.mixed)
    blocks += [(h, 4)] * (2 * per_norm)
    widest = max(w * b for w, b in blocks)
    return sum(w * b for w, b in blocks if w * b == widest)


def heap_retained_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """Resident memory glibc keeps on top of the live tensors (0 on CUDA, with ``SFTLAB_MALLOC=lean``
    and where the C library is not glibc): every layer's widest temporaries (:func:`layer_wide_temporary_bytes`)."""
    if s.device != "cpu" or s.malloc != "glibc":
        return 0
    return shape.n_layers * s.tokens * layer_wide_temporary_bytes(shape, s, grad=not s.gradient_checkpointing)


__all__ = ["heap_retained_bytes", "hidden_wide_temporary_bytes", "layer_wide_temporary_bytes"]
