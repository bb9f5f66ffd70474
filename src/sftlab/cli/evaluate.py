"""`sftlab eval`, `diagnose` and `report`: how a run did."""

from __future__ import annotations

import argparse

from sftlab.cli.base import (
    _command,
    _config_flag,
    _print_json,
    _report_findings,
    json_text,
)
from sftlab.core.errors import SftlabError
from sftlab.core.io import atomic_write_text


@_command("eval", "evaluate a run or model: loss, perplexity, generation metrics, task score; --compare for before/after")
def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN_OR_MODEL", help="a run folder, an export (merged or adapter), or a model (local folder, .gguf, hub id, smollm2-135m-instruct)")
    p.add_argument("--data", required=True, action="append",
                   help="eval data file (same formats as training data); repeat it for results per source")
    p.add_argument("--compare", dest="compare_to", metavar="BASE",
                   help="also score BASE on the same data and print both with the difference; 'base' = the base model of the run or export")
    p.add_argument("--general", help="general data for the forgetting check (default: the run's replay_data)")
    _config_flag(p, "format", dest="fmt")
    p.add_argument("--template", help="chat template (default: the run's training template, or the tokenizer's own)")
    p.add_argument("--system", dest="system_prompt",
                   help="system prompt for conversations without one (default: the run's system_prompt; '' for none)")
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
    from sftlab.eval import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        GenerationSettings,
        attach_to_run,
        format_eval,
        run_eval,
    )

    if not 0 < args.threshold < 10:
        raise SftlabError(f"--forgetting-threshold {args.threshold:g}: the general-data loss rise that counts as "
                          "forgetting must be above 0 (0.10 is a 10% rise)", hint="e.g. --forgetting-threshold 0.1")
    unused = [f"{flag} {v:g}" for flag, v in (("--temperature", args.temperature), ("--top-p", args.top_p)) if v != 1.0]
    if unused and not args.do_sample:  # greedy: they were stored in the result's settings as if used
        raise SftlabError(f"{' and '.join(unused)} without --do-sample: replies are greedy and the setting is unused",
                          hint="add --do-sample to sample, or drop it")
    if args.samples < 0:  # a negative count sliced the samples from the end: all but the last few
        raise SftlabError(f"--samples {args.samples} must be 0 or more (sample generations kept in the result)")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.save:
        from sftlab.rundir import (
            RunDir,  # deferred: the command pulls in torch; `sftlab --help` stays fast
        )

        if not RunDir(args.target).config_path.is_file():  # an export or a model: no summary.json to store it in
            raise SftlabError(f"--save stores the result in a run folder's summary.json, and {args.target} is not a "
                              "run folder (no config.yaml)", hint="eval the run folder, or write the result with --out FILE.json")
        RunDir(args.target).summary()  # --save needs a finished run: fail before evaluating
    from sftlab.eval.run import (
        format_sources,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    data = args.data[0] if len(args.data) == 1 else args.data
    out = run_eval(args.target, data, compare_to=args.compare_to, general=args.general, fmt=args.fmt,
                   template=args.template, scorer=args.scorer, settings=settings, batch_size=args.batch_size,
                   max_seq_length=args.max_seq_length, samples=args.samples, threshold=args.threshold, device=args.device,
                   limit=args.limit, system_prompt=args.system_prompt)
    if args.out:
        atomic_write_text(args.out, json_text(out))
    if args.save:
        attach_to_run(args.target, out)
    if args.json:
        _print_json(out)
    else:
        print(format_eval(out))
        if format_sources(out):
            print(format_sources(out))
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
