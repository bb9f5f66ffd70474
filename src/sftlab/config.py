"""Typed run configuration: one YAML file plus ``--set key=value`` overrides, validated at load.

Every field has a type, a default and help text. The allowed values of a field are its type: a
``Literal`` alias defined here (:data:`Method`, :data:`Masking`, ...) is the one definition other
modules, ``--help-config`` and the CLI flags read them from (:func:`choices`). Unknown keys and bad
values are one clear error naming the key. ``auto`` values (learning rate, epochs, batch,
checkpointing, precision) are resolved by :func:`sftlab.plan.auto.resolve_auto` and the resolved
config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from sftlab.core.errors import SftlabError
from sftlab.core.io import atomic_write_text

# --- allowed values: one definition each ------------------------------------------------------
Auto = Literal["auto"]
Method = Literal["full", "lora", "qlora", "prefix"]
Masking = Literal["all_assistant", "last_assistant", "all"]
Truncation = Literal["cut_turns", "drop", "truncate"]
Reasoning = Literal["per_turn", "keep", "last", "drop"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Optimizer = Literal["adamw", "adam", "sgd", "adamw8bit"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
Loss = Literal["token", "sequence"]
Tracker = Literal["tensorboard", "trackio", "wandb", "mlflow"]  # report_to's items


def choices(alias) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` alias, e.g. ``choices(Method) == ("full", "lora", ...)``."""
    return typing.get_args(alias)


