"""The run folder: one class, :class:`RunDir`, for every file a run leaves behind.

A run folder holds:
    config.yaml          the resolved config (every `auto` replaced by the value used)
    metrics.jsonl        one JSON object per logged step (train rows and eval rows, see callbacks)
    prepare_report.json  what data preparation kept, cut and dropped
    summary.json         steps, tokens, time, peak memory, final losses, method, base model, template
    model/               the adapter (LoRA/QLoRA/prefix: adapter_config.json + adapter_model.safetensors)
                         or the full model (config.json + model.safetensors), plus the tokenizer
                         whose chat_template is exactly the template used in training
    checkpoints/         checkpoint-N folders (written to a staging folder and renamed), each with
                         sftlab-batch.json: the global batch and learning rate it was trained at

Train writes it (using the file-name constants and :class:`Summary`); eval, diagnose, report,
export, chat and the CLI read it through :class:`RunDir`. A missing or damaged file is one
SftlabError line naming it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.config import Config, load_config
from sftlab.core.errors import SftlabError
from sftlab.core.io import atomic_write_text
from sftlab.data.templates import BUILTIN, ChatTemplate, resolve_template
from sftlab.models import load_model

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREPARE_REPORT = "prepare_report.json"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
CHECKPOINT_BATCH = "sftlab-batch.json"  # in each checkpoint: the global batch and rate it was trained at
# what training leaves in a run folder (config.yaml alone may be a user's own config kept there)
RUN_FILES = (METRICS, SUMMARY, PREPARE_REPORT, MODEL_DIR, CHECKPOINTS)

_OWN_TEMPLATE = (None, "", "auto", "tokenizer", "model")  # config values meaning "the tokenizer's own template"


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
    precision_probe: dict | None = None  # precision auto on a CPU: the probe's figures (fp32_ms, bf16_ms, ...)
    kernels: list | None = None  # the optional GPU kernels: [{"name", "enabled", "reason", "trial"}]
    eval: dict | None = None  # written by `sftlab eval` into a run folder
    signal: str | None = None  # SIGINT or SIGTERM when a signal stopped the run (stopped == "interrupted")
    lr_sweep: dict | None = None  # `train --find-lr`: the range test (lrs, losses, smoothed, choice, reason)
    distributed: dict | None = None  # several processes: {"processes", "sharding": "ddp" | "fsdp2" | "deepspeed"}
    learning_rate: float | None = None  # the peak rate the run used (auto resolved: the table, or --find-lr)
    global_batch: int | None = None  # examples (packed: rows) per optimizer step, all processes
    merge: dict | None = None  # merge_micro_batches: enabled, reason, the micro-batch run, the trial's ms

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["eval"] is None:
            del d["eval"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        """Known keys become fields; unknown keys are ignored. A key an older or partial summary lacks
        takes its default, or None (``prepare``: {}) for a field without one: readers treat None as
        "not recorded" (e.g. ``eos_trained`` None skips the EOS check)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        for name, f in known.items():
            if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                values[name] = {} if name == "prepare" else None
        return cls(**values)


def _tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's chat template source (the default one when it holds several), or None."""
    src = getattr(tokenizer, "chat_template", None)
    if isinstance(src, dict):
        src = src.get("default") or next(iter(src.values()), None)
    return src or None


