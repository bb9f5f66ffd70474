"""`sftlab prepare` and `sftlab doctor`: data in, tokens and findings out."""

from __future__ import annotations

import argparse
import sys

from sftlab.cli.base import (
    _add_data_flags,
    _command,
    _config_flag,
    _config_from_args,
    _print_json,
    _report_findings,
)
from sftlab.config import field_default
from sftlab.core.errors import SftlabError
from sftlab.core.io import check_output_dir, write_jsonl
from sftlab.data.mixture import source_paths


@_command("prepare", "tokenize conversations into training examples with exact response-only labels")
def _add_prepare(p):
    _add_data_flags(p)
    _config_flag(p, "reasoning")
    p.add_argument("--out", help="write the tokenized dataset (Arrow) and report to this folder")
    p.add_argument("--dump", metavar="FILE.jsonl", help="write one JSON object per example: input_ids, labels (-100 = masked)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N examples with trained tokens highlighted (reasoning marked within them)")
    p.add_argument("--json", action="store_true", help="print the preparation report as JSON")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    from sftlab.data.prepare import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        OUT_FILES,
        dump_rows,
        prepare,
        refuse_input_as_output,
        render_example,
        save_dataset,
        source_lines,
    )
    from sftlab.data.turns import reasoning_lost_warning  # deferred: with prepare

    if args.show < 0:  # a slice [:-2] would show every example but the last two
        raise SftlabError(f"--show {args.show}: must be a count of examples, 0 or more", hint="e.g. --show 3")
    cfg = _config_from_args(args)
    if args.dump:  # before any reading or writing
        refuse_input_as_output(cfg, args.dump, "--dump", config_file=args.config)
    if args.out:  # a refused --out must not leave the --dump file written
        check_output_dir(args.out, OUT_FILES)
    prepared = prepare(cfg)
    if args.dump:
        write_jsonl(args.dump, dump_rows(prepared))
    if args.out:
        save_dataset(prepared, args.out)
    lost = reasoning_lost_warning(prepared.report.n_reasoning_lost, cfg.reasoning, cfg.masking)
    if args.json:
        _print_json({"report": prepared.report.to_dict(), "template": prepared.template.name if prepared.template else None,
                     "added_tokens": prepared.added_tokens, "warnings": [f"{lost[0]}; {lost[1]}"] if lost else []})
        return 0
    for ex in prepared.examples[: args.show]:
        turn = f", assistant turn {ex.turn} (one example per turn)" if ex.turn else ""  # one of a split chat's examples
        print(f"--- example {ex.index + 1} ({ex.where}){turn}: {len(ex.input_ids)} tokens, {ex.n_trained} trained")
        print(render_example(prepared.tokenizer, ex))
    r = prepared.report
    tpl = prepared.template.name if prepared.template else "none (plain text)"
    print(f"prepared {', '.join(source_paths(cfg.data))}: {r.summary()}; template: {tpl}")
    if r.sources:
        print("per source:\n" + "\n".join(source_lines(r)))
    print(r.rule())
    if lost:
        print(f"warning: {lost[0]}; {lost[1]}")
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


@_command("doctor", "check data as a run would train it: parsing, roles, encoding, special tokens, lengths, "
                   "trained tokens, duplicates, eval overlap")
