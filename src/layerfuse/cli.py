"""The `layerfuse` command: parses, calls the library, prints.

    layerfuse compare --layer 3 --method multiplication --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from transformers.utils import logging as transformers_logging

from .compare import DEFAULT_TEXTS, compare
from .errors import LayerfuseError
from .methods import method_names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerfuse",
        description="Fuse extra information into a chosen layer of a transformer.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmp = commands.add_parser(
        "compare",
        help="fuse by hook and by custom layer on one padded batch; check they agree and time them",
        description="Run the plain forward, the hook and the custom layer on the same padded batch, "
        "report whether the approaches agree (exit code 1 if not), how much the fusion changed the "
        "output, and median forward times against the plain forward.",
    )
    cmp.add_argument("--model", default=None, help="hub name or local folder (default: the embedded MiniLM BERT)")
    cmp.add_argument("--layer", type=int, default=None, help="hidden_states index to fuse at (default: the middle block)")
    cmp.add_argument("--method", default="addition", help=f"integration method: {', '.join(method_names())}")
    cmp.add_argument(
        "--text", action="append", dest="texts", metavar="TEXT",
        help="a text of the batch; repeat for more (default: %d texts of different lengths)" % len(DEFAULT_TEXTS),
    )
    cmp.add_argument("--repeats", type=int, default=20, help="interleaved timed runs per variant (default: 20)")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the random info vector (default: 0)")
    cmp.add_argument("--json", action="store_true", help="print only JSON on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 approaches disagree, 2 bad input)."""
    args = _parser().parse_args(argv)
    transformers_logging.disable_progress_bar()
    try:
        result = compare(
            args.model,
            layer=args.layer,
            method=args.method,
            texts=args.texts or DEFAULT_TEXTS,
            repeats=args.repeats,
            seed=args.seed,
        )
    except LayerfuseError as error:
        print(f"layerfuse {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0 if result.identical else 1


if __name__ == "__main__":
    sys.exit(main())
