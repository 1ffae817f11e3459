"""The ``gpt2`` command line: one subcommand per module in `gpt2.commands`.

A `UserError` anywhere below becomes one line on stderr and exit code 2; so does a bad option.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from tqdm.auto import tqdm

from gpt2.commands.options import finite_float
from gpt2.errors import UserError

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func``.
COMMAND_MODULES = (
    "gpt2.commands.prepare",
    "gpt2.commands.train",
    "gpt2.commands.sample",
    "gpt2.commands.presets",
    "gpt2.commands.serve",
    "gpt2.commands.chat",
    "gpt2.commands.export",
    "gpt2.commands.tokenizer",
    "gpt2.commands.eval",
    "gpt2.commands.plot",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is one ``--help`` away), and every
    ``type=float`` flag refuses NaN and infinity (see `gpt2.commands.options`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line and exit with status 2 ("argument --x: must be ..."
        from a typed value reads "--x must be ...")."""
        message = re.sub(r"^argument ([^:]+): must ", r"\1 must ", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _TqdmHandler(logging.Handler):
    """Log lines written through tqdm so that they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def build_parser() -> ArgumentParser:
    """The full parser: global options, then one subparser per module in `COMMAND_MODULES`."""
    parser = ArgumentParser(
        prog="gpt2",
        description="GPT-2 from scratch: prepare data, train, sample, chat, evaluate, export, serve.",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars; only warnings and errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _quiet_after_the_command(sub)
    return parser


def _quiet_after_the_command(sub: argparse._SubParsersAction) -> None:
    """``-q`` after the subcommand too (``gpt2 train -q``), at every level. Its default is
    "not given" (SUPPRESS), so that a subcommand without it keeps what ``gpt2 -q`` set."""
    for parser in sub.choices.values():
        if not any("-q" in a.option_strings for a in parser._actions):
            parser.add_argument(
                "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                help="no progress bars; only warnings and errors",
            )  # fmt: skip
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _quiet_after_the_command(action)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (2, its line already printed) or --help (0)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("gpt2")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
