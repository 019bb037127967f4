"""The options that several commands share, each defined once, their argument types, and `fusion_options`.

Options left out stay None, so that the library's own defaults apply and a run can tell a fusion
from none; `fusion_options` reads back the fusion that a command line names. A method's arguments
are `--arg NAME=VALUE`, with `--alpha` and `--value` as shortcuts for the commonest two.

>>> parser = argparse.ArgumentParser()
>>> add_fusion_options(parser)
>>> fusion_options(parser.parse_args(["--layer", "3", "--method", "gate", "--arg", "beta=0.5"]))
{'layer': 3, 'method': 'gate', 'arguments': {'beta': 0.5}}
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ArgumentValueError
from ..fusion import fuse
from ..info import read_info
from ..methods import make_method
from ..models import DEFAULT_TEXTS
from ..positions import NAMED, PositionsLike

LAYER_HELP = "hidden_states index to fuse at (default: the middle block)"
METHOD_HELP = "integration method (see 'layerfuse methods'; default: addition)"
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


def method_value(text: str) -> int | float | bool | str:
    """A method argument's value: an int, else a float, else true or false, else the text itself.

    >>> [method_value(text) for text in ("2", "1e-3", "true", "False", "mean")]
    [2, 0.001, True, False, 'mean']
    """
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_argument(text: str) -> tuple[str, int | float | bool | str]:
    """`NAME=VALUE` as the name and `method_value(VALUE)`.

    >>> method_argument("heads=2")
    ('heads', 2)
    """
    name, equals, value = text.partition("=")
    if not equals or not name.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=VALUE with NAME a method's argument, such as beta=0.5 "
            "(see 'layerfuse methods' for each method's arguments)"
        )
    return name, method_value(value)


class MethodArguments(argparse.Action):
    """Gathers `--arg NAME=VALUE` and its shortcuts (`--alpha`, `--value`) into one dict, each name once."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.name = name

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        name, value = values if self.name is None else (self.name, values)
        given = getattr(namespace, self.dest) or {}
        if name in given:
            raise argparse.ArgumentError(
                self, f"method argument {name!r} is given twice ({given[name]!r}, then {value!r}): give it once"
            )
        setattr(namespace, self.dest, {**given, name: value})


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model: the model to load."""
    parser.add_argument("--model", help="hub name or local folder (default: the embedded MiniLM BERT)")


def add_layer_option(parser: argparse.ArgumentParser, help: str = LAYER_HELP, type: Callable[[str], Any] = int) -> None:
    """--layer: the hidden_states index to fuse at (`type` parses it)."""
    parser.add_argument("--layer", type=type, metavar="K", help=help)


def add_method_option(parser: argparse.ArgumentParser, help: str = METHOD_HELP) -> None:
    """--method: a registered method's name or alias."""
    parser.add_argument("--method", metavar="NAME", help=help)


def add_fusion_options(
    parser: argparse.ArgumentParser,
    *,
    layer: str = LAYER_HELP,
    layer_type: Callable[[str], Any] = int,
    info: str | None = None,
    positions: str = POSITIONS_HELP,
    approach: bool = False,
) -> None:
    """--layer, --method and its arguments, --info (where `info` gives its help), --positions, and --approach.

    `layer` and `positions` replace the help of those options, `layer_type` parses --layer;
    `fusion_options` reads them all back.
    """
    add_layer_option(parser, layer, layer_type)
    add_method_option(parser)
    parser.add_argument(
        "--arg",
        action=MethodArguments,
        type=method_argument,
        dest="arguments",
        metavar="NAME=VALUE",
        help="an argument of the method, such as beta=0.5 or heads=2; repeat for more (see 'layerfuse methods'). "
        "Values are ints, floats, true or false, else text",
    )
    for name, methods in (("alpha", "addition, scale, interpolate"), ("value", "clamp")):
        parser.add_argument(
            f"--{name}",
            action=MethodArguments,
            name=name,
            type=method_value,
            dest="arguments",
            metavar=name.upper(),
            help=f"the method's {name} ({methods}), the same as --arg {name}={name.upper()}",
        )
    if info is not None:
        parser.add_argument("--info", metavar="FILE", help=info)
    if approach:
        parser.add_argument("--approach", help="hook (default, or the saved fusion's) or layer")
    parser.add_argument("--positions", type=positions_argument, help=positions)


def fusion_options(args: argparse.Namespace, *, passed_to: Sequence[Callable[..., Any]] = ()) -> dict[str, Any]:
    """The fusion options given on the command line, as keywords: layer, method, arguments, info, approach, positions.

    The one place that gathers a command's fusion: only options given are present, `arguments` is
    the method's (a dict) and `info` the tensor read from its file. The method's arguments reach it
    as keywords of `fuse` and of the `passed_to` functions, so none may share a name with theirs.
    """
    _refuse_taken_names(args.arguments or {}, (*passed_to, fuse, make_method))
    options = {
        "layer": args.layer,
        "method": args.method,
        "arguments": args.arguments,
        "info": read_info(args.info) if getattr(args, "info", None) else None,
        "approach": getattr(args, "approach", None),
        "positions": args.positions,
    }
    return {key: value for key, value in options.items() if value is not None}


def _refuse_taken_names(arguments: dict[str, Any], functions: Sequence[Callable[..., Any]]) -> None:
    """Refuse method arguments that `functions` would take as their own keywords instead of the method's."""
    taken = {
        name: function.__name__
        for function in reversed(functions)
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }
    clashes = sorted(name for name in arguments if name in taken)
    if clashes:
        name = clashes[0]
        raise ArgumentValueError(
            f"--arg {name}: {name!r} is a keyword of {taken[name]} itself, so it cannot reach the method; "
            "'layerfuse methods' lists each method's arguments and --help the command's options"
        )


def add_texts_option(parser: argparse.ArgumentParser) -> None:
    """--text, repeatable: the texts of the batch."""
    parser.add_argument(
        "--text",
        action="append",
        dest="texts",
        metavar="TEXT",
        help=f"a text of the batch; repeat for more (default: {len(DEFAULT_TEXTS)} texts of different lengths)",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """--json: JSON only on stdout."""
    parser.add_argument("--json", action="store_true", help="print only JSON on stdout")