def _f(default, help_text: str):
    meta = {"help": help_text}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- model and data -------------------------------------------------------------------
    model: str = _f("smollm2-135m-instruct", "base model: the embedded default name, a local HF folder, a .gguf file or a hub id")
    data: str | list | None = _f(None, "training data file (jsonl/json/csv/parquet) or local HF dataset folder; or a list of sources, each a path or {path, format, weight | count, name} (see README: Several datasets)")
    eval_data: str | list | None = _f(None, "evaluation data, same formats as data; a list of sources is one eval_loss in training (`sftlab eval RUN --data A --data B` gives results per source)")
    format: str = _f("auto", "data format: auto, messages (openai), sharegpt, alpaca, prompt_completion or text")
    template: str | None = _f(None, "chat template: 'tokenizer' (or null, the default) uses the tokenizer's own; or alpaca, vicuna (also named sharegpt), chatml, chatml-tools (renders tools), llama3, mistral, or a .jinja file")
    system_prompt: str | None = _f(None, "system prompt added to conversations that have none")
    max_seq_length: int = _f(2048, "longest example in tokens")
    masking: Masking = _f("all_assistant", "which tokens are trained")
    truncation: Truncation = _f("cut_turns", "what to do with examples longer than max_seq_length")
    reasoning: Reasoning = _f("per_turn", "reasoning (<think>) turns: per_turn trains each assistant turn with its reasoning "
                              "exactly as the model produces it at inference (one example per turn where the template "
                              "drops earlier turns' reasoning, as Qwen3 does; one example otherwise); keep: one example "
                              "per chat, reasoning kept in every turn (templates that keep it); last: one example, "
                              "reasoning only in the last turn; drop: no reasoning trained, rendered as enable_thinking=False")
    chat_template_kwargs: dict = _f({}, "extra variables for the chat template, e.g. {enable_thinking: false}; "
                                        "used alike in training, eval, chat and export")
    packing: bool = _f(False, "pack several examples per row (no attention across them)")
    group_by_length: bool = _f(True, "without packing: batch examples of similar length together (little padding)")
    attn_implementation: Attention = _f("auto", "attention kernel: auto (per micro-batch on CPU: eager for short batches, where it is faster; else sdpa), sdpa, eager, flash_attention_2")
    trust_remote_code: bool = _f(False, "allow model/tokenizer code from the model folder to run")

    # --- method -----------------------------------------------------------------------------
    method: Method = _f("lora", "what is trained")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (peft's default 0; each adapted linear pays a mask and a copy for it)")
    lora_target_modules: str = _f("all-linear", "modules LoRA adapts: 'all-linear' or a comma-separated list")
    prefix_tokens: int = _f(20, "number of virtual tokens for prefix tuning")

    # --- optimisation -----------------------------------------------------------------------
    epochs: float | Auto = _f(3, "number of epochs, or 'auto' by data size")
    max_steps: int = _f(-1, "train this many optimizer steps, however many epochs they take (they override epochs); -1: run epochs")
    batch_size: int | Auto = _f(4, "per-device batch size, or 'auto': the largest micro-batch (up to 16 on a GPU, 4 on a CPU) whose memory estimate for this model and the data's rows fits; gradient_accumulation: auto then makes a global batch of 16 (less for under 64 examples)")
    gradient_accumulation: int | Auto = _f(4, "micro-batches per optimizer step, or 'auto'")
    learning_rate: float | Auto = _f("auto", "peak learning rate, or 'auto': one table by method and model size (LoRA ~10x full), scaled with the global batch and LoRA alpha/r (README: What `auto` chooses)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_ratio: float = _f(0.1, "share of steps spent warming up")
    lr_scheduler: Scheduler = _f("cosine", "learning-rate schedule")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    merge_micro_batches: bool | Auto = _f("auto", "run each optimizer step's gradient_accumulation micro-batches as one micro-batch (the same step: the loss is normalised by the step's tokens): auto does on a CPU, one process, where the merged micro-batch's memory estimate fits and a trial on the run's own model and examples measures it 5% faster (cached per machine)")
    optimizer: Optimizer = _f("adamw", "optimizer")
    gradient_checkpointing: bool | Auto = _f("auto", "recompute activations in backward: true, false, or 'auto' (only when it would not fit)")
    precision: Precision = _f("auto", "auto: bf16 on a GPU that supports it; on a CPU, bf16 only where a short probe of the model's matmul shapes measures it faster than fp32 (cached per machine), else fp32")
    liger_kernels: bool | Auto = _f("auto", "liger-kernel's RMSNorm/SwiGLU/RoPE kernels (pip install 'sftlab[gpu]'): auto uses them on a GPU where a trial on the model's shapes measures them faster with matching output; off on a CPU")
    fused_loss: bool | Auto = _f("auto", "liger-kernel's fused linear cross entropy in place of sftlab's chunked loss (pip install 'sftlab[gpu]'): auto uses it on a GPU where a trial on the model's output head measures it faster with matching losses and gradients; off on a CPU")
    compile_blocks: bool | Auto = _f("auto", "torch.compile each decoder block: auto compiles on a GPU where a trial measures it faster with matching output; off on a CPU")
    seed: int = _f(42, "random seed")
    deepspeed: str | None = _f(None, "DeepSpeed config file, passed through to transformers/accelerate")
    fsdp: str | None = _f(None, "FSDP options passed through to transformers, e.g. 'full_shard auto_wrap'")

    # --- loss -------------------------------------------------------------------------------
    loss: Loss = _f("token", "loss normalisation: 'token' (mean over trained tokens of the step) or 'sequence' (mean per sequence)")
    label_smoothing: float = _f(0.0, "label smoothing factor")

    # --- forgetting -------------------------------------------------------------------------
    replay_data: str | None = _f(None, "general data mixed into training to limit forgetting")
    replay_ratio: float = _f(0.0, "share of the training mix that is replay data (0..0.9)")
    ewc_lambda: float = _f(0.0, "EWC penalty weight (0 disables): lambda/2 * sum F (theta - theta0)^2 is added to the loss trained on; metrics.jsonl logs it as ewc_penalty, beside the task loss")
    ewc_samples: int = _f(64, "examples of the replay/general data used to estimate the Fisher diagonal")

    # --- evaluation, checkpoints, logging ---------------------------------------------------
    eval_steps: int = _f(500, "evaluate every N optimizer steps")
    eval_generate: int = _f(0, "at each evaluation also generate replies for this many eval examples and log gen_* metrics (0: loss only)")
    save_steps: int = _f(500, "checkpoint every N optimizer steps")
    save_total_limit: int = _f(3, "checkpoints kept (0: every checkpoint)")
    early_stopping_patience: int = _f(3, "evaluations without improvement before stopping (0 disables)")
    early_stopping_min_delta: float = _f(0.01, "smallest eval-loss improvement that counts")
    load_best_model_at_end: bool = _f(True, "restore the checkpoint with the lowest eval loss at the end")
    logging_steps: int = _f(10, "log every N optimizer steps")
    report_to: list = _f([], "extra loggers: tensorboard, trackio, wandb, mlflow (tensorboard writes to RUN/tensorboard); none or [] for none")
    run_name: str | None = _f(None, "run name shown by the trackers (default: the run folder's name)")
    project: str | None = _f(None, "tracker project: wandb's WANDB_PROJECT, mlflow's experiment, trackio's project")
    output_dir: str = _f("runs/sft", "run folder")
    resume: bool = _f(False, "resume from the last checkpoint in output_dir")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)  # field name -> its annotation, evaluated
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def field_types(name: str) -> tuple:
    """The alternatives a field accepts: ``learning_rate`` -> ``(float, Literal['auto'])``."""
    hint = _HINTS[name]
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def _is_literal(t) -> bool:
    return typing.get_origin(t) is Literal


def field_choices(name: str) -> tuple:
    """The fixed values a field allows (its ``Literal`` parts): ``method`` -> ``("full", "lora", ...)``."""
    return tuple(v for t in field_types(name) if _is_literal(t) for v in typing.get_args(t))


def field_default(name: str):
    f = FIELDS[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _type_name(name: str) -> str:
    """Readable type of a field for --help-config: ``float | 'auto'``, ``str | None``, ``one of: a, b``."""
    kinds = field_types(name)
    if all(_is_literal(t) for t in kinds):
        return "one of: " + ", ".join(field_choices(name))
    parts = [" | ".join(map(repr, typing.get_args(t))) if _is_literal(t) else "None" if t is type(None) else t.__name__
             for t in kinds]
    return " | ".join(parts)


def _as(t, raw):
    """``raw`` (from YAML or a --set string) as type ``t``; ValueError when it is not one."""
    if _is_literal(t):
        if isinstance(raw, str) and raw in typing.get_args(t):
            return raw
        raise ValueError
    if isinstance(raw, bool) and t in (int, float):
        raise ValueError  # YAML's true/false are not numbers
    if t is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        if type(raw) is int and raw in (0, 1):  # YAML's reading of an unquoted 1/0, which a --set string allows
            return bool(raw)
        raise ValueError
    if t is int:
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return int(raw)
    if t is float:
        if not math.isfinite(value := float(raw)):  # nan, inf: no setting means them (epochs inf crashed the checklist)
            raise ValueError
        return value
    if t is str:
        if isinstance(raw, (dict, list, bool)):  # a bool: YAML's reading of an unquoted yes/no/on/off
            raise ValueError
        return str(raw)
    if t is dict:
        if isinstance(raw, dict):
            return raw
        raise ValueError
    if t is list:
        if isinstance(raw, list):
            return [] if [str(x).lower() for x in raw] == ["none"] else raw
        if isinstance(raw, str):  # 'none': transformers' spelling of no tracker
            return [] if raw.strip().lower() == "none" else [s.strip() for s in raw.split(",") if s.strip()]
    raise ValueError


def _expected(kinds: tuple) -> str:
    """What a field wants, for the error message: 'is not one of a, b', 'must be a number or 'auto''."""
    fixed = [v for t in kinds if _is_literal(t) for v in typing.get_args(t)]
    plain = [t for t in kinds if not _is_literal(t) and t is not type(None)]
    if not plain:
        return f"is not one of {', '.join(fixed)}"
    if fixed:
        words = {bool: "true, false", int: "a number", float: "a number"}
        return "must be " + " or ".join(dict.fromkeys([words.get(t, t.__name__) for t in plain] + list(map(repr, fixed))))
    return f"is not a valid {' or '.join(t.__name__ for t in plain)}"


def _not_finite(raw) -> bool:
    try:
        return not isinstance(raw, bool) and not math.isfinite(float(raw))
    except (ValueError, TypeError):
        return False


def _coerce(name: str, raw):
    """Convert ``raw`` to the field's declared type; a value outside it is one error naming the key."""
    kinds = field_types(name)
    if type(None) in kinds and (raw is None or (isinstance(raw, str) and raw.lower() in ("null", "none", "~"))):
        return None
    for t in kinds:
        try:
            return _as(t, raw)
        except (ValueError, TypeError):
            continue
    if float in kinds and _not_finite(raw):
        raise SftlabError(f"config key '{name}': {raw!r} is not a finite number", hint=f"--set {name}=<a number>")
    if isinstance(raw, bool) and str in kinds:
        raise SftlabError(f"config key '{name}': YAML reads an unquoted yes/no/on/off/true/false as {raw}, not text",
                          hint=f"quote it: {name}: \"...\"")
    raise SftlabError(f"config key '{name}': {raw!r} {_expected(kinds)}")


def _validate(cfg: Config) -> None:
    """Range checks the types cannot express."""
    checks = [
        ("max_seq_length", cfg.max_seq_length >= 8, "must be at least 8"),
        ("lora_r", cfg.lora_r >= 1, "must be at least 1"),
        ("replay_ratio", 0.0 <= cfg.replay_ratio <= 0.9, "must be between 0 and 0.9"),
        ("label_smoothing", 0.0 <= cfg.label_smoothing < 1.0, "must be in [0, 1)"),
        ("warmup_ratio", 0.0 <= cfg.warmup_ratio < 1.0, "must be in [0, 1)"),
        ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"),
        ("ewc_lambda", cfg.ewc_lambda >= 0, "must be >= 0"),
        ("eval_steps", cfg.eval_steps >= 1, "must be at least 1"),
        ("save_steps", cfg.save_steps >= 1, "must be at least 1"),
        ("logging_steps", cfg.logging_steps >= 1, "must be at least 1"),
        ("lora_alpha", cfg.lora_alpha > 0, "must be positive (the adapter's scale is alpha / r)"),
        # below: values that ran as something else (eval_generate -1 generated for all but one eval example,
        # ewc_samples -1 took all but one, 0 none: no penalty; a negative patience or norm disabled silently)
        ("eval_generate", cfg.eval_generate >= 0, "must be >= 0 (0: loss only)"),
        ("ewc_samples", cfg.ewc_samples >= 1, "must be at least 1 (the Fisher is measured on them)"),
        ("save_total_limit", cfg.save_total_limit >= 0, "must be >= 0 (0: keep every checkpoint)"),
        ("early_stopping_patience", cfg.early_stopping_patience >= 0, "must be >= 0 (0 disables)"),
        ("early_stopping_min_delta", cfg.early_stopping_min_delta >= 0, "must be >= 0"),
        ("max_grad_norm", cfg.max_grad_norm >= 0, "must be >= 0 (0 disables clipping)"),
        ("seed", 0 <= cfg.seed < 2**32, f"must be between 0 and {2**32 - 1} (numpy's seed range)"),  # else a traceback in training
    ]
    for key, ok, why in checks:
        if not ok:
            raise SftlabError(f"config key '{key}': {getattr(cfg, key)!r} {why}")
    for item in cfg.report_to:
        if item not in choices(Tracker):
            raise SftlabError(f"config key 'report_to': {item!r} is not one of {', '.join(choices(Tracker))}")
    for name in ("learning_rate", "epochs", "batch_size", "gradient_accumulation"):
        val = getattr(cfg, name)
        if not isinstance(val, str) and val <= 0:
            raise SftlabError(f"config key '{name}': {val!r} must be positive")


def _set_value(key: str, raw: str):
    """One ``--set`` value: YAML-parsed, so numbers, booleans and lists work, except where the key takes
    text (a path, a prompt, a name): there YAML would cut ``a #1`` at its comment, read ``Answer: briefly``
    as a mapping, ``no`` as false and ``007`` as 7, so the text is kept as given (a YAML-quoted string,
    and a whole ``[...]`` or ``{...}``, are still parsed: a list where the key takes one, else the usual error)."""
    text = raw.strip()
    kinds = field_types(key) if key in FIELDS else ()
    takes_text = str in kinds and not {int, float, bool} & set(kinds)
    quoted = len(text) >= 2 and text[0] in "'\"" and text[-1] == text[0]
    structured = len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("{", "}"))
    if takes_text and not quoted and not structured:
        return text
    try:
        return yaml.safe_load(raw) if text else ""
    except yaml.YAMLError:
        return raw


def parse_set(items: list[str] | None) -> dict:
    """``["lr=1e-4", "packing=true"]`` -> dict of raw values (YAML-parsed, so numbers and lists work;
    text keys keep their text, :func:`_set_value`)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SftlabError(f"--set '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = _set_value(key.strip(), raw)
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's loader, refusing a key given twice in one mapping (safe_load keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<" and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first on line {seen[key]}); only the last would count",
                    key_node.start_mark)
            seen.setdefault(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Read YAML (if given), apply overrides, coerce types and validate. Errors name the key."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise SftlabError(f"config file '{path}' not found")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, not UTF-8 text
            why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
            raise SftlabError(f"config file '{path}' cannot be read: {why}", hint="give a YAML file of config keys")
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise SftlabError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SftlabError(f"{path}: expected a mapping of config keys")
        raw.update(loaded)
    raw.update({k: v for k, v in (overrides or {}).items()})
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "run `sftlab train --help-config` for the list"
        raise SftlabError(f"unknown config key '{unknown[0]}'", hint=hint)
    values = {k: _coerce(k, v) for k, v in raw.items()}
    cfg = Config(**values)
    _validate(cfg)
    return cfg


def config_schema() -> dict[str, dict]:
    """Every config key: its type, default, help text and allowed values (``--help-config --json``)."""
    return {name: {"type": _type_name(name), "default": field_default(name), "help": f.metadata["help"],
                   "choices": list(field_choices(name))} for name, f in FIELDS.items()}


def config_help() -> str:
    """``--help-config``: one line per key, with its allowed values where they are fixed."""
    lines = []
    for name, info in config_schema().items():
        only_fixed = all(_is_literal(t) for t in field_types(name))
        extra = f" [{' | '.join(info['choices'])}]" if only_fixed else ""
        lines.append(f"  {name:<26} {info['help']}{extra} (default: {info['default']!r})")
    return "\n".join(lines)
