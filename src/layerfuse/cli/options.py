"""The options that several commands share, each defined once, their argument types, and `fusion_options`.

Options left out stay None, so that the library's own defaults apply and a run can tell a fusion
from none; `fusion_options` reads back the fusion that a command line names.

>>> parser = argparse.ArgumentParser()
>>> add_fusion_options(parser)
>>> fusion_options(parser.parse_args(["--layer", "3", "--method", "scale", "--alpha", "2"]))
{'layer': 3, 'method': 'scale', 'arguments': {'alpha': 2.0}}
"""

from __future__ import annotations

import argparse
from typing import Any

from ..compare import DEFAULT_TEXTS
from ..info import read_info
from ..positions import NAMED, PositionsLike

LAYER_HELP = "hidden_states index to fuse at (default: the middle block)"
POSITIONS_HELP = "all (default), tokens, first, last, or comma-separated token indices such as 0,-1"


def positions_argument(text: str) -> PositionsLike:
    """`all`, `tokens`, `first`, `last`, or comma-separated token indices such as `0,-1`.

    >>> positions_argument("last"), positions_argument("0,-1")
    ('last', [0, -1])
    """
    if text in NAMED:
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of {', '.join(NAMED)} nor comma-separated token indices"
        ) from None


def shapes_argument(text: str) -> tuple[tuple[int, int], ...]:
    """Comma-separated batch x tokens shapes such as `1x8,8x64`.

    >>> shapes_argument("1x8,8x64")
    ((1, 8), (8, 64))
    """
    try:
        shapes = tuple((int(b), int(t)) for b, t in (part.lower().split("x") for part in text.split(",")))
    except ValueError:
        shapes = ()
    if not shapes or min(min(shape) for shape in shapes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated BATCHxTOKENS shapes such as 1x8,8x64")
    return shapes


def counts_argument(text: str) -> tuple[int, ...]:
    """Comma-separated positive ints such as `1,2`.

    >>> counts_argument("1,2")
    (1, 2)
    """
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated positive ints such as 1,2")
    return counts


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model: the model to load."""
    parser.add_argument("--model", help="hub name or local folder (default: the embedded MiniLM BERT)")


def add_layer_option(parser: argparse.ArgumentParser, help: str = LAYER_HELP) -> None:
    """--layer: the hidden_states index to fuse at."""
    parser.add_argument("--layer", type=int, metavar="K", help=help)


def add_method_option(
    parser: argparse.ArgumentParser, help: str = "integration method (see 'layerfuse methods'; default: addition)"
) -> None:
    """--method: a registered method's name or alias."""
    parser.add_argument("--method", metavar="NAME", help=help)


def add_fusion_options(
    parser: argparse.ArgumentParser,
    *,
    layer: str = LAYER_HELP,
    info: str | None = None,
    positions: str = POSITIONS_HELP,
    approach: bool = False,
) -> None:
    """--layer, --method and its arguments, --info (where `info` gives its help), --positions, and --approach.

    `layer` and `positions` replace the help of those options; `fusion_options` reads them all back.
    """
    add_layer_option(parser, layer)
    add_method_option(parser)
    parser.add_argument("--alpha", type=float, help="the method's alpha (addition, scale, interpolate)")
    parser.add_argument("--value", type=float, help="the method's value (clamp)")
    if info is not None:
        parser.add_argument("--info", metavar="FILE", help=info)
    if approach:
        parser.add_argument("--approach", help="hook (default, or the saved fusion's) or layer")
    parser.add_argument("--positions", type=positions_argument, help=positions)


def fusion_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fusion options given on the command line, as keywords: layer, method, arguments, info, approach, positions.

    The one place that gathers a command's fusion: only options given are present, `arguments` is
    the method's (a dict) and `info` the tensor read from its file.
    """
    arguments = {key: getattr(args, key) for key in ("alpha", "value") if getattr(args, key) is not None}
    options = {
        "layer": args.layer,
        "method": args.method,
        "arguments": arguments or None,
        "info": read_info(args.info) if getattr(args, "info", None) else None,
        "approach": getattr(args, "approach", None),
        "positions": args.positions,
    }
    return {key: value for key, value in options.items() if value is not None}


def add_texts_option(parser: argparse.ArgumentParser) -> None:
    """--text, repeatable: the texts of the batch."""
    parser.add_argument(
        "--text", action="append", dest="texts", metavar="TEXT",
        help=f"a text of the batch; repeat for more (default: {len(DEFAULT_TEXTS)} texts of different lengths)",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """--json: JSON only on stdout."""
    parser.add_argument("--json", action="store_true", help="print only JSON on stdout")
