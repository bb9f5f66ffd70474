"""What every command shares: the command registry, config-derived flags, JSON output, findings."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import typing

from sftlab.config import FIELDS, field_choices, field_default, field_types
from sftlab.core.findings import Finding
from sftlab.core.io import json_safe

_json_stdout = None  # the real stdout while a --json command runs; everything else is sent to stderr


def json_text(obj) -> str:
    """``obj`` as strict JSON text (what --json prints and eval --out writes)."""
    return json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False)


def _print_json(obj) -> None:
    print(json_text(obj), file=_json_stdout or sys.stdout)


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
        field_types,
        load_config,
        parse_set,
    )

    overrides = {k: getattr(args, k) for k in args.config_keys if getattr(args, k, None) is not None}
    # a flag of a key that takes a list (--data "[a.jsonl, {path: b.jsonl, weight: 1}]") reads it as --set does
    overrides.update(parse_set([f"{k}={v}" for k, v in overrides.items() if isinstance(v, str) and list in field_types(k)]))
    overrides.update(parse_set(args.set))
    return load_config(args.config, overrides)


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
