"""`layerfuse COMMAND ...`: the parser, built from one module per command, and the dispatch.

Bad input that the library refuses (a `LayerfuseError`) exits with code 2 and its message, no traceback;
an interrupt (Ctrl-C) with code 130 and one line, which a command may complete with what to do next.

>>> parser().parse_args(["compare", "--layer", "3", "--positions", "0,-1"]).positions
[0, -1]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformers.utils import logging as transformers_logging

from ..errors import LayerfuseError
from . import bench, compare, derive, inspect_model, merge, methods, run, sweep

COMMANDS = (methods, inspect_model, compare, derive, run, bench, sweep, merge)


def parser() -> argparse.ArgumentParser:
    """The `layerfuse` parser: each module of `COMMANDS` adds its command and the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="layerfuse",
        description="Fuse extra information into a chosen layer of a transformer.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 approaches disagree, 2 bad input)."""
    args = parser().parse_args(argv)
    transformers_logging.disable_progress_bar()
    try:
        return args.execute(args)
    except LayerfuseError as error:
        print(f"layerfuse {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", None)
        print(f"layerfuse {args.command}: interrupted{'' if hint is None else '; ' + hint(args)}", file=sys.stderr)
        return 130
