"""The model for a run: base weights (4-bit for QLoRA), new token rows, and the PEFT method."""

from __future__ import annotations

import os

from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.core.loss import hidden_states_instead_of_logits, sft_loss
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Message
from sftlab.models import load_model
from sftlab.plan.auto import PREFIX_NO_CHECKPOINTING
from sftlab.qlora import require_qlora
from sftlab.train.kernels import apply_kernels, flash_attention_available
from sftlab.train.lora_fast import use_fused_lora


def _dtype(precision: str):
    import torch  # deferred: heavy library, imported on first use

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


class CastUnlessAutocast:
    """peft's LoRA layers cast each linear's input to the adapter's dtype (fp32) before ``A`` and ``B``.
    Under autocast that cast is undone at once (the adapter's matmuls run in bf16): two copies of every
    adapted linear's input per forward, two more in backward, and a bf16 copy per linear kept for backward
    where q/k/v (and gate/up) could share their input. peft reads its ``cast_input_dtype_enabled`` flag
    with ``not``: this flag is false while autocast is on (no cast: autocast does it, once, for the small
    adapter weights) and true outside it (peft's cast, e.g. generating after training without autocast).
    Measured on the default model (2-core Xeon, bf16): about 10% less time per LoRA step, same loss."""

    def __bool__(self) -> bool:
        import torch  # deferred: heavy library, imported on first use

        return not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))


def skip_adapter_input_casts(model) -> int:
    """Sets :class:`CastUnlessAutocast` on every peft adapter layer of ``model``; returns how many."""
    from peft.tuners.tuners_utils import (
        BaseTunerLayer,  # deferred: heavy library, imported on first use
    )

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "cast_input_dtype_enabled")]
    for m in layers:
        m.cast_input_dtype_enabled = CastUnlessAutocast()
    return len(layers)


