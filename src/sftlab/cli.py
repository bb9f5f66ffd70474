"""The `sftlab` command: parse arguments, call one library function per command, print.

No logic lives here. Each command has an ``_add_<cmd>`` function that declares its flags and a
``_cmd_<cmd>`` function that calls the library and prints. User mistakes arrive as SftlabError and
are printed as one line on stderr with a non-zero exit; nothing else is caught.

Flags that set a config key are declared by :func:`_config_flag` from the Config field (help, type,
allowed values), so they cannot drift from the config. With ``--json`` stdout is exactly one JSON
document: whatever else the command or a library prints goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import typing
import warnings

from sftlab.config import FIELDS, field_choices, field_default, field_types
from sftlab.core.errors import SftlabError
from sftlab.core.findings import Finding

_json_stdout = None  # the real stdout while a --json command runs; everything else is sent to stderr


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str), file=_json_stdout or sys.stdout)


def _run(args) -> int:
    """Run the command; under --json only :func:`_print_json` reaches stdout, other prints go to stderr."""
    global _json_stdout
    if not getattr(args, "json", False):
        return args.func(args)
    _json_stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
    finally:
        _json_stdout = None

# --- commands -------------------------------------------------------------------------------
# Each command: _add_X(parser) declares flags; _cmd_X(args) -> exit code.

COMMANDS: dict[str, tuple] = {}


def _command(name: str, help_text: str):
    def deco(add_fn):
        COMMANDS[name] = (help_text, add_fn)
        return add_fn

    return deco


def _config_flag(p: argparse.ArgumentParser, key: str, flag: str | None = None, *, dest: str | None = None,
                 default=None, help_text: str | None = None) -> None:
    """Add ``--key`` (or ``flag``) for config key ``key``: help, type and allowed values from the Config field.

    ``default`` None (the usual) leaves the key to the config file and the Config default; commands that
    read no config (doctor, plan) pass the value they use. Values are checked by the config (or the
    command), so a bad one is the same one-line error as in a config file.
    """
    kinds = [t for t in field_types(key) if t is not type(None)]
    fixed = field_choices(key)
    text = (help_text or FIELDS[key].metadata["help"]).replace("%", "%%")
    shown = default if default is not None else field_default(key)
    if shown not in (None, [], "") and shown is not False:
        text += f" (default {shown})"
    kw: dict = {"dest": dest or key, "default": default, "help": text}
    if kinds == [bool]:
        kw["action"] = "store_true"
    elif len(kinds) == 1 and kinds[0] in (int, float):
        kw["type"] = kinds[0]
    if fixed and all(typing.get_origin(t) is typing.Literal for t in kinds):
        kw["metavar"] = "{" + ",".join(fixed) + "}"
    p.add_argument(flag or "--" + key.replace("_", "-"), **kw)
    p.set_defaults(config_keys=(*(p.get_default("config_keys") or ()), kw["dest"]))


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by commands that read a config: each overrides the config key of the same name."""
    p.add_argument("config", nargs="?", help="YAML config file (flags and --set override it)")
    for key in ("model", "data", "format", "template", "system_prompt", "max_seq_length", "masking", "truncation"):
        _config_flag(p, key)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")


def _config_from_args(args):
    """The config file, then each config flag given, then --set: later wins."""
    from sftlab.config import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        load_config,
        parse_set,
    )

    overrides = {k: getattr(args, k) for k in args.config_keys if getattr(args, k, None) is not None}
    overrides.update(parse_set(args.set))
    return load_config(args.config, overrides)


