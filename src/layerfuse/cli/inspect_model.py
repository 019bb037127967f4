"""`layerfuse inspect`: a model's stacks, hidden size and the module each site resolves to, layer by layer.

Named for what it inspects, so that it reads apart from the standard library's `inspect`. It prints
what `layerfuse.inspect(model)` returns.
"""

from __future__ import annotations

import argparse

from ..models import load_model
from ..sites import inspect
from .options import add_model_option


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `inspect` command's parser."""
    parser = commands.add_parser(
        "inspect",
        help="show the layers and sites of a model that layer=, site= and stack= can name",
        description="Print the model's stacks of blocks, hidden size, and for each layer the module that each "
        "site (output, input, attention, mlp) resolves to.",
    )
    add_model_option(parser)
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    """Load the model and print its sites."""
    model, _ = load_model(args.model)
    print(inspect(model))
    return 0
