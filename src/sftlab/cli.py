"""The `sftlab` command: parse arguments, call one library function per command, print.

No logic lives here. Each command has an ``_add_<cmd>`` function that declares its flags and a
``_cmd_<cmd>`` function that calls the library and prints. User mistakes arrive as SftlabError and
are printed as one line on stderr with a non-zero exit; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import sys

from sftlab.errors import SftlabError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- commands -------------------------------------------------------------------------------
# Each command: _add_X(parser) declares flags; _cmd_X(args) -> exit code.

COMMANDS: dict[str, tuple] = {}


def _command(name: str, help_text: str):
    def deco(add_fn):
        COMMANDS[name] = (help_text, add_fn)
        return add_fn

    return deco


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by commands that read a config: each overrides the config key of the same name."""
    p.add_argument("config", nargs="?", help="YAML config file (flags and --set override it)")
    p.add_argument("--model", help="model: 'smollm2-135m-instruct' (default), a local HF folder, a .gguf file or a hub id")
    p.add_argument("--data", help="training data file or local dataset folder")
    p.add_argument("--format", help="data format: auto, messages, sharegpt, alpaca, prompt_completion, text")
    p.add_argument("--template", help="chat template: the tokenizer's own by default; alpaca, vicuna, chatml, llama3, mistral, or a .jinja file")
    p.add_argument("--system-prompt", dest="system_prompt", help="system prompt for conversations that have none")
    p.add_argument("--max-seq-length", dest="max_seq_length", type=int, help="longest example in tokens")
    p.add_argument("--masking", help="all_assistant (default), last_assistant or all")
    p.add_argument("--truncation", help="cut_turns (default), drop or truncate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")


def _config_from_args(args):
    from sftlab.config import load_config, parse_set

    overrides = {k: getattr(args, k) for k in ("model", "data", "format", "template", "system_prompt",
                                               "max_seq_length", "masking", "truncation")
                 if getattr(args, k, None) is not None}
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
    from sftlab.data.prepare import dump_rows, prepare, render_example, save_dataset
    from sftlab.io import write_jsonl

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
    p.add_argument("--format", dest="fmt", default=None, help="data format (default: detected)")
    p.add_argument("--max-seq-length", type=int, default=2048, help="token limit checked with --model (default 2048)")
    p.add_argument("--eval", dest="eval_data", default=None, help="eval data file to check for overlap with DATA")
    p.add_argument("--json", action="store_true", help="print findings and stats as JSON")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args) -> int:
    """Exit 0 when clean, 1 with only warnings, 2 with errors in the data."""
    from sftlab.data.doctor import run_doctor

    tokenizer = None
    if args.model:
        from sftlab.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    result = run_doctor(args.data, eval_data=args.eval_data, fmt=args.fmt, tokenizer=tokenizer,
                        template=args.template, max_seq_length=args.max_seq_length)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.format_text())
    return result.exit_code


@_command("train", "fine-tune: full, lora, qlora or prefix; writes a run folder")
def _add_train(p):
    _add_data_flags(p)
    p.add_argument("--eval-data", dest="eval_data", help="evaluation data")
    p.add_argument("--method", help="full, lora (default), qlora or prefix")
    p.add_argument("--output-dir", dest="output_dir", help="run folder (default runs/sft)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in the run folder")
    p.add_argument("--check", action="store_true", help="only run the configuration checklist and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from sftlab.config import config_help

    if args.help_config:
        print(config_help())
        return 0
    from sftlab.train.run import train

    cfg = _config_from_args(args)
    extra = {k: getattr(args, k) for k in ("eval_data", "method", "output_dir", "resume") if getattr(args, k) is not None}
    if extra:
        from sftlab.config import load_config, parse_set

        cfg = load_config(args.config, {**{k: v for k, v in cfg.to_dict().items()}, **extra, **parse_set(args.set)})
    summary = train(cfg, check_only=args.check, quiet=args.json)
    if args.json:
        _print_json(summary)
        return 0
    if args.check:
        return 2 if any(f["severity"] == "error" for f in summary["findings"]) else 0
    stopped = summary["stopped"]
    print(f"run folder: {cfg.output_dir}  ({stopped}; {summary['steps']} steps, {summary['time_s']:.0f}s, "
          f"{summary['tokens_per_second']:.0f} tok/s, peak {summary['peak_memory_mb']:.0f} MB)")
    if summary.get("final_eval_loss") is not None:
        print(f"final train loss {summary['final_train_loss']:.4f}, eval loss {summary['final_eval_loss']:.4f}")
    if stopped == "interrupted":
        print(f"interrupted: a checkpoint was saved; continue with: sftlab train ... --output-dir {cfg.output_dir} --resume")
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftlab", description="Supervised fine-tuning toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_fn(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except SftlabError as exc:
        print(f"sftlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"sftlab {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
