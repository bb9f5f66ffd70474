"""`sftlab recommend` and `plan`: decide the approach and the memory it needs."""

from __future__ import annotations

import argparse
import dataclasses

from sftlab.cli.base import _command, _config_flag, _print_json
from sftlab.config import field_default, load_config, parse_set
from sftlab.core.errors import SftlabError


@_command("recommend", "choose the approach for a use case: prompt engineering, few-shot, RAG, PEFT or full SFT, with reasons")
def _add_recommend(p):
    p.add_argument("use_case", nargs="?", metavar="USE_CASE.yaml", help="a YAML file with the use-case keys below (flags override it)")
    p.add_argument("--complexity", help="task complexity: simple, moderate or complex")
    p.add_argument("--examples", help="number of labelled examples available")
    p.add_argument("--strict-format", dest="strict_format", action=argparse.BooleanOptionalAction, default=None,
                   help="outputs must follow a strict format (JSON, a schema, a template)")
    p.add_argument("--domain-specific", dest="domain_specific", action=argparse.BooleanOptionalAction, default=None,
                   help="the task needs domain knowledge (knowledge-heavy)")
    p.add_argument("--latency", help="latency sensitivity: low, medium or high")
    p.add_argument("--compute", help="compute budget: low, medium or high")
    p.add_argument("--knowledge-updates", dest="knowledge_updates", help="how often the knowledge changes: never, yearly, monthly, weekly or daily")
    p.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    p.set_defaults(func=_cmd_recommend)


def _cmd_recommend(args) -> int:
    from sftlab.plan import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        load_use_case,
        recommend,
        render_recommendation,
    )

    keys = ("complexity", "examples", "strict_format", "domain_specific", "latency", "compute", "knowledge_updates")
    rec = recommend(load_use_case(args.use_case, {k: getattr(args, k) for k in keys}))
    if args.json:
        _print_json(rec.to_dict())
    else:
        print(render_recommendation(rec))
    return 0


# plan flag -> the training config key it plans (`sftlab plan CONFIG.yaml` reads them from a run's config)
_PLAN_KEYS = {"method": "method", "batch": "batch_size", "grad_accum": "gradient_accumulation",
              "seq_len": "max_seq_length", "precision": "precision", "optimizer": "optimizer", "lora_r": "lora_r",
              "lora_dropout": "lora_dropout", "attention": "attn_implementation",
              "merge_micro_batches": "merge_micro_batches"}
_PLAN_SEQ_LEN = 512  # without a config: a typical row (a config plans its max_seq_length, the longest a row can be)


@_command("plan", "estimate training memory part by part, where it fits, and a configuration that fits a budget")
def _add_plan(p):
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                   help="a training config: plan the run it describes (model, method, batch, accumulation, "
                        "max_seq_length, precision, ...); --set and flags override it. Without one, train's defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, as sftlab train --set does (the flags below override these)")
    p.add_argument("--model", help="model name, local HF folder or .gguf (config only, no weights); default: the embedded default")
    p.add_argument("--params", help="plan for a typical model of this size instead, e.g. 7B or 135M")
    _config_flag(p, "method")
    p.add_argument("--batch", type=int, help=f"micro-batch size (default: train's, {field_default('batch_size')})")
    p.add_argument("--seq-len", dest="seq_len", type=int,
                   help=f"tokens per row (default: the config's max_seq_length; without a config {_PLAN_SEQ_LEN})")
    p.add_argument("--grad-accum", dest="grad_accum", type=int,
                   help=f"gradient accumulation steps (default: train's, {field_default('gradient_accumulation')})")
    _config_flag(p, "precision", help_text="auto: bf16 on cuda; on cpu, what a short probe measures faster here (as sftlab train)")
    _config_flag(p, "optimizer")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action=argparse.BooleanOptionalAction,
                   default=None, help="recompute activations in backward (default: the config's when true; train's "
                                      "auto turns it on only where it would not fit: the recommendation below does the same)")
    _config_flag(p, "lora_r")
    _config_flag(p, "lora_dropout")
    p.add_argument("--trained-fraction", dest="trained_fraction", type=float, default=1.0,
                   help="share of tokens with a trained label (default 1.0; prompt masking lowers it)")
    p.add_argument("--device", default="cuda", help="where training runs: cuda (default) or cpu")
    _config_flag(p, "attn_implementation", "--attention", dest="attention",
                 help_text="attention kernel; auto picks it as sftlab train does")
    p.add_argument("--budget-gb", dest="budget_gb", type=float, help="memory budget for the largest batch/length and the recommendation")
    _config_flag(p, "merge_micro_batches",
                 help_text="as sftlab train: true plans the step as one micro-batch of batch x grad-accum; auto (on a "
                           "CPU, decided by a trial at train time) also shows that micro-batch's estimate")
    p.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                   help="plan with liger-kernel's RMSNorm/SwiGLU/RoPE kernels and fused loss on (cuda; train's "
                        "liger_kernels and fused_loss set true), or --no-liger off (default: the config's); without "
                        "them, a plan for cuda also shows that estimate")
    p.add_argument("--json", action="store_true", help="print total_bytes, breakdown, fits and recommended as JSON")
    p.set_defaults(func=_cmd_plan)