def _add_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="*", metavar="DATA|RUN.yaml",
                   help="data file (.jsonl/.json/.csv/.parquet) or local dataset folder; several: each is checked and "
                        "reported as one source of a mixture. Or a training config (.yaml): check its data (sources, "
                        "weights, format, system prompt) as that run trains it, with its model, template, "
                        "max_seq_length, truncation, masking and reasoning")
    p.add_argument("--config", default=None, metavar="RUN.yaml",
                   help="training config whose settings the check uses (as a .yaml DATA does); DATA given too "
                        "replaces its data; the flags below override it")
    p.add_argument("--model", default=None,
                   help="tokenizer to count tokens with (local folder, hub id or smollm2-135m-instruct); "
                        "enables the length, no-trained-token and trained-token checks")
    p.add_argument("--template", default=None, help="chat template: a built-in name, 'tokenizer' or a .jinja file")
    _config_flag(p, "format", dest="fmt")
    _config_flag(p, "max_seq_length", help_text="token limit checked (without --model: by the default model's tokenizer)")
    _config_flag(p, "truncation", help_text="what training does with longer examples; the report says what each one loses")
    _config_flag(p, "masking", help_text="which tokens training trains (counted as prepare labels them)")
    _config_flag(p, "reasoning", help_text="what training does with reasoning (<think>) turns (counted as prepare labels them)")
    p.add_argument("--eval", dest="eval_data", default=None, help="eval data file to check for overlap with DATA")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key of the training config (as prepare and train take it)")
    p.add_argument("--json", action="store_true", help="print findings and stats as JSON")
    p.set_defaults(func=_cmd_doctor)


def _doctor_inputs(args) -> tuple[str | None, list[str]]:
    """(the training config, the data paths) from DATA and --config: a .yaml/.yml DATA is the config."""
    configs = [d for d in args.data if d.lower().endswith((".yaml", ".yml"))]
    data = [d for d in args.data if d not in configs]
    if args.config:
        configs.insert(0, args.config)
    if len(configs) > 1:
        raise SftlabError(f"several training configs given ({', '.join(configs)})", hint="check one run's config at a time")
    if not configs and not data:
        raise SftlabError("no data to check", hint="sftlab doctor DATA.jsonl, or sftlab doctor RUN.yaml")
    return (configs[0] if configs else None), data


def _cmd_doctor(args) -> int:
    """Exit 0 when clean, 1 with only warnings, 2 with errors in the data."""
    from sftlab.config import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        load_config,
        parse_set,
    )
    from sftlab.data.doctor import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        run_doctor,
        run_doctor_config,
    )
    from sftlab.models import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        DEFAULT_MODEL,
        load_tokenizer,
    )

    config, data = _doctor_inputs(args)
    flags = {"model": args.model, "template": args.template, "format": args.fmt, "max_seq_length": args.max_seq_length,
             "truncation": args.truncation, "masking": args.masking, "reasoning": args.reasoning}
    flags = {k: v for k, v in flags.items() if v is not None}
    if config:  # the run's own settings, as `sftlab prepare RUN.yaml` reads them; flags and DATA override them
        cfg = load_config(config, {**flags, **({"data": data[0] if len(data) == 1 else data} if data else {}),
                                   **parse_set(args.set)})
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        return _report_findings(run_doctor_config(cfg, tokenizer, eval_data=args.eval_data), args.json)
    if args.set:
        raise SftlabError("--set overrides a training config, and none is given",
                          hint="pass the run's config: sftlab doctor RUN.yaml --set KEY=VALUE (or use the flags)")
    tokenizer = length_tok = None
    if args.model:
        tokenizer = load_tokenizer(args.model)
    else:  # lengths still mean tokens: measured with the default model's tokenizer (the report says so)
        try:
            length_tok = load_tokenizer(DEFAULT_MODEL)
        except SftlabError as exc:
            print(f"note: no --model and the default tokenizer is unavailable ({exc}); lengths are characters",
                  file=sys.stderr)
    result = run_doctor(data[0] if len(data) == 1 else data, eval_data=args.eval_data, fmt=args.fmt, tokenizer=tokenizer,
                        template=args.template, length_tokenizer=length_tok, length_tokenizer_name=DEFAULT_MODEL,
                        max_seq_length=flags.get("max_seq_length", field_default("max_seq_length")),
                        truncation=flags.get("truncation", field_default("truncation")),
                        masking=flags.get("masking", field_default("masking")),
                        reasoning=flags.get("reasoning", field_default("reasoning")))
    return _report_findings(result, args.json)
