"""Model shapes for the memory estimator: from a real config, a known name, or a parameter count.

A :class:`ModelShape` is the handful of numbers that decide training memory for a decoder-only
Llama-style model (layers, widths, heads, vocabulary, tied embeddings). It is read from the model's
config without loading any weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sftlab.core.errors import SftlabError
from sftlab.models import model_config

DEFAULT_MODEL = "smollm2-135m-instruct"
SEQ_LIMIT = 1 << 20  # the longest row a plan searches (where the model's context is unknown)


@dataclass(frozen=True)
class ModelShape:
    """Shape of a Llama-style decoder. Widths are in elements; ``head_dim`` defaults to hidden / heads."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    head_dim: int = 0
    context: int = 0  # the longest sequence the model was trained for (max_position_embeddings); 0: unknown

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // max(self.n_heads, 1))

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder block."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output head when it is not tied."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        norms = self.n_layers * 2 * self.hidden + self.hidden
        return self.n_layers * self.layer_linear_params + norms + self.embedding_params

    def to_dict(self) -> dict:
        return {**asdict(self), "params": self.params}


# Typical shapes of common sizes (published configs). Used for known names and for --params.
_KNOWN: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("smollm2-135m-instruct", 30, 576, 9, 3, 1536, 49152, True, context=8192),
    ModelShape("smollm2-360m", 32, 960, 15, 5, 2560, 49152, True, context=8192),
    ModelShape("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 151936, True, context=32768),
    ModelShape("tinyllama-1.1b", 22, 2048, 32, 4, 5632, 32000, False, context=2048),
    ModelShape("smollm2-1.7b", 24, 2048, 32, 32, 8192, 49152, True, context=8192),
    ModelShape("llama-3.2-3b", 28, 3072, 24, 8, 8192, 128256, True, context=131072),
    ModelShape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, False, context=4096),
    ModelShape("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, False, context=8192),
    ModelShape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, False, context=4096),
    ModelShape("codellama-34b", 48, 8192, 64, 8, 22016, 32000, False, context=16384),
    ModelShape("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, False, context=4096),
)}
_ALIASES = {"smollm2-135m": "smollm2-135m-instruct", "smollm2": "smollm2-135m-instruct",
            "default": "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
            "llama-7b": "llama-2-7b", "llama-13b": "llama-2-13b", "llama-70b": "llama-2-70b",
            "meta-llama/llama-2-7b-hf": "llama-2-7b", "meta-llama/meta-llama-3-8b": "llama-3-8b"}


def known_shapes() -> dict[str, ModelShape]:
    """The built-in table of typical shapes, by name."""
    return dict(_KNOWN)


