"""`sftlab recommend` and `plan`: decide the approach and the memory it needs."""

from __future__ import annotations

import argparse
import dataclasses

from sftlab.cli.base import _command, _config_flag, _print_json
from sftlab.config import field_default
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


@_command("plan", "estimate training memory part by part, where it fits, and a configuration that fits a budget")
def _add_plan(p):
    p.add_argument("--model", help="model name, local HF folder or .gguf (config only, no weights); default: the embedded default")
    p.add_argument("--params", help="plan for a typical model of this size instead, e.g. 7B or 135M")
    _config_flag(p, "method", default=field_default("method"))
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    _config_flag(p, "precision", default="auto", help_text="auto: bf16 on cuda; on cpu, what a short probe measures faster here (as sftlab train)")
    _config_flag(p, "optimizer", default=field_default("optimizer"))
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true",
                   help="recompute activations in backward")
    _config_flag(p, "lora_r", default=field_default("lora_r"))
    _config_flag(p, "lora_dropout", default=field_default("lora_dropout"))
    p.add_argument("--trained-fraction", dest="trained_fraction", type=float, default=1.0,
                   help="share of tokens with a trained label (default 1.0; prompt masking lowers it)")
    p.add_argument("--device", default="cuda", help="where training runs: cuda (default) or cpu")
    _config_flag(p, "attn_implementation", "--attention", dest="attention", default="auto",
                 help_text="attention kernel; auto picks it as sftlab train does")
    p.add_argument("--budget-gb", dest="budget_gb", type=float, help="memory budget for the largest batch/length and the recommendation")
    _config_flag(p, "merge_micro_batches", default="auto",
                 help_text="as sftlab train: true plans the step as one micro-batch of batch x grad-accum; auto (on a "
                           "CPU, decided by a trial at train time) also shows that micro-batch's estimate")
    p.add_argument("--liger", action="store_true",
                   help="plan with liger-kernel's RMSNorm/SwiGLU/RoPE kernels and fused loss on (cuda; train's "
                        "liger_kernels and fused_loss set true); without it, a plan for cuda also shows that estimate")
    p.add_argument("--json", action="store_true", help="print total_bytes, breakdown, fits and recommended as JSON")
    p.set_defaults(func=_cmd_plan)


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

    shape = shape_from_params(args.params) if args.params else load_shape(args.model or "smollm2-135m-instruct")
    precision, probe = args.precision, None
    if precision == "auto":  # the rule `sftlab train` uses: bf16 on a GPU, measured on this CPU
        precision, probe = resolve_precision(args.device, shape.hidden, shape.intermediate)
    setup = TrainSetup(method=args.method, batch=args.batch, seq_len=args.seq_len, grad_accum=args.grad_accum,
                       precision=precision, optimizer=args.optimizer, device=args.device,
                       gradient_checkpointing=args.gradient_checkpointing, lora_r=args.lora_r, lora_dropout=args.lora_dropout,
                       trained_fraction=args.trained_fraction, attention=args.attention,
                       liger_kernels=args.liger, fused_loss=args.liger)
    merge = str(args.merge_micro_batches).lower()
    if merge not in ("auto", "true", "false"):
        raise SftlabError(f"--merge-micro-batches {args.merge_micro_batches}: not auto, true or false")
    if merge == "true" and args.grad_accum > 1:  # what train runs: one micro-batch per step
        setup = dataclasses.replace(setup, batch=args.batch * args.grad_accum, grad_accum=1)
    plan = make_plan(shape, setup, budget_gb=args.budget_gb)
    merged = None
    if merge == "auto" and args.device == "cpu" and args.grad_accum > 1:
        merged = make_plan(shape, dataclasses.replace(setup, batch=args.batch * args.grad_accum, grad_accum=1),
                           budget_gb=args.budget_gb).estimate.total_bytes
    liger = None  # auto on a GPU: train's trials decide, so show the estimate both ways
    if args.device == "cuda" and not args.liger:
        liger = make_plan(shape, dataclasses.replace(setup, liger_kernels=True, fused_loss=True),
                          budget_gb=args.budget_gb).estimate.total_bytes
    if args.json:
        _print_json({**plan.to_dict(), "precision_probe": probe.to_dict() if probe else None,
                     "merged_total_bytes": merged, "liger_total_bytes": liger})
    else:
        if probe is not None:
            print(describe_precision(precision, probe.to_dict()))
        print(render_plan(plan))
        if merged is not None:
            print(f"merge_micro_batches auto: where a trial at train time measures one micro-batch of "
                  f"{args.batch * args.grad_accum} faster than {args.grad_accum} of {args.batch} (and it fits), train "
                  f"runs that: {gb(merged)} (--merge-micro-batches false plans {args.batch})")
        if liger is not None:
            print(f"with liger-kernel (pip install 'sftlab[gpu]'), where train's trials turn its kernels and fused loss "
                  f"on: {gb(liger)} (--liger plans that; from liger-kernel 0.8.5's saved tensors, not yet measured on a GPU)")
    return 0
