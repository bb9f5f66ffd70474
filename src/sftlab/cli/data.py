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
    if args.json:
        _print_json({"report": prepared.report.to_dict(), "template": prepared.template.name if prepared.template else None,
                     "added_tokens": prepared.added_tokens})
        return 0
    for ex in prepared.examples[: args.show]:
        print(f"--- example {ex.index + 1} ({ex.where}): {len(ex.input_ids)} tokens, {ex.n_trained} trained")
        print(render_example(prepared.tokenizer, ex))
    r = prepared.report
    tpl = prepared.template.name if prepared.template else "none (plain text)"
    print(f"prepared {', '.join(source_paths(cfg.data))}: {r.summary()}; template: {tpl}")
    if r.sources:
        print("per source:\n" + "\n".join(source_lines(r)))
    print(r.rule())
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
    p.add_argument("data", nargs="+", help="data file (.jsonl/.json/.csv/.parquet) or local dataset folder; "
                                           "several: each is checked and reported as one source of a mixture")
    p.add_argument("--model", default=None,
                   help="tokenizer to count tokens with (local folder, hub id or smollm2-135m-instruct); "
                        "enables the length, no-trained-token and trained-token checks")
    p.add_argument("--template", default=None, help="chat template: a built-in name, 'tokenizer' or a .jinja file")
    _config_flag(p, "format", dest="fmt")
    _config_flag(p, "max_seq_length", default=field_default("max_seq_length"),
                 help_text="token limit checked (without --model: by the default model's tokenizer)")
    _config_flag(p, "truncation", default=field_default("truncation"),
                 help_text="what training does with longer examples; the report says what each one loses")
    p.add_argument("--eval", dest="eval_data", default=None, help="eval data file to check for overlap with DATA")
    p.add_argument("--json", action="store_true", help="print findings and stats as JSON")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args) -> int:
    """Exit 0 when clean, 1 with only warnings, 2 with errors in the data."""
    from sftlab.data.doctor import (
        run_doctor,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.models import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        DEFAULT_MODEL,
        load_tokenizer,
    )

    tokenizer = length_tok = None
    if args.model:
        tokenizer = load_tokenizer(args.model)
    else:  # lengths still mean tokens: measured with the default model's tokenizer (the report says so)
        try:
            length_tok = load_tokenizer(DEFAULT_MODEL)
        except SftlabError as exc:
            print(f"note: no --model and the default tokenizer is unavailable ({exc}); lengths are characters",
                  file=sys.stderr)
    result = run_doctor(args.data[0] if len(args.data) == 1 else args.data, eval_data=args.eval_data, fmt=args.fmt, tokenizer=tokenizer,
                        template=args.template, max_seq_length=args.max_seq_length,
                        length_tokenizer=length_tok, length_tokenizer_name=DEFAULT_MODEL, truncation=args.truncation)
    return _report_findings(result, args.json)
