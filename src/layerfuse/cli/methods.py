"""`layerfuse methods`: every registered method with its formula, the info it takes and its arguments.

>>> methods_table().split()[:4]
['method', 'formula', 'info', 'arguments']
"""

from __future__ import annotations

import argparse

from ..info import LAYOUTS
from ..methods import METHODS, method_names, method_parameters


def methods_table() -> str:
    """Every registered method: name and aliases, formula, info it takes, arguments."""
    aliases = dict(zip(METHODS, method_names()))
    rows = [("method", "formula", "info", "arguments")]
    for name, cls in METHODS.items():
        arguments = ", ".join(
            key if p.default is p.empty else f"{key}={p.default!r}" for key, p in method_parameters(cls).items()
        )
        kind = "learned; " if cls.learned else ""
        rows.append((aliases[name], cls.formula, LAYOUTS[cls.info_layout].shapes, kind + (arguments or "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows
    )


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `methods` command's parser."""
    parser = commands.add_parser(
        "methods",
        help="list the integration methods with their formulas and arguments",
        description="List every registered integration method: its formula, the info it takes and its arguments, "
        "which compare, run and sweep set with --arg NAME=VALUE.",
    )
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    """Print the table of methods."""
    print(methods_table())
    return 0
