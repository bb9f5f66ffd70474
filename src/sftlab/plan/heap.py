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
(the heap stops growing by the third step). Full fine-tuning keeps all its intermediate-width tensors
for backward, so without checkpointing it has none (its remaining gap to the process is not modelled).
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
    summed, without (a checkpointed forward) the most alive at once.

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
        return 3 * i * c * gate_up + product
    noise_and_output = 2 * i * c if dropout and "down_proj" in adapted else 0
    down = i * c + noise_and_output                             # the product, then down's own
    mlp = 3 * i * c                                             # act(gate), up and their product
    if peft_path and "up_proj" in adapted:                      # gate's output while up's adapter runs
        mlp = max(mlp, i * c + 3 * i * c)
    return max(mlp, down)


def heap_retained_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """Resident memory glibc keeps on top of the live tensors (0 on CUDA, with ``SFTLAB_MALLOC=lean``
    and where the C library is not glibc): every layer's intermediate-width temporaries."""
    if s.device != "cpu" or s.malloc != "glibc":
        return 0
    return shape.n_layers * s.tokens * layer_wide_temporary_bytes(shape, s, grad=not s.gradient_checkpointing)


__all__ = ["heap_retained_bytes", "layer_wide_temporary_bytes"]
