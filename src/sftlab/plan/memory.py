"""Training-memory estimator: peak bytes of one training step, part by part.

Pure functions on a :class:`~sftlab.plan.shapes.ModelShape` and a :class:`TrainSetup`. What is counted
is what the training code really holds (transformers Trainer + peft, SDPA attention, torch AdamW,
non-reentrant gradient checkpointing, the chunked cross-entropy of ``sftlab.core.loss``):

* weights, gradients and optimizer state. Under bf16/fp16 mixed precision the model is kept in fp32 and
  run under autocast, which is the published accounting of 16 bytes per parameter for Adam: a 2-byte
  compute copy of the weights, 2 bytes of gradients, and 12 bytes of optimizer state (4 fp32 master
  weights + 4 + 4 Adam moments). LoRA, QLoRA and prefix tuning keep the frozen base in the compute dtype
  (4-bit NF4 for QLoRA, on CPU as on CUDA: the linears' weights at about half a byte per parameter plus
  the quantisation constants) and train fp32 adapters.
* activations: the tensors autograd saves for backward, counted per layer from the Llama block as
  transformers writes it (see :func:`layer_activation_bytes`); with checkpointing only each layer's
  input is kept, plus one layer recomputed during backward.
* the loss: the training loss never holds all ``[tokens, vocab]`` logits; it projects ``loss_chunk``
  rows at a time and recomputes them in backward (see :func:`logits_bytes`).
* framework overhead (on CUDA also the CUDA context).

The peak is the largest of the moments of a step: the backward of the loss (all activations and one
chunk of logits alive), the backward through one recomputed layer (checkpointing), the end of backward
(all gradients alive, the embedding's being built) and the optimizer step (its temporaries).
``breakdown`` lists the parts alive at the peak, so it sums to ``total_bytes``.

Assumes batches without padding inside the attention (equal lengths or packing): with a padding mask
SDPA may fall back to a kernel that stores the ``seq x seq`` attention matrix per head.

On CPU the estimate is of the `sftlab train` process's peak resident memory: the live tensors plus the
process's baseline (libraries, tokenizer, data: :func:`process_baseline_bytes`) plus, with glibc's default
malloc (``setup.malloc == "glibc"``, what `train` runs by default), the freed temporaries glibc keeps
resident (:func:`sftlab.plan.heap.heap_retained_bytes`, in every moment: the heap does not shrink). With
``SFTLAB_MALLOC=lean`` resident memory follows the live tensors and that part is 0. On CUDA it is
reserved memory: live tensors plus the CUDA context and a fixed allocator slack.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from sftlab.core.attention import eager_extra_bytes
from sftlab.plan.heap import heap_retained_bytes
from sftlab.plan.setup import (
    ALL_LINEAR,
    DEVICES,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    TrainSetup,
    attention_kernel,
    dtype_bytes,
)
from sftlab.plan.shapes import SEQ_LIMIT, ModelShape

GB = 1e9
# On CPU: kernel-library code paged in on first use, thread pools and small-block allocator slack, seen
# on top of the live tensors by benchmarks/plan_memory.py (with the allocator set as in
# sftlab.plan.allocator). On CUDA: the context, and cuBLAS workspaces plus caching-allocator slack.
CPU_OVERHEAD_BYTES = 80_000_000
# On CPU the plan is of the whole `sftlab train` process's resident memory, so it counts what the process
# holds before the model loads, measured once (RSS after each import, SmolLM2's tokenizer, 2-core Xeon,
# torch 2.13 CPU, transformers 5): the interpreter with torch 290 MB, transformers, peft, datasets and
# sftlab 313 MB more; the tokenizer and the prepared data about 1.15 KB per vocabulary entry (57 MB at 49k).
# On a GPU none of this is device memory.
CPU_LIBRARY_BYTES = 603_000_000
CPU_TOKENIZER_BYTES_PER_VOCAB = 1_150
CUDA_CONTEXT_BYTES = 500_000_000
CUDA_OVERHEAD_BYTES = 200_000_000
# bitsandbytes NF4 with double quantisation: 4 bits + an 8-bit absmax per 64 + an fp32 per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class MemoryEstimate:
    """Peak training memory. ``breakdown`` holds the parts alive at the peak and sums to ``total_bytes``."""

    total_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    params: int
    trainable_params: int
    activation_bytes_per_layer: dict[str, int]
    setup: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

# --- parameters and static memory -------------------------------------------------------------


def lora_param_count(shape: ModelShape, r: int, targets: tuple[str, ...] = ALL_LINEAR) -> int:
    """LoRA adds A [r x in] and B [out x r] to each targeted linear of every layer."""
    lin = shape.linear_shapes()
    return shape.n_layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets)


def prefix_param_count(shape: ModelShape, tokens: int) -> int:
    """Prefix tuning (no reparameterisation): a key and a value vector per virtual token per layer."""
    return shape.n_layers * 2 * tokens * shape.kv_width


def trainable_params(shape: ModelShape, s: TrainSetup) -> int:
    if s.method == "full":
        return shape.params
    if s.method == "prefix":
        return prefix_param_count(shape, s.prefix_tokens)
    return lora_param_count(shape, s.lora_r, s.lora_targets)


def _optimizer_bytes_per_param(s: TrainSetup) -> float:
    """Optimizer state per trained parameter, fp32 master weights included under mixed precision."""
    state = {"adamw": 8.0, "adam": 8.0, "sgd": 0.0, "adamw8bit": 2.0 + 8 / 256}[s.optimizer]
    if s.resolved_precision == "bf16" or s.resolved_precision == "fp16":
        state += 4.0  # the fp32 master copy the optimizer updates
    return state


def static_parts(shape: ModelShape, s: TrainSetup) -> dict[str, int]:
    """Weights, gradients and optimizer state of the model and of the adapters, in bytes."""
    b = dtype_bytes(shape, s)
    opt = _optimizer_bytes_per_param(s)
    parts: dict[str, int] = {}
    if s.method == "full":
        parts["weights"] = shape.params * b.weight
        parts["gradients"] = shape.params * b.weight
        parts["optimizer"] = int(shape.params * opt)
        if s.ewc:  # train/continual.py's EWC: the anchor and the Fisher, each like the parameter, all run long
            parts["EWC anchor and Fisher"] = 2 * shape.params * b.weight
        return parts
    if s.method == "qlora":
        linear = shape.n_layers * shape.layer_linear_params
        rest = shape.params - linear  # embeddings, head and norms stay in the compute dtype
        parts["weights"] = int(linear * NF4_BYTES_PER_PARAM + rest * b.compute)
    else:
        parts["weights"] = shape.params * b.weight
    n = trainable_params(shape, s)
    # Adapters are trained in fp32 (peft upcasts them), so their gradients are fp32 too.
    parts["adapter_weights"] = n * 4
    parts["adapter_gradients"] = n * 4
    parts["adapter_optimizer"] = int(n * (opt - (4.0 if s.mixed else 0.0)))
    if s.ewc:
        parts["EWC anchor and Fisher"] = 2 * n * 4
    return parts

# --- activations ------------------------------------------------------------------------------


def layer_activation_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """Bytes one decoder layer saves for backward per token, without checkpointing.

    Counted from the Llama block (RMSNorm -> q/k/v -> RoPE -> SDPA -> o -> residual -> RMSNorm ->
    gate/up -> SiLU * up -> down -> residual), checked with ``torch.autograd.graph.saved_tensors_hooks``:
    * every method: both norm inputs (fp32, the norm upcasts), the rotated q and k, v and the attention
      output (SDPA keeps them and a log-sum-exp per head), gate, SiLU(gate) and up;
    * full fine-tuning adds what the weight gradients need: both normalised tensors (norm weights) and
      the inputs of the q/k/v, gate/up and down linears (under autocast, one bf16 copy per linear);
    * LoRA adds, per targeted linear, the rank-r output of A and either its input (shared by q/k/v and
      by gate/up) or, with dropout, the dropout output and its mask;
    * QLoRA's 4-bit matmul also keeps its input; prefix tuning keeps keys and values repeated to every
      head over the prefix too (it passes an attention mask, which rules out grouped-query SDPA).
    * ``liger_kernels`` (from liger-kernel 0.8.5's ``save_for_backward`` calls, not yet measured on a GPU):
      the norms keep their input as it comes and an fp32 rsqrt per row (no fp32 copy, no normalised
      tensor), the SwiGLU keeps gate and up (SiLU(gate) is recomputed); RoPE keeps what HF's does.
    """
    b = dtype_bytes(shape, s)
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    # norm inputs (liger's norm keeps them as they come, HF's an fp32 copy), rsqrt, log-sum-exp
    total = 2 * h * (b.residual if s.liger_kernels else 4) + 2 * 4 + shape.n_heads * 4
    if attention_kernel(shape, s) == "eager":               # the [heads, L] softmax row of every token
        total += eager_extra_bytes(1, s.seq_len, shape.n_heads, 1, b.compute) // s.seq_len
    total += (2 * q + 2 * kv) * b.compute                   # q, k, v, attention output
    total += (2 if s.liger_kernels else 3) * i * b.compute  # gate, silu(gate) (not liger's), up
    width = {"attn_in": h, "attn_out": q, "mlp_in": h, "mlp_prod": i}
    dtype = {"attn_in": b.residual, "attn_out": b.compute, "mlp_in": b.residual, "mlp_prod": b.compute}
    site_input = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                  "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_prod"}
    if s.method == "full":
        if not s.liger_kernels:  # liger's norm gets its weight's gradient from the input and rsqrt
            total += 2 * h * b.residual                     # normalised tensors, for the norm weights
        if s.mixed:  # autocast casts the fp32 input once per linear, and each linear keeps its copy
            total += (3 * h + 2 * h) * b.compute + i * b.compute
        else:
            total += 2 * h * b.residual + i * b.compute
        return total
    kept: set[str] = {"attn_out"}                           # SDPA already keeps the attention output
    if s.method == "qlora":
        kept |= {"attn_in", "mlp_in", "mlp_prod"}           # bitsandbytes' matmul keeps its input
        total += 2 * h * b.residual + i * b.compute
    # peft would cast each linear's input to the fp32 adapter weights and autocast cast it back, leaving
    # every adapted linear its own copy; sftlab's trainer skips that cast under autocast
    # (train/model.py, CastUnlessAutocast), so q/k/v and gate/up share their input.
    if s.method in ("lora", "qlora"):
        for site in s.lora_targets:
            g = site_input[site]
            total += s.lora_r * b.compute                   # A's output, kept by B
            if s.lora_dropout > 0:                          # mask and dropped input, per linear
                total += width[g] * (b.mask + dtype[g])
            elif g not in kept:
                total += width[g] * dtype[g]
                kept.add(g)
    if s.method == "prefix":
        # The prefix needs an attention mask, so SDPA gets keys and values repeated to every query
        # head (no grouped-query shortcut), over seq_len + prefix positions.
        p, n = s.prefix_tokens, max(s.seq_len, 1)
        total += 2 * (q * (n + p) // n - kv) * b.compute
    return total


def process_baseline_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """Resident memory of `sftlab train` before the model loads: libraries, tokenizer, data (CPU only)."""
    if s.device != "cpu":
        return 0
    return CPU_LIBRARY_BYTES + CPU_TOKENIZER_BYTES_PER_VOCAB * shape.vocab


def _backward_transient_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """Gradient buffers in flight while back-propagating through one layer, per token."""
    b = dtype_bytes(shape, s)
    return (3 * shape.intermediate + 2 * shape.hidden) * b.compute


def _head_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """Per token: the final norm's saved input (fp32) and the gathered hidden state the loss keeps."""
    b = dtype_bytes(shape, s)
    normed = shape.hidden * b.residual if s.method == "full" and not s.liger_kernels else 0
    mask = (s.seq_len + s.prefix_tokens) * 4 if s.method == "prefix" else 0  # the float attention mask
    norm_in = b.residual if s.liger_kernels else 4
    return shape.hidden * norm_in + shape.hidden * b.residual + normed + mask


def _trained_rows(s: TrainSetup) -> int:
    """Positions with a trained next-token label in one micro-batch."""
    return max(1, math.ceil(s.batch * max(s.seq_len - 1, 1) * s.trained_fraction))


def loss_rows(s: TrainSetup) -> int:
    """Rows the loss projects to the vocabulary at once: the trained positions, chunked."""
    return min(s.loss_chunk, _trained_rows(s))


def logits_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """The loss's peak: one chunk of logits, recomputed in backward, in fp32.

    The training loss (``sftlab.core.loss``) never holds all ``[tokens, vocab]`` logits: the head is
    applied to ``loss_chunk`` rows at a time under checkpointing. Backward of a chunk holds its
    recomputed fp32 log-probabilities, their gradient and the logits' gradient: 12 bytes per element
    (the forward holds less: logits, their fp32 copy and the log-probabilities).

    With ``fused_loss`` (liger-kernel's fused linear cross entropy, as sftlab calls it: per-token losses,
    so liger >= 0.8.2 recomputes in backward) see :func:`fused_loss_bytes`.
    """
    if s.fused_loss:
        return fused_loss_bytes(shape, s)
    return 12 * loss_rows(s) * shape.vocab


def fused_loss_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """liger's backward: logits of one chunk and their per-token-scaled gradient (compute dtype), the
    hidden states' gradient for every trained row (the rows' dtype) and the fp32 per-row losses. Its
    chunk is ``next_power_of_2(rows / ceil(vocab / hidden))`` rows: the logits of a chunk are about the
    size of the hidden states."""
    b = dtype_bytes(shape, s)
    rows = _trained_rows(s)
    per_chunk = -(-rows // -(-shape.vocab // shape.hidden))
    chunk = min(rows, 1 << (per_chunk - 1).bit_length())
    return 2 * chunk * shape.vocab * b.compute + rows * shape.hidden * b.residual + rows * 4

# --- the estimate -----------------------------------------------------------------------------


def estimate_memory(shape: ModelShape, setup: TrainSetup) -> MemoryEstimate:
    """Peak memory of a training run: on CPU the `sftlab train` process's resident memory (its baseline
    included, with the allocator as training sets it); on CUDA the device memory (the CUDA context and
    the caching allocator's slack included, i.e. reserved memory as ``nvidia-smi`` shows it)."""
    s = setup
    b = dtype_bytes(shape, s)
    static = static_parts(shape, s)
    n_tok = s.tokens
    per_layer = layer_activation_bytes(shape, s)
    ckpt_per_layer = shape.hidden * b.residual                 # the layer input, kept by the checkpoint
    transient = _backward_transient_bytes(shape, s) * n_tok
    overhead = {"process baseline": process_baseline_bytes(shape, s), "overhead": CPU_OVERHEAD_BYTES,
                "malloc retention": heap_retained_bytes(shape, s)} if s.device == "cpu" else {
        "cuda_context": CUDA_CONTEXT_BYTES, "overhead": CUDA_OVERHEAD_BYTES}
    if s.method == "qlora":  # one layer's weight dequantised to the compute dtype at a time
        overhead["overhead"] += 2 * max(a * c for a, c in shape.linear_shapes().values()) * b.compute

    grads = {k: v for k, v in static.items() if k in ("gradients", "adapter_gradients")}
    held = {k: v for k, v in static.items() if k not in grads}
    if s.grad_accum > 1:  # gradients of earlier micro-batches stay alive through the next forward
        held.update(grads)
    logits = {"fused loss" if s.fused_loss else "logits": logits_bytes(shape, s)}
    head = _head_bytes(shape, s) * n_tok
    head_grad = {}
    if s.method == "full" and s.grad_accum == 1:
        # The output head's weight gradient (fp32) appears in the loss's backward, before any layer's;
        # a second chunk adds its contribution through one more temporary of the same size.
        # liger's fused loss adds every chunk's into one buffer.
        chunks = 1 if s.fused_loss else -(-_trained_rows(s) // s.loss_chunk)
        head_grad = {"gradients (output head)": shape.vocab * shape.hidden * 4 * (2 if chunks > 1 else 1)}

    if s.ewc and s.method == "full":
        # EWC's penalty, computed after the forward with every activation alive: F * (θ - θ*) of one
        # tensor at a time, two temporaries of the largest (the embedding). Adapters' are negligible.
        largest = max(shape.vocab * shape.hidden, *(a * c for a, c in shape.linear_shapes().values()))
        logits["EWC penalty (transient)"] = 2 * largest * b.weight
    candidates: dict[str, dict[str, int]] = {}
    if s.gradient_checkpointing:
        kept = shape.n_layers * ckpt_per_layer * n_tok
        fwd_held = dict(held)
        if s.method == "full" and s.mixed:
            # Under autocast the compute copy of the weights lives only while something saved for
            # backward holds it; with checkpointing nothing does once the forward is over.
            fwd_held["weights"] = 0
        candidates["loss backward"] = {**fwd_held, "activations": kept + head, **logits, **head_grad, **overhead}
        # Backward through one recomputed layer: its saved tensors and gradient buffers. The logits are
        # gone by then; the kept layer inputs shrink while the gradients grow, so count the larger.
        recomputed = per_layer * n_tok + transient
        grown = sum(grads.values()) if s.grad_accum == 1 else 0
        if s.method == "full" and s.mixed:
            fwd_held["weights"] = shape.layer_linear_params * b.compute  # one recomputed layer's copy
        if grown > kept:
            candidates["backward"] = {**fwd_held, "activations": recomputed, **grads, **overhead}
        else:
            candidates["backward"] = {**fwd_held, "activations": recomputed + kept, **overhead}
    else:
        candidates["loss backward"] = {**held, "activations": shape.n_layers * per_layer * n_tok + head,
                                       **logits, **head_grad, **overhead}
    if s.method == "full":
        # At the end of backward the input-embedding gradient is built whole ([vocab, hidden], fp32);
        # with tied embeddings it is then added to the head's gradient through one more temporary.
        candidates["end of backward"] = {**static, **overhead, "embedding gradient (transient)":
                                         shape.vocab * shape.hidden * 4 * (2 if shape.tied_embeddings else 1)}
    # The optimizer step allocates nothing more: AdamW is torch's fused kernel (in place, on CPU and CUDA;
    # the per-tensor loop made sqrt and quotient copies of each tensor), SGD and 8-bit AdamW are in place.
    candidates["optimizer step"] = {**static, **overhead}

    phases = {name: sum(parts.values()) for name, parts in candidates.items()}
    peak = max(phases, key=phases.get)
    breakdown = {k: int(v) for k, v in candidates[peak].items() if v}
    return MemoryEstimate(
        total_bytes=int(sum(breakdown.values())), breakdown=breakdown, peak_phase=peak,
        phases={k: int(v) for k, v in phases.items()}, params=shape.params,
        trainable_params=trainable_params(shape, s),
        activation_bytes_per_layer={"no_checkpointing": int(per_layer * n_tok),
                                    "checkpointing": int(ckpt_per_layer * n_tok)},
        setup=s.to_dict())


def static_bytes_per_param(shape: ModelShape, setup: TrainSetup) -> float:
    """Weights + gradients + optimizer state per parameter, before activations."""
    return sum(static_parts(shape, setup).values()) / shape.params


def _largest(fits, limit: int) -> int:
    """Largest n in [1, limit] with fits(n) true, for a monotone fits; 0 when fits(1) is false."""
    if limit < 1 or not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)  # fits(lo) is true, fits(hi) false or past the limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


BATCH_LIMIT = 1 << 16  # the largest micro-batch a plan searches


def max_batch(shape: ModelShape, setup: TrainSetup, budget_bytes: float, limit: int = BATCH_LIMIT) -> int:
    """Largest micro-batch that fits ``budget_bytes`` at ``setup.seq_len``; 0 when none does."""
    return _largest(lambda n: estimate_memory(shape, replace(setup, batch=n)).total_bytes <= budget_bytes, limit)


def max_seq_len(shape: ModelShape, setup: TrainSetup, budget_bytes: float, limit: int = SEQ_LIMIT) -> int:
    """Largest sequence length that fits ``budget_bytes`` at ``setup.batch``; 0 when none does."""
    return _largest(lambda n: estimate_memory(shape, replace(setup, seq_len=n)).total_bytes <= budget_bytes, limit)

__all__ = ["ALL_LINEAR", "METHODS", "OPTIMIZERS", "PRECISIONS", "DEVICES", "GB", "TrainSetup", "MemoryEstimate",
           "estimate_memory", "fused_loss_bytes", "layer_activation_bytes", "logits_bytes", "process_baseline_bytes", "lora_param_count", "prefix_param_count",
           "trainable_params", "static_parts", "static_bytes_per_param", "max_batch", "max_seq_len"]
