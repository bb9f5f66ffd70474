"""`sftlab train`: one fine-tune (or its pre-flight check) from a config and flags."""

from __future__ import annotations

import contextlib
import shlex
import sys

from sftlab.cli.base import (
    _add_data_flags,
    _command,
    _config_flag,
    _config_from_args,
    _print_checks,
    _print_json,
)
from sftlab.core.errors import SftlabError


@_command("train", "fine-tune: full, lora, qlora or prefix; writes a run folder")
def _add_train(p):
    _add_data_flags(p)
    for key in ("eval_data", "method", "output_dir", "resume"):
        _config_flag(p, key)
    p.add_argument("--check", action="store_true", help="only run the configuration checklist and exit")
    p.add_argument("--find-lr", type=int, nargs="?", const=40, default=None, metavar="STEPS",
                   help="first a learning-rate range test (default 40 steps, the rate rising from 1/100 to 100x "
                        "learning_rate auto's), print its curve and train at its choice; with --check: only the test")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="run on N Ray Train workers (pip install 'sftlab[ray]'); a local Ray unless --ray-address")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="the Ray cluster to run on, e.g. ray://head:10001 (alone: 1 worker there)")
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


def _check_and_find_lr(cfg, steps: int, args) -> int:
    """`train --check --find-lr`: the checklist, then the range test's curve and choice; nothing trained."""
    from sftlab.plan.auto import (
        describe_precision,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.train.find_lr import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        describe_sweep,
        find_lr,
    )
    from sftlab.train.run import (
        train,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    with contextlib.redirect_stdout(sys.stderr):
        checked = train(cfg, check_only=True, quiet=True, notes={"plan_command": _plan_command(args)})
    _name_plan_command(checked, args)
    if checked.get("auto"):
        print(checked["auto"])
    print(describe_precision(checked["resolved"]["precision"], checked.get("precision_probe")))
    if checked.get("merge"):
        print(checked["merge"])
    rc = _print_checks(checked["findings"])
    if rc:
        return rc
    print(describe_sweep(find_lr(cfg, steps=steps)))
    return 0


def _plan_command(args) -> str:
    """The `sftlab plan` command of this command's config and overrides (as plan's --set): what the memory
    line and memory fixes of the checklist point to, in place of CONFIG, so that it runs as printed."""
    given = [f"{k}={v}" for k in args.config_keys if (v := getattr(args, k, None)) is not None]
    words = ([args.config] if args.config else []) + [w for item in given + list(args.set) for w in ("--set", item)]
    return " ".join(["sftlab plan", *map(shlex.quote, words)])


def _name_plan_command(summary: dict, args) -> None:
    """`train --check`'s memory line with :func:`_plan_command` in place of CONFIG (its findings are named
    by train itself, from ``notes``)."""
    from sftlab.train.checks import (
        PLAN_CONFIG,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    if summary.get("memory"):
        summary["memory"] = summary["memory"].replace(PLAN_CONFIG, _plan_command(args))


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
    if args.ray_workers is not None and args.ray_workers < 1:  # 0 read as "no Ray" and trained here without a word
        raise SftlabError(f"--ray-workers {args.ray_workers}: the number of Ray Train workers must be 1 or more",
                          hint="--ray-workers 2, or leave the flag out to train in this process")
    cfg = _config_from_args(args)
    if not cfg.data:  # before torch and transformers load (seconds): the same error prepare() gives
        raise SftlabError("no training data given", hint="pass --data FILE or set `data:` in the config")
    from sftlab.train.callbacks import (
        exit_code_for,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.train.run import (
        train,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    if args.find_lr is not None and (args.ray_workers or args.ray_address or args.json):
        raise SftlabError("--find-lr runs in this process and prints its curve: not with --ray-workers, "
                          "--ray-address or --json", hint="run `sftlab train --find-lr --check` first, then "
                          "train with --set learning_rate=<its choice>")
    if args.find_lr is not None and cfg.resume:
        raise SftlabError("--find-lr with --resume: a resumed run continues at its own learning rate",
                          hint="drop --find-lr to resume, or start a new run folder")
    try:
        if args.check and args.find_lr is not None:
            return _check_and_find_lr(cfg, args.find_lr, args)
        if args.find_lr is not None:
            from sftlab.train.find_lr import (
                train_with_found_lr,  # deferred: the command pulls in torch; `sftlab --help` stays fast
            )

            summary = train_with_found_lr(cfg, steps=args.find_lr)
        elif args.check:  # the checklist is printed here; anything the library prints goes to stderr
            with contextlib.redirect_stdout(sys.stderr):
                summary = train(cfg, check_only=True, quiet=True, notes={"plan_command": _plan_command(args)})
        elif args.ray_workers or args.ray_address:
            from sftlab.train.ray import (
                train_on_ray,  # deferred: the optional Ray extra
            )

            with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
                summary = train_on_ray(cfg, workers=args.ray_workers or 1, address=args.ray_address, quiet=args.json)
        else:
            summary = train(cfg, quiet=args.json, notes={"plan_command": _plan_command(args)})
    except BaseException:
        _close_process_group(wait=False)  # no barrier: the other processes may never reach it
        raise
    _close_process_group(wait=True)
    if args.check:
        _name_plan_command(summary, args)
    if args.json and args.check:
        _print_json(summary)
        return 2 if any(f["severity"] == "error" for f in summary["findings"]) else 0
    if args.json:
        _print_json(summary)
        return exit_code_for(summary.get("signal")) if summary.get("stopped") == "interrupted" else 0
    if args.check:
        from sftlab.plan.auto import (
            describe_precision,  # deferred: the command pulls in torch; `sftlab --help` stays fast
        )

        if summary.get("auto"):
            print(summary["auto"])
        print(describe_precision(summary["resolved"]["precision"], summary.get("precision_probe")))
        if summary.get("merge"):
            print(summary["merge"])
        if summary.get("memory"):
            print(summary["memory"])
        return _print_checks(summary["findings"])
    stopped = summary["stopped"]
    print(f"run folder: {cfg.output_dir}  ({stopped}; {summary['steps']} steps, {summary['time_s']:.0f}s, "
          f"{summary['tokens_per_second']:.0f} tok/s, peak {summary['peak_memory_mb']:.0f} MB)")
    if summary.get("final_eval_loss") is not None:
        print(f"final train loss {summary['final_train_loss']:.4f}, eval loss {summary['final_eval_loss']:.4f}")
    if stopped == "interrupted":
        by = f" by {summary['signal']}" if summary.get("signal") else ""
        print(f"interrupted{by}: a checkpoint was saved; continue with: sftlab train ... --output-dir {cfg.output_dir} --resume")
        return exit_code_for(summary.get("signal"))
    return 0