@_command("prepare", "tokenize conversations into training examples with exact response-only labels")
def _add_prepare(p):
    _add_data_flags(p)
    p.add_argument("--out", help="write the tokenized dataset (Arrow) and report to this folder")
    p.add_argument("--dump", metavar="FILE.jsonl", help="write one JSON object per example: input_ids, labels (-100 = masked)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N examples with trained tokens highlighted")
    p.add_argument("--json", action="store_true", help="print the preparation report as JSON")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    from sftlab.core.io import (
        write_jsonl,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.data.prepare import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        dump_rows,
        prepare,
        render_example,
        save_dataset,
    )

    cfg = _config_from_args(args)
    prepared = prepare(cfg)
    if args.dump:
        write_jsonl(args.dump, dump_rows(prepared))
    if args.out:
        save_dataset(prepared, args.out)
    if args.json:
        _print_json({"report": prepared.report.to_dict(), "template": prepared.template.name if prepared.template else None,
                     "added_tokens": prepared.added_tokens})
        return 0
    for ex in prepared.examples[: args.show]:
        print(f"--- example {ex.index + 1} ({ex.where}): {len(ex.input_ids)} tokens, {ex.n_trained} trained")
        print(render_example(prepared.tokenizer, ex))
    r = prepared.report
    tpl = prepared.template.name if prepared.template else "none (plain text)"
    print(f"prepared {cfg.data}: {r.summary()}; template: {tpl}")
    if prepared.added_tokens:
        print(f"note: added special tokens the template needs: {', '.join(prepared.added_tokens)} (embeddings are resized in training)")
    if r.eos_appended:
        print("note: the template writes no end-of-turn token after replies; the EOS token is appended and trained")
    for where, why in r.dropped[:10]:
        print(f"dropped {where}: {why}")
    if len(r.dropped) > 10:
        print(f"... and {len(r.dropped) - 10} more dropped")
    if args.dump:
        print(f"wrote {args.dump}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


@_command("doctor", "check a data file: parsing, roles, encoding, special tokens, lengths, duplicates, eval overlap")
def _add_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="data file (.jsonl/.json/.csv/.parquet) or local dataset folder")
    p.add_argument("--model", default=None,
                   help="tokenizer to count tokens with (local folder, hub id or smollm2-135m-instruct); "
                        "enables the length, no-trained-token and trained-token checks")
    p.add_argument("--template", default=None, help="chat template: a built-in name, 'tokenizer' or a .jinja file")
    _config_flag(p, "format", dest="fmt")
    _config_flag(p, "max_seq_length", default=field_default("max_seq_length"),
                 help_text="token limit checked with --model")
    p.add_argument("--eval", dest="eval_data", default=None, help="eval data file to check for overlap with DATA")
    p.add_argument("--json", action="store_true", help="print findings and stats as JSON")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args) -> int:
    """Exit 0 when clean, 1 with only warnings, 2 with errors in the data."""
    from sftlab.data.doctor import (
        run_doctor,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    tokenizer = None
    if args.model:
        from sftlab.models import (
            load_tokenizer,  # deferred: the command pulls in torch; `sftlab --help` stays fast
        )

        tokenizer = load_tokenizer(args.model)
    result = run_doctor(args.data, eval_data=args.eval_data, fmt=args.fmt, tokenizer=tokenizer,
                        template=args.template, max_seq_length=args.max_seq_length)
    return _report_findings(result, args.json)


@_command("train", "fine-tune: full, lora, qlora or prefix; writes a run folder")
def _add_train(p):
    _add_data_flags(p)
    for key in ("eval_data", "method", "output_dir", "resume"):
        _config_flag(p, key)
    p.add_argument("--check", action="store_true", help="only run the configuration checklist and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("--json", action="store_true", help="print the summary (with --check: findings and resolved "
                                                       "config; with --help-config: every key) as JSON")
    p.set_defaults(func=_cmd_train)


def _close_process_group(wait: bool) -> None:
    """Under torchrun/accelerate: wait for every process, then close the process group before exit.

    Left open, gloo's threads are torn down by the interpreter's exit and a process can abort
    ("terminate called without an active exception"), failing the launch after a finished run.
    """

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist  # deferred: heavy library, imported on first use

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _report_findings(result, as_json: bool) -> int:
    """Print a doctor/diagnose result (text or JSON); its exit code: 0 clean, 1 warnings, 2 errors."""
    if as_json:
        _print_json(result.to_dict())
    else:
        print(result.format_text())
    return result.exit_code


def _print_checks(findings: list) -> int:
    """Print the configuration checklist of `train --check`; exit code 2 when a finding is an error."""
    found = [f if isinstance(f, Finding) else Finding(**f) for f in findings]
    for f in found:
        print(f"check {f}")
    if not found:
        print("check: configuration looks sound")
    return 2 if any(f.severity == "error" for f in found) else 0


def _cmd_train(args) -> int:
    from sftlab.config import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        config_help,
        config_schema,
    )

    if args.help_config:
        if args.json:
            _print_json(config_schema())
        else:
            print(config_help())
        return 0
    from sftlab.train.run import (
        train,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    cfg = _config_from_args(args)
    try:
        if args.check:  # the checklist is printed here; anything the library prints goes to stderr
            with contextlib.redirect_stdout(sys.stderr):
                summary = train(cfg, check_only=True, quiet=True)
        else:
            summary = train(cfg, quiet=args.json)
    except BaseException:
        _close_process_group(wait=False)  # no barrier: the other processes may never reach it
        raise
    _close_process_group(wait=True)
    if args.json:
        _print_json(summary)
        return 0
    if args.check:
        return _print_checks(summary["findings"])
    stopped = summary["stopped"]
    print(f"run folder: {cfg.output_dir}  ({stopped}; {summary['steps']} steps, {summary['time_s']:.0f}s, "
          f"{summary['tokens_per_second']:.0f} tok/s, peak {summary['peak_memory_mb']:.0f} MB)")
    if summary.get("final_eval_loss") is not None:
        print(f"final train loss {summary['final_train_loss']:.4f}, eval loss {summary['final_eval_loss']:.4f}")
    if stopped == "interrupted":
        print(f"interrupted: a checkpoint was saved; continue with: sftlab train ... --output-dir {cfg.output_dir} --resume")
        return 130
    return 0


@_command("export", "export a run: the adapter or merged weights + tokenizer + the exact training chat template (+ GGUF)")
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (holds config.yaml and model/)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base weights (default: the adapter alone)")
    p.add_argument("--gguf", action="store_true", help="also write a llama.cpp GGUF file with the chat template (needs --merge for LoRA)")
    p.add_argument("--gguf-dtype", default="f16", choices=("f16", "f32"), help="GGUF weight type (default f16)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype of the export (default fp32)")
    p.add_argument("--device", default="cpu", help="device used to merge and check (default cpu)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip loading the export back to compare logits")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from sftlab.export import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        export_run,
        format_export,
    )

    res = export_run(args.run, args.out, merge=args.merge, gguf=args.gguf, gguf_dtype=args.gguf_dtype,
                     force=args.force, dtype=args.dtype, device=args.device, verify=args.verify)
    if args.json:
        _print_json(res.to_dict())
    else:
        print(format_export(res))
    return 0


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN", help="run folder, export folder, local HF folder, .gguf file or hub id")
    p.add_argument("--system", dest="system_prompt", help="system prompt")
    p.add_argument("--template", help="chat template (default: the run's training template, or the tokenizer's own)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")


@_command("chat", "chat with a run or model in the terminal (streaming, multi-turn, /reset, /exit)")
def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_generation_flags(p)
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(args) -> int:
    from sftlab.chat import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        ChatSession,
        load_chat_model,
        run_chat,
    )

    model, tok, tpl = load_chat_model(args.model, template=args.template, device=args.device)
    session = ChatSession(model, tok, tpl, system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p)
    return run_chat(session, name=args.model)