def _sharded(cfg: Config) -> bool:
    """FSDP or DeepSpeed, from the config or from `accelerate launch`: they gather and free parameters
    around each module's own call, which the fused LoRA linear bypasses by reading the base weight."""
    launched = any(os.environ.get(v, "").lower() == "true" for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    return bool(cfg.fsdp) or bool(cfg.deepspeed) or launched


def _speed_up_adapters(cfg: Config, model) -> None:
    """Input gradients for checkpointing; no double input casts; LoRA linears as one fused function."""
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    if cfg.method in ("lora", "qlora"):
        skip_adapter_input_casts(model)
    if cfg.method == "lora" and not _sharded(cfg):
        use_fused_lora(model)


def _attention(cfg: Config) -> str | None:
    """The attention kernel to load: FlashAttention-2 (varlen, no mask) for packed rows on a GPU where
    it is installed under ``auto``; else SDPA (None: transformers' default; see core/attention.py)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "flash_attention_2" if cfg.packing and flash_attention_available() else None


# The text whose key/values start a prefix: the end of a finished exchange, so the data reads as the
# next conversation after it (as in a packed row), not as the continuation of random vectors.
PREFIX_SEED_CHAT = [Message("user", "Hi!"), Message("assistant", "Hello! How can I help you today?")]


def prefix_seed_ids(tok, template: ChatTemplate | None, n: int) -> list[int]:
    """``n`` token ids ending a rendered short chat (repeated when shorter): the prefix's starting text."""
    text = template.render(PREFIX_SEED_CHAT) if template is not None else "Hello! How can I help you today?\n\n"
    ids = tok.encode(text, add_special_tokens=False) or [tok.eos_token_id or 0]
    return (ids * (n // len(ids) + 1))[-n:]


def init_prefix_from_tokens(model, token_ids: list[int]) -> bool:
    """Start a prefix-tuning adapter as the base model's own per-layer keys and values of ``token_ids``.

    peft starts the prefix as random vectors: every layer's queries then attend to keys and values no
    real token produces, and the fresh model scores near-uniform predictions (loss ~10 on SmolLM2
    where the base scores ~0.8), so training first spends its steps undoing the damage. The keys and
    values of real text (rotated for positions 0..n-1, where the data's positions start after the
    prefix) make the untrained prefix model the base model reading that text first: about the base's
    loss. The keys and values go into a plain cache that keeps every token in every layer: the model's own
    cache keeps only the last ``sliding_window`` tokens in a sliding-window layer (Gemma 2/3), which left
    such a model's prefix at peft's random start. False (peft's start kept) where the cache's shape is
    still not the adapter's (per-layer head sizes)."""
    import inspect

    import torch  # deferred: heavy library, imported on first use
    from transformers import (
        DynamicCache,  # deferred: heavy library, imported on first use
    )

    emb = model.prompt_encoder[model.active_adapter].embedding.weight
    base = model.get_base_model()
    ids = torch.tensor([token_ids], device=emb.device)
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{name: DynamicCache()})
        cache = out.get("cache", out.get("past_key_values"))
        layers = getattr(cache, "layers", None) or []
        # each layer's keys/values (1, heads, n, head_dim) -> (n, 2 * layers, heads, head_dim), peft's layout
        kv = [t[0].transpose(0, 1) for layer in layers for t in (layer.keys, layer.values)]
        if not kv or len(kv) * kv[0].numel() != emb.numel() or any(t.shape != kv[0].shape for t in kv):
            return False
        emb.copy_(torch.stack(kv, 1).reshape(emb.shape).to(emb.dtype))
    return True


def _peft_config(cfg: Config, new_ids: list[int]):
    import peft  # deferred: heavy library, imported on first use

    if cfg.method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix_tokens)
    targets = "all-linear" if cfg.lora_target_modules == "all-linear" else \
        [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    extra = {"trainable_token_indices": {"embed_tokens": new_ids}} if new_ids else {}
    return peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, target_modules=targets, **extra)


def build_model(cfg: Config, tok, added_tokens: list[str], kernels_out: list | None = None,
                template: ChatTemplate | None = None):
    """Returns (model ready for Trainer, loss_fn(model, batch) used for the EWC Fisher).

    ``kernels_out``, when given, receives the :class:`~sftlab.train.kernels.KernelChoice` of each
    optional kernel (liger_kernels, compile_blocks). ``template``: the run's chat template, whose
    rendering of a short chat starts a prefix-tuning adapter (:func:`init_prefix_from_tokens`)."""
    import torch  # deferred: heavy library, imported on first use

    if cfg.method == "prefix" and cfg.gradient_checkpointing is True:  # else a shape error at the first step
        raise SftlabError(PREFIX_NO_CHECKPOINTING, hint="--set gradient_checkpointing=false")
    kwargs = {}
    if cfg.method == "qlora":
        from transformers import (
            BitsAndBytesConfig,  # deferred: heavy library, imported on first use
        )

        require_qlora("cuda" if torch.cuda.is_available() else "cpu")
        compute = _dtype(cfg.precision) if cfg.precision in ("bf16", "fp16") else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    # Mixed precision keeps fp32 master weights: load fp32 and let autocast run bf16 compute.
    dtype = "fp32" if cfg.method == "full" or cfg.precision == "fp32" else cfg.precision
    model = load_model(cfg.model, dtype=dtype, attn_implementation=_attention(cfg), trust_remote_code=cfg.trust_remote_code,
                       tokenizer=tok, **kwargs)
    new_ids = [tok.convert_tokens_to_ids(t) for t in added_tokens]
    if new_ids and model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    model.config.use_cache = False
    choices = apply_kernels(cfg, model)  # before PEFT: the patched modules are the base model's
    if kernels_out is not None:
        kernels_out.extend(choices)

    if cfg.method in ("lora", "qlora", "prefix"):
        import peft  # deferred: heavy library, imported on first use

        if cfg.method == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing))
        try:
            model = peft.get_peft_model(model, _peft_config(cfg, new_ids))
        except ValueError as exc:
            raise SftlabError(f"cannot apply {cfg.method}: {exc}", hint="check lora_target_modules")
        if cfg.method == "prefix" and not init_prefix_from_tokens(model, prefix_seed_ids(tok, template, cfg.prefix_tokens)):
            raise SftlabError(f"prefix tuning: {cfg.model}'s per-layer keys and values do not fit the prefix (its layers "
                              "differ in shape), so it would start from random vectors", hint="use --set method=lora")
        _speed_up_adapters(cfg, model)

    def loss_fn(m, batch):
        with hidden_states_instead_of_logits(m) as head:
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            return sft_loss(out.logits, head, batch["labels"])

    return model, loss_fn
