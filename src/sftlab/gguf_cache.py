"""GGUF -> safetensors, once: a ``.gguf`` file (the default model's among them) is de-quantized to fp32
and written as a plain HF folder in the cache, keyed by the file's path, size and mtime and the converter's
version, so every later load takes about a second. See models.py's docstring for why."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sftlab.core.errors import SftlabError
from sftlab.core.io import cache_root, publish_tree
from sftlab.special_tokens import ensure_pad, stop_ids

logger = logging.getLogger(__name__)

# Bump when the conversion below changes, so stale cached folders are not reused.
_CONVERTER_VERSION = 2  # 2: a GGUF beside HF files is read alone (1 took their tokenizer)
_DONE_MARKER = "sftlab_conversion.json"

def converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{_CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).lower()
    return cache_root() / "models" / f"{slug}-{digest}"


def is_converted(folder: Path) -> bool:
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


def convert_gguf_cached(gguf: Path) -> Path:
    final = converted_dir(gguf)
    if is_converted(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if is_converted(final):  # another process finished it while we waited
            return final
        # one line of sftlab's own (stderr: a --json stdout stays one document), not transformers' bars
        print(f"sftlab: converting {gguf.name} to safetensors once (about 20 s; later loads take about a second)",
              file=sys.stderr, flush=True)
        logger.info("converting %s -> %s", gguf, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            started = time.perf_counter()
            with _no_progress_bars():
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
def _no_progress_bars() -> Iterator[None]:
    """transformers' bars off while converting, their previous state restored: its weight loading and
    saving bars follow ``disable_progress_bar``; its GGUF de-quantizing bar is a plain tqdm that does not,
    so that module's ``tqdm`` is swapped for a disabled one meanwhile."""
    import functools

    from transformers.utils import (
        logging as hf_logging,  # deferred: heavy library, imported on first use
    )

    try:
        from transformers import (
            modeling_gguf_pytorch_utils as gguf_utils,  # deferred: heavy library, imported on first use
        )
    except ImportError:  # pragma: no cover - a transformers without GGUF support fails later, with its own error
        gguf_utils = None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def gguf_errors(gguf: Path) -> Iterator[None]:
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
        with gguf_errors(gguf):
            folder, fname = str(alone), gguf.name
            config = AutoConfig.from_pretrained(folder, gguf_file=fname)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    finally:
        shutil.rmtree(alone, ignore_errors=True)
    meta = _gguf_fields(gguf, ("tokenizer.ggml.pre",))

    _fix_gguf_tokenizer(tok, meta.get("tokenizer.ggml.pre"))
    tok.model_max_length = int(getattr(config, "max_position_embeddings", 0) or tok.model_max_length)
    ensure_pad(tok)
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
        eos_token_id=stop_ids(tok),
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