def parse_param_count(text: str | float | int) -> int:
    """``"7B"``, ``"135M"``, ``"1.5b"``, ``"7e9"`` or a number -> parameter count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", str(text).lower())
        if not m:
            raise SftlabError(f"--params {text!r} is not a parameter count", hint="write it like 135M, 1.5B or 7B")
        value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]
    if not (1e6 <= value <= 1e13):
        raise SftlabError(f"--params {text!r} is out of range", hint="give a count between 1M and 10T, like 7B")
    return int(value)


def shape_from_params(n_params: int | str) -> ModelShape:
    """A typical Llama-style shape with about ``n_params`` parameters.

    Takes the published shape nearest in size and changes its number of layers so the count matches.
    """
    n = parse_param_count(n_params)
    ref = min(_KNOWN.values(), key=lambda s: abs(math.log(s.params / n)))
    if abs(math.log(ref.params / n)) < math.log(1.15):  # "7B" means Llama-2-7B's 6.7B, not a 33-layer variant
        return replace(ref, name=f"~{human_count(n)} (typical shape: {ref.name})")
    per_layer = ref.layer_linear_params + 2 * ref.hidden
    layers = max(1, round((n - ref.embedding_params - ref.hidden) / per_layer))
    label = f"~{human_count(n)} (typical shape: {ref.name}" + ("" if layers == ref.n_layers else f", {layers} layers") + ")"
    shape = replace(ref, name=label, n_layers=layers)
    if abs(math.log(shape.params / n)) >= math.log(1.15):  # under ~40M: one layer's embedding alone is more
        raise SftlabError(f"--params {n_params}: the smallest typical shape ({ref.name}, {layers} layer"
                          f"{'' if layers == 1 else 's'}) has {human_count(shape.params)} parameters, its embedding "
                          f"alone {human_count(ref.embedding_params)}",
                          hint="plan a model this small by its config: --model FOLDER (a config.json is enough)")
    return shape


def shape_from_config(config, name: str = "model") -> ModelShape:
    """A transformers ``PretrainedConfig`` (or a plain dict of its fields) -> :class:`ModelShape`."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")  # multimodal wrappers keep the language model's config inside
    if text is not None:
        return shape_from_config(text, name)
    try:
        hidden = int(get("hidden_size") or get("n_embd") or get("d_model"))
        layers = int(get("num_hidden_layers") or get("n_layer") or get("num_layers"))
        heads = int(get("num_attention_heads") or get("n_head"))
        vocab = int(get("vocab_size"))
    except (TypeError, ValueError):
        raise SftlabError(f"{name}: the config lacks hidden_size, num_hidden_layers, num_attention_heads or vocab_size",
                          hint="pass a decoder-only language model, or use --params") from None
    kv = int(get("num_key_value_heads") or heads)
    inter = int(get("intermediate_size") or get("n_inner") or 4 * hidden)
    head_dim = int(get("head_dim") or hidden // heads)
    tied = bool(get("tie_word_embeddings", True))
    context = int(get("max_position_embeddings") or get("n_positions") or 0)
    return ModelShape(name, layers, hidden, heads, kv, inter, vocab, tied, head_dim, context)


def longest_row(context: int, method: str, prefix_tokens: int) -> int:
    """The most tokens a row can have within the model's ``context`` (0: unknown, :data:`SEQ_LIMIT`): prefix
    tuning's virtual tokens take the first positions (the row's tokens come after them); 0 when none fit."""
    if not context:
        return SEQ_LIMIT
    return max(0, context - (int(prefix_tokens) if method == "prefix" else 0))


def past_context(context: int, seq_len: int, method: str, prefix_tokens: int) -> tuple[str, int] | None:
    """Where rows of ``seq_len`` tokens (after prefix tuning's virtual tokens) run past the model's context
    (max_position_embeddings), positions it never trained on: (what the rows take, in words; the longest row
    that fits, :func:`longest_row`), else None. The one rule of `sftlab plan`'s note and `train --check`'s."""
    longest = longest_row(context, method, prefix_tokens)
    if not context or seq_len <= longest:
        return None
    prefix = f" after {prefix_tokens} virtual tokens (prefix_tokens)" if method == "prefix" else ""
    return f"{seq_len} tokens{prefix}", longest


def lora_rank_past_width(shape: ModelShape, lora_r: int, targets, has_layer=lambda name: True) -> tuple[str, int] | None:
    """Where ``lora_r`` is above the width (the smaller of in and out features) of the narrowest layer of
    ``targets`` it adapts: (why, a rank to use instead), else None. The one rule of `sftlab plan`'s note and
    `train --check`'s warning; ``has_layer(name)`` false: the model names its layers otherwise (GPT-2's
    c_attn, ...), so the layer is not named."""
    widths = [(min(shape.linear_shapes()[t]), t) for t in targets if t in shape.linear_shapes()]
    if not widths or lora_r <= min(widths)[0]:
        return None
    narrow, name = min(widths)
    layer = f"{name}'s width of {narrow}" if has_layer(name) else f"the width of its narrowest adapted layer, {narrow}"
    return (f"lora_r {lora_r} is above {layer}: a LoRA update's rank cannot exceed it, so the extra rank only "
            "costs memory", min(narrow, 64))


def load_shape(model: str) -> ModelShape:
    """Shape of ``model``: a local HF folder, a .gguf file, the embedded default, a name from the table
    of typical shapes (``llama-2-7b``, ...), or a hub id already cached. Reads the config, never weights.
    """
    key = _ALIASES.get(model.strip().lower(), model.strip().lower())
    on_disk = Path(model).expanduser().exists()
    if key in _KNOWN and key != DEFAULT_MODEL and not on_disk:
        return _KNOWN[key]
    # sftlab.models knows every way a model can be given (folder, .gguf, the default, hub id)
    try:
        return shape_from_config(model_config(DEFAULT_MODEL if key == DEFAULT_MODEL and not on_disk else model), model)
    except SftlabError:
        if key == DEFAULT_MODEL and not on_disk:
            return _KNOWN[DEFAULT_MODEL]  # the embedded default's published shape
        raise


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))