def _plan_settings(args) -> tuple[dict, list[str]]:
    """Each planned setting: the flag if given, else the training config's value (``args.config``), else
    what `sftlab train` uses by default; and notes on values a plan cannot take as they are."""
    from sftlab.plan.auto import (
        PREFIX_NO_CHECKPOINTING,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.plan.setup import (
        lora_targets,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    cfg = load_config(args.config, parse_set(args.set))
    given = {dest: getattr(args, dest) for dest in _PLAN_KEYS if getattr(args, dest) is not None}
    out = {dest: given.get(dest, getattr(cfg, key)) for dest, key in _PLAN_KEYS.items()}
    notes = []
    if "seq_len" not in given and not args.config and "max_seq_length" not in parse_set(args.set):
        out["seq_len"] = _PLAN_SEQ_LEN
    if out["batch"] == "auto":
        out["batch"] = field_default("batch_size")
        notes.append(f"batch_size auto: planned at {out['batch']}; train sizes it at start from this estimate for "
                     "the data's longest row (the largest that fits)")
    if out["grad_accum"] == "auto":  # train's rule without the data's size: a global batch of 16
        from sftlab.plan.auto import (
            AUTO_GLOBAL_BATCH,  # deferred: the command pulls in torch; `sftlab --help` stays fast
        )

        out["grad_accum"] = max(1, -(-AUTO_GLOBAL_BATCH // int(out["batch"])))
    out["merge_micro_batches"] = str(out["merge_micro_batches"]).lower()
    out["prefix_tokens"] = cfg.prefix_tokens  # no flags: the config's (or train's default)
    out["lora_targets"], out["lora_alpha"] = lora_targets(cfg.lora_target_modules), cfg.lora_alpha
    if cfg.packing and out["method"] == "prefix":
        notes.append("packing: train refuses it with prefix tuning (its virtual tokens break packed rows); --set packing=false")
    out["ewc"], out["packing"] = cfg.ewc_lambda > 0, cfg.packing
    if cfg.packing and out["attention"] == "auto":  # train runs packed rows with sdpa (flash where installed)
        out["attention"] = "sdpa"
    out["gradient_checkpointing"] = (cfg.gradient_checkpointing is True if args.gradient_checkpointing is None
                                     else args.gradient_checkpointing)  # --no-gradient-checkpointing overrides a config's true
    if out["method"] == "prefix" and out["gradient_checkpointing"]:
        notes.append(f"{PREFIX_NO_CHECKPOINTING}: train refuses it; --no-gradient-checkpointing")
    out["liger_kernels"] = cfg.liger_kernels is True if args.liger is None else args.liger  # --no-liger: both off
    out["fused_loss"] = cfg.fused_loss is True if args.liger is None else args.liger
    out["liger_auto"] = args.liger is None and "auto" in (cfg.liger_kernels, cfg.fused_loss)  # train's trials decide
    out["model"] = args.model or (None if args.params else cfg.model)
    out["sharded"] = bool(cfg.fsdp or cfg.deepspeed)  # merge_micro_batches auto never merges there
    if cfg.fsdp or cfg.deepspeed:
        notes.append(f"{'fsdp ' + repr(cfg.fsdp) if cfg.fsdp else 'deepspeed ' + repr(cfg.deepspeed)}: planned as one "
                     "process holding the whole model; sharding (FSDP full_shard, ZeRO-2/3) splits gradients and "
                     "optimizer state (ZeRO-3 and full_shard the weights too) over the GPUs, which this plan does not estimate")
    return out, notes


def _cmd_plan(args) -> int:
    from sftlab.plan import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        TrainSetup,
        load_shape,
        make_plan,
        render_plan,
        shape_from_params,
    )

    if args.model and args.params:
        raise SftlabError("give --model or --params, not both")
    from sftlab.plan.auto import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        describe_precision,
        resolve_precision,
    )
    from sftlab.plan.render import (
        gb,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.plan.shapes import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        lora_rank_past_width,
        past_context,
    )
    from sftlab.train.merge import (
        FIT,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    s, notes = _plan_settings(args)
    shape = shape_from_params(args.params) if args.params else load_shape(s["model"])
    precision, probe = s["precision"], None
    if precision == "auto":  # the rule `sftlab train` uses: bf16 on a GPU, measured on this CPU
        precision, probe = resolve_precision(args.device, shape.hidden, shape.intermediate)
    batch, grad_accum = int(s["batch"]), int(s["grad_accum"])
    setup = TrainSetup(method=s["method"], batch=batch, seq_len=int(s["seq_len"]), grad_accum=grad_accum,
                       precision=precision, optimizer=s["optimizer"], device=args.device,
                       gradient_checkpointing=s["gradient_checkpointing"], lora_r=int(s["lora_r"]),
                       lora_dropout=float(s["lora_dropout"]), trained_fraction=args.trained_fraction,
                       prefix_tokens=int(s["prefix_tokens"]), ewc=s["ewc"], lora_targets=s["lora_targets"],
                       lora_alpha=int(s["lora_alpha"]),
                       attention=s["attention"], liger_kernels=s["liger_kernels"], fused_loss=s["fused_loss"])
    if setup.method in ("lora", "qlora") and (wide := lora_rank_past_width(shape, setup.lora_r, setup.lora_targets)):
        notes.append(f"{wide[0]}; --lora-r {wide[1]} or less")  # a rank past a layer's width adds parameters, not capacity
    if (over := past_context(shape.context, setup.seq_len, setup.method, setup.prefix_tokens)) and s["packing"]:
        notes.append(f"note: packed rows of {setup.seq_len} tokens: positions restart at each example, so only an "
                     f"example longer than the model's context of {shape.context} passes it; --set max_seq_length="
                     f"{over[1]} keeps every example within it")
    elif over:
        notes.append(f"note: {over[0]} is beyond the model's context of {shape.context} (positions it never trained "
                     f"on); plan with --seq-len at most {over[1]}" if over[1] else
                     f"note: {over[0]} is beyond the model's context of {shape.context}: prefix_tokens alone fill it")
    merge = s["merge_micro_batches"]
    if merge not in ("auto", "true", "false"):
        raise SftlabError(f"--merge-micro-batches {merge}: not auto, true or false")
    if merge == "true" and grad_accum > 1:  # what train runs: one micro-batch per step
        setup = dataclasses.replace(setup, batch=batch * grad_accum, grad_accum=1)
    plan = make_plan(shape, setup, budget_gb=args.budget_gb)
    merged = None
    if merge == "auto" and args.device == "cpu" and grad_accum > 1 and not s["sharded"]:  # train/merge.py's rule
        merged = make_plan(shape, dataclasses.replace(setup, batch=batch * grad_accum, grad_accum=1),
                           budget_gb=args.budget_gb).estimate.total_bytes
    liger = None  # auto on a GPU: train's trials decide, so show the estimate both ways
    if args.device == "cuda" and s["liger_auto"] and not (setup.liger_kernels and setup.fused_loss):
        liger = make_plan(shape, dataclasses.replace(setup, liger_kernels=True, fused_loss=True),
                          budget_gb=args.budget_gb).estimate.total_bytes
    if args.json:
        _print_json({**plan.to_dict(), "precision_probe": probe.to_dict() if probe else None,
                     "merged_total_bytes": merged, "liger_total_bytes": liger, "config": args.config, "set": args.set, "notes": notes})
    else:
        if args.config:
            print(f"planning the run of {args.config} ({'--set and ' if args.set else ''}flags override it)")
        if probe is not None:
            print(describe_precision(precision, probe.to_dict()))
        print(render_plan(plan))
        for note in notes:
            print(note)
        if merged is not None and merged > FIT * plan.budget["bytes"]:  # train's rule: no trial, not merged
            print(f"merge_micro_batches auto: one micro-batch of {batch * grad_accum} would need {gb(merged)}, over "
                  f"{FIT:.0%} of the budget: train keeps {grad_accum} of {batch}, as planned above")
        elif merged is not None:
            print(f"merge_micro_batches auto: where a trial at train time measures one micro-batch of "
                  f"{batch * grad_accum} faster than {grad_accum} of {batch}, train "
                  f"runs that: {gb(merged)} (--merge-micro-batches false plans {batch})")
        if liger is not None:
            print(f"with liger-kernel (pip install 'sftlab[gpu]'), where train's trials turn its kernels and fused loss "
                  f"on: {gb(liger)} (--liger plans that; from liger-kernel 0.8.5's saved tensors, not yet measured on a GPU)")
    return 0
