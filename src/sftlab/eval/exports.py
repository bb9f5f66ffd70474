"""An export folder (``sftlab export``) as something to evaluate or chat with: how it loads, and which
base model it was fine-tuned from (for ``sftlab eval EXPORT --compare base``).

An adapter export holds the adapter alone; adapter_config.json names its base. Every export holds
sftlab_export.json, which keeps the base (``base_model``, ``base_weights``) and the run's model as its
config named it (``base_source``), from which sftlab finds the base again on another machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftlab.core.errors import SftlabError
from sftlab.models import DEFAULT_MODEL, load_model
from sftlab.rundir import RunDir

EXPORT_INFO = "sftlab_export.json"
# the run's settings of how conversations become tokens and labels, kept by an export (``labeling``) so that
# `sftlab eval EXPORT` scores the loss, and chat/generate show earlier reasoning, as for the run
LABELING = ("max_seq_length", "truncation", "masking", "reasoning")


def _info(folder: Path) -> dict:
    try:
        info = json.loads((folder / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def is_adapter_export(spec) -> bool:
    """A folder holding an adapter alone (``sftlab export`` without ``--merge``), not a run folder."""
    p = Path(str(spec))
    return p.is_dir() and (p / "adapter_config.json").is_file() and not RunDir(p).config_path.is_file()


def is_export(spec) -> bool:
    """An ``sftlab export`` folder (an adapter, or merged/full weights with sftlab_export.json), not a run."""
    p = Path(str(spec))
    return is_adapter_export(p) or (p.is_dir() and (p / EXPORT_INFO).is_file() and not RunDir(p).config_path.is_file())


def export_labeling(spec) -> dict:
    """The run's labeling settings an export keeps (see :data:`LABELING`); {} for anything else (an older
    export, a plain model)."""
    p = Path(str(spec))
    kept = _info(p).get("labeling") if is_export(p) else None
    return {k: kept[k] for k in LABELING if k in kept} if isinstance(kept, dict) else {}


def export_base(folder: Path) -> str:
    """The base model of an export: an adapter's adapter_config.json name, or the base sftlab_export.json
    names, when that folder is on this machine; else the exact base weights it names (older adapter
    exports named the hub id); else the run's model as its config named it (``base_source``: the default
    model or a .gguf file, which sftlab converts again here); else the name as it is (a hub id)."""
    info = _info(folder)
    named = info.get("base_model")
    if (folder / "adapter_config.json").is_file():
        try:
            named = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SftlabError(f"{folder}/adapter_config.json: damaged or names no base model")
    for here in (named, info.get("base_weights")):
        if isinstance(here, str) and Path(here).is_dir():
            return here
    source = info.get("base_source")
    if isinstance(source, str) and (source.strip().lower() == DEFAULT_MODEL or Path(source).is_file()):
        return source
    if not isinstance(named, str) or not named:
        raise SftlabError(f"{folder}/{EXPORT_INFO}: names no base model", hint="pass --compare MODEL")
    return named


def load_adapter_export(folder: Path, device=None):
    """(model, tokenizer) of an exported adapter: its base model (:func:`export_base`) + the adapter + its
    tokenizer."""
    from peft import PeftModel  # deferred: heavy library, imported on first use
    from transformers import (
        AutoTokenizer,  # deferred: heavy library, imported on first use
    )

    tok = AutoTokenizer.from_pretrained(str(folder))  # as exported: pad token and chat template included
    model = PeftModel.from_pretrained(load_model(export_base(folder), device=device, tokenizer=tok), str(folder))
    model.eval()
    return model, tok