@_command("generate", "generate replies for --prompt texts or a --data file, as JSONL")
def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_generation_flags(p)
    p.add_argument("--prompt", action="append", help="a user message to reply to (repeatable)")
    p.add_argument("--data", help="data file: each conversation's last assistant reply is generated (kept as 'reference')")
    _config_flag(p, "format")
    p.add_argument("--out", metavar="FILE.jsonl", help="write rows here (default: print them as JSONL)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON (without --out: one document with the rows under 'rows')")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from sftlab.chat import (
        generate_jsonl,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    res = generate_jsonl(args.model, prompts=args.prompt, data=args.data, out=args.out, fmt=args.format,
                         system_prompt=args.system_prompt, template=args.template, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                         device=args.device)
    if args.json:
        _print_json(res.summary() if args.out else {**res.summary(), "rows": res.rows})
    elif not args.out:
        for row in res.rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        s = res.summary()
        print(f"wrote {s['n']} replies to {args.out} in {s['seconds']} s ({s['cut_at_max_new_tokens']} cut at --max-new-tokens)")
    return 0


@_command("eval", "evaluate a run or model: loss, perplexity, generation metrics, task score; --compare for before/after")
def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN_OR_MODEL", help="a run folder, or a model (local folder, .gguf, hub id, smollm2-135m-instruct)")
    p.add_argument("--data", required=True, help="eval data file (same formats as training data)")
    p.add_argument("--compare", dest="compare_to", metavar="BASE",
                   help="also score BASE on the same data and print both with the difference; 'base' = the run's base model")
    p.add_argument("--general", help="general data for the forgetting check (default: the run's replay_data)")
    _config_flag(p, "format", dest="fmt")
    p.add_argument("--template", help="chat template (default: the run's training template, or the tokenizer's own)")
    p.add_argument("--scorer", help="task scorer: exact, contains, regex, regex:PATTERN, json_valid, json_fields (default: chosen from the references)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128, help="longest reply in tokens (default 128)")
    p.add_argument("--do-sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="examples per forward/generate batch")
    p.add_argument("--max-seq-length", dest="max_seq_length", type=int, help="longest eval example in tokens (default: the run's)")
    p.add_argument("--samples", type=int, default=5, help="sample generations kept in the result (default 5)")
    p.add_argument("--limit", type=int, help="use only the first N examples of the eval and general data")
    p.add_argument("--forgetting-threshold", dest="threshold", type=float, default=0.10,
                   help="relative rise of general-data loss flagged as forgetting (default 0.10)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--save", action="store_true", help="store the result in the run's summary.json (shown by `sftlab report`)")
    p.add_argument("--out", metavar="FILE.json", help="also write the full result to this file")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from sftlab.core.io import (
        atomic_write_text,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.eval import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        GenerationSettings,
        attach_to_run,
        format_eval,
        run_eval,
    )

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.save:
        from sftlab.rundir import (
            RunDir,  # deferred: the command pulls in torch; `sftlab --help` stays fast
        )

        RunDir(args.target).summary()  # --save needs a finished run: fail before evaluating
    out = run_eval(args.target, args.data, compare_to=args.compare_to, general=args.general, fmt=args.fmt,
                   template=args.template, scorer=args.scorer, settings=settings, batch_size=args.batch_size,
                   max_seq_length=args.max_seq_length, samples=args.samples, threshold=args.threshold, device=args.device,
                   limit=args.limit)
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=2, default=str))
    if args.save:
        attach_to_run(args.target, out)
    if args.json:
        _print_json(out)
    else:
        print(format_eval(out))
        for path in filter(None, (args.out, args.save and f"{args.target}/summary.json")):
            print(f"wrote {path}")
    return 0


@_command("diagnose", "read a run folder and report problems with evidence and concrete config fixes")
def _add_diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder (the output_dir of `sftlab train`)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=_cmd_diagnose)


