"""The run folder contract, and loading a trained model back from it.

A run folder holds:
    config.yaml          the resolved config (every `auto` replaced by the value used)
    metrics.jsonl        one JSON object per logged step (train rows and eval rows, see callbacks)
    prepare_report.json  what data preparation kept, cut and dropped
    summary.json         steps, tokens, time, peak memory, final losses, method, base model, template
    model/               the adapter (LoRA/QLoRA/prefix: adapter_config.json + adapter_model.safetensors)
                         or the full model (config.json + model.safetensors), plus the tokenizer
                         whose chat_template is exactly the template used in training
    checkpoints/         checkpoint-N folders (written to a staging folder and renamed)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.config import load_config
from sftlab.core.errors import SftlabError
from sftlab.models import load_model

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREPARE_REPORT = "prepare_report.json"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"


@dataclass
class Summary:
    """summary.json: what a finished (or stopped) run did. Written by train, read by eval, diagnose,
    report and the CLI. ``eval`` is added by ``sftlab eval`` (its before/after result)."""

    method: str
    base_model: str
    template: str | None  # the template's name ("tokenizer" for the model's own)
    steps: int
    epochs: float | None
    examples: int
    replay_examples: int
    train_tokens: int  # tokens the model read (every process)
    trained_tokens: int  # tokens with a label (every process)
    time_s: float
    tokens_per_second: float
    trained_tokens_per_second: float
    peak_memory_mb: float
    final_train_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None
    stopped: str  # completed | early_stopping | interrupted | diverged
    divergence: dict | None  # {"step", "loss"} when it diverged
    prepare: dict  # the PrepareReport of the training data
    pad_equals_eos: bool
    eos_trained: bool | None  # every end-of-turn token of a trained turn is trained (None: no end-of-turn token known)
    gradient_checkpointing: bool
    packing: bool
    attention_batches: dict | None  # micro-batches per kernel under attn_implementation=auto
    findings: list[str] = field(default_factory=list)  # the pre-flight checklist's lines
    precision: str | None = None  # the precision the run used (auto resolved)
    eval: dict | None = None  # written by `sftlab eval` into a run folder

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["eval"] is None:
            del d["eval"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        """Known keys become fields (missing optional ones take their defaults); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).exists() and (p / MODEL_DIR).is_dir()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of metrics.jsonl; a damaged line is a clear error naming it."""
    p = Path(run_dir) / METRICS
    if not p.exists():
        raise SftlabError(f"{run_dir}: no {METRICS} in this run folder", hint="is this a finished sftlab run?")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise SftlabError(f"{p}:{i}: damaged metrics line (not JSON)")
    return rows


def read_summary(run_dir: str | Path) -> dict:
    p = Path(run_dir) / SUMMARY
    if not p.exists():
        raise SftlabError(f"{run_dir}: no {SUMMARY} in this run folder", hint="the run did not finish")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise SftlabError(f"{p}: damaged summary (not JSON)")


def read_run_config(run_dir: str | Path):
    p = Path(run_dir) / CONFIG
    if not p.exists():
        raise SftlabError(f"{run_dir}: no {CONFIG} in this run folder", hint="is this a sftlab run folder?")
    return load_config(p)


def load_run_model(run_dir: str | Path, *, device=None, dtype=None, merge: bool = False):
    """(model, tokenizer, config) of a finished run: the base model with the adapter, or the full model."""
    from transformers import (
        AutoTokenizer,  # deferred: heavy library, imported on first use
    )

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    mdir = run_dir / MODEL_DIR
    if not mdir.is_dir():
        raise SftlabError(f"{run_dir}: no {MODEL_DIR}/ folder in this run", hint="the run did not save a model")
    tok = AutoTokenizer.from_pretrained(mdir, trust_remote_code=cfg.trust_remote_code)
    if (mdir / "adapter_config.json").exists():
        from peft import PeftModel  # deferred: heavy library, imported on first use

        base = load_model(cfg.model, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
        if base.get_input_embeddings().weight.shape[0] < len(tok):  # tokens added in training
            base.resize_token_embeddings(len(tok))
        model = PeftModel.from_pretrained(base, mdir)
        if merge:
            model = model.merge_and_unload()
    elif (mdir / "config.json").exists():
        model = load_model(str(mdir), dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    else:
        raise SftlabError(f"{mdir}: holds neither an adapter nor a model")
    model.eval()
    return model, tok, cfg