class RunDir:
    """A run folder (see the module docstring): its paths, and readers for what training wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / CONFIG
        self.metrics_path = self.path / METRICS
        self.summary_path = self.path / SUMMARY
        self.prepare_report_path = self.path / PREPARE_REPORT
        self.model_dir = self.path / MODEL_DIR
        self.checkpoints_dir = self.path / CHECKPOINTS

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def is_run(self) -> bool:
        """A run folder with a saved model: config.yaml and model/."""
        return self.path.is_dir() and self.config_path.exists() and self.model_dir.is_dir()

    def run_files(self) -> list[str]:
        """What a run (finished, stopped or killed) left here, of :data:`RUN_FILES`; [] for a new folder."""
        return [name for name in RUN_FILES if (self.path / name).exists()] if self.path.is_dir() else []

    def require(self) -> "RunDir":
        """Self, or an SftlabError when the folder does not exist."""
        if not self.path.is_dir():
            raise SftlabError(f"run folder '{self.path}' not found", hint="pass the output_dir of a training run")
        return self

    def config(self) -> Config:
        if not self.config_path.exists():
            raise SftlabError(f"{self.path}: no {CONFIG} in this run folder", hint="is this a sftlab run folder?")
        return load_config(self.config_path)

    def metrics(self) -> list[dict]:
        """All rows of metrics.jsonl; a damaged line or a row that is no JSON object is a clear error naming it."""
        p = self.metrics_path
        if not p.exists():
            raise SftlabError(f"{self.path}: no {METRICS} in this run folder", hint="is this a finished sftlab run?")
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SftlabError(f"{p}:{i}: damaged metrics line (not JSON)")
            if not isinstance(row, dict):
                raise SftlabError(f"{p}:{i}: metrics row is not a JSON object")
            rows.append(row)
        return rows

    def curves(self) -> tuple[list[dict], list[dict]]:
        """(train rows, eval rows) of metrics.jsonl, each sorted by step (rows without a split are guessed
        from their keys: ``eval_loss`` is eval, ``loss`` is train)."""
        def split(r: dict) -> str | None:
            return r.get("split") or ("eval" if "eval_loss" in r else "train" if "loss" in r else None)

        def step(r: dict) -> float:
            s = r.get("step")
            return float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else 0.0

        rows = self.metrics()
        return (sorted((r for r in rows if split(r) == "train"), key=step),
                sorted((r for r in rows if split(r) == "eval"), key=step))

    def has_summary(self) -> bool:
        return self.summary_path.exists()

    def summary(self) -> Summary:
        """summary.json as a :class:`Summary`; an SftlabError when it is missing or damaged."""
        p = self.summary_path
        if not p.exists():
            raise SftlabError(f"{self.path}: no {SUMMARY} in this run folder", hint="the run did not finish")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise SftlabError(f"{p}: damaged summary (not JSON)")
        if not isinstance(d, dict):
            raise SftlabError(f"{p}: damaged summary (expected a JSON object)")
        return Summary.from_dict(d)

    def write_summary(self, summary: Summary) -> Path:
        """Write summary.json atomically; returns its path."""
        atomic_write_text(self.summary_path, json.dumps(summary.to_dict(), indent=2, default=str))
        return self.summary_path

    def prepare_report(self) -> dict | None:
        """prepare_report.json (None when the run has none)."""
        p = self.prepare_report_path
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise SftlabError(f"{p}: damaged preparation report (not JSON)")

    def saved_tokenizer_config(self) -> tuple[str | None, dict[str, str]]:
        """(chat template source, special token strings) of the tokenizer saved in model/, read from its
        files without loading it; (None, {}) values when there is none."""
        cfg_p = self.model_dir / "tokenizer_config.json"
        tcfg = {}
        if cfg_p.exists():
            try:
                tcfg = json.loads(cfg_p.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise SftlabError(f"{cfg_p}: damaged tokenizer config (not JSON)")
        jinja = self.model_dir / "chat_template.jinja"
        src = tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None
        if jinja.exists():
            src = jinja.read_text(encoding="utf-8")
        special = {}
        for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = tcfg.get(k)
            special[k] = v.get("content", "") if isinstance(v, dict) else (v or "")
        return src, special

    def template(self, tokenizer, name: str | None = None) -> ChatTemplate | None:
        """The chat template the run was trained with, for ``tokenizer`` (the one saved in model/).

        ``name`` (a ``--template`` flag) overrides it. A config naming a built-in gives that built-in
        (with its known end-of-turn string); a .jinja file or the tokenizer's own template gives the
        copy saved with the tokenizer. None when the run used no chat template (plain text) and the
        tokenizer has none.
        """
        if name and name not in _OWN_TEMPLATE:
            return resolve_template(name, tokenizer)
        configured = None if name else self.config().template
        saved = _tokenizer_template(tokenizer)
        if configured in BUILTIN or (configured not in _OWN_TEMPLATE and not saved):
            return resolve_template(configured, tokenizer)
        if not saved:
            return None
        own = resolve_template("tokenizer", tokenizer)  # the saved source, with the tokenizer's special tokens
        if configured in _OWN_TEMPLATE:
            return own
        return ChatTemplate(Path(configured).name, own.source, None, own.special)

    def load_model(self, *, device=None, dtype=None, merge: bool = False):
        """(model, tokenizer, config) of a finished run: the base model with the adapter, or the full model."""
        from transformers import (
            AutoTokenizer,  # deferred: heavy library, imported on first use
        )

        cfg = self.config()
        mdir = self.model_dir
        if not mdir.is_dir():
            raise SftlabError(f"{self.path}: no {MODEL_DIR}/ folder in this run", hint="the run did not save a model")
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