def _cmd_diagnose(args) -> int:
    """Exit 0 when no problem is found, 1 with warnings, 2 with errors."""
    from sftlab.diagnose import (
        diagnose,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    return _report_findings(diagnose(args.run), args.json)


@_command("report", "write one self-contained HTML page about a run: curves, data, before/after, diagnosis")
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder (the output_dir of `sftlab train`)")
    p.add_argument("--out", metavar="FILE.html", help="where to write the page (default: RUN/report.html)")
    p.add_argument("--no-doctor", dest="doctor", action="store_false", help="skip running the data doctor on the training data")
    p.add_argument("--json", action="store_true", help="print the path, plots and number of findings as JSON")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from sftlab.report import (
        write_report,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    info = write_report(args.run, args.out, doctor=args.doctor)
    if args.json:
        _print_json(info)
    else:
        print(f"wrote {info['path']} ({len(info['plots'])} plots, {info['findings']} findings)")
    return 0


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
    _config_flag(p, "precision", default="auto", help_text="auto: bf16 mixed on cuda, fp32 on cpu")
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
    shape = shape_from_params(args.params) if args.params else load_shape(args.model or "smollm2-135m-instruct")
    setup = TrainSetup(method=args.method, batch=args.batch, seq_len=args.seq_len, grad_accum=args.grad_accum,
                       precision=args.precision, optimizer=args.optimizer, device=args.device,
                       gradient_checkpointing=args.gradient_checkpointing, lora_r=args.lora_r, lora_dropout=args.lora_dropout,
                       trained_fraction=args.trained_fraction, attention=args.attention)
    plan = make_plan(shape, setup, budget_gb=args.budget_gb)
    if args.json:
        _print_json(plan.to_dict())
    else:
        print(render_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftlab", description="Supervised fine-tuning toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_fn(p)
    return parser


def quiet_libraries() -> None:
    """Keep library chatter (load bars, optional-kernel notices) out of what sftlab prints."""

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of the libraries
    try:
        from transformers.utils import (
            logging as hf_logging,  # deferred: heavy library, imported on first use
        )

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        code = _run(args)
    except SftlabError as exc:
        print(f"sftlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"sftlab {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
