"""sftlab: supervised fine-tuning with exact labels, data checks and honest reports.

The public API (imported lazily, so `import sftlab` stays fast):
    load_config, Config            typed run configuration (YAML + overrides)
    load_conversations             any data file / format -> Conversation list
    resolve_template, Labeler      chat templates and exact response-only labels
    prepare                        config -> labelled examples
    run_doctor                     the data-quality checklist
    train                          one fine-tune -> run folder
    find_lr                        a learning-rate range test of a run's config (`train --find-lr`)
    run_eval, diagnose, write_report, export_run
"""
import importlib

__version__ = "0.1.0"

_API = {
    "Config": "sftlab.config", "load_config": "sftlab.config",
    "Conversation": "sftlab.data.types", "Message": "sftlab.data.types",
    "load_conversations": "sftlab.data.formats",
    "resolve_template": "sftlab.data.templates", "Labeler": "sftlab.data.masking",
    "prepare": "sftlab.data.prepare", "run_doctor": "sftlab.data.doctor",
    "train": "sftlab.train.run", "find_lr": "sftlab.train.find_lr", "run_eval": "sftlab.eval.run", "diagnose": "sftlab.diagnose",
    "write_report": "sftlab.report", "export_run": "sftlab.export",
    "load_model": "sftlab.models", "load_tokenizer": "sftlab.models",
    "SftlabError": "sftlab.core.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sftlab' has no attribute {name!r}")
