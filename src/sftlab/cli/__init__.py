"""The `sftlab` command: parse arguments, call one library function per command, print.

No logic lives here. Commands live in one module per group (data, train, evaluate, ship, planning), shared helpers in
``base``. Each command has an ``_add_<cmd>`` function that declares its flags and a
``_cmd_<cmd>`` function that calls the library and prints. User mistakes arrive as SftlabError and
are printed as one line on stderr with a non-zero exit; nothing else is caught.

Flags that set a config key are declared by :func:`_config_flag` from the Config field (help, type,
allowed values), so they cannot drift from the config. With ``--json`` stdout is exactly one JSON
document: whatever else the command or a library prints goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings

from sftlab.cli import data, evaluate, planning, ship, train  # noqa: F401 - each registers its commands
from sftlab.cli.base import COMMANDS, _run
from sftlab.core.errors import SftlabError


class _CommandParser(argparse.ArgumentParser):
    """A command's parser whose positional of several values (doctor's DATA) mixes freely with options:
    plain argparse fills it only up to the first option, so `sftlab doctor RUN.yaml --max-seq-length 64
    a.jsonl` was refused ("unrecognized arguments: a.jsonl"). Such a command is parsed intermixed."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        several = any(a.nargs in ("*", "+") for a in self._get_positional_actions())
        if self._intermixing or not several:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftlab", description="Supervised fine-tuning toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
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


class Terminated(BaseException):
    """SIGTERM outside a training loop (which checkpoints instead): stop where we are, like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    # A job scheduler's SIGTERM while loading or preparing: one line and 143, not a silent kill. The
    # training loop installs its own handler (checkpoint, then stop) and restores this one after.
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        code = _run(args)
    except SftlabError as exc:
        print(f"sftlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"sftlab {args.command}: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Terminated:
        print(f"sftlab {args.command}: stopped by SIGTERM", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader of stdout left (`sftlab doctor data.jsonl | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing at exit
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)
    return int(code or 0)
