"""`layerfuse inspect`: a model's blocks, hidden size and the module each site resolves to, layer by layer.

Named for what it inspects, so that it reads apart from the standard library's `inspect`.
"""

from __future__ import annotations

import argparse

from torch import nn

from ..models import load_model
from ..sites import find_blocks, site_table
from .options import add_model_option


def inspect_report(model: nn.Module) -> str:
    """The model's blocks, hidden size and, for each layer, the module each site resolves to."""
    blocks = find_blocks(model)
    rows = site_table(model)
    widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in rows[0]}
    lines = [
        (
            f"{type(model).__name__} (model_type {model.config.model_type}), "
            f"hidden size {model.config.hidden_size}, {len(blocks)} blocks: {blocks[0].name} .. {blocks[-1].name}"
        ),
        "layer=k is hidden_states[k]; sites: output (default), input, attention, mlp, embeddings (= layer 0),",
        "or any module by its dotted name. Both approaches (hook, layer) apply at every site.",
        "",
        "  ".join(key.ljust(width) for key, width in widths.items()).rstrip(),
    ]
    lines += ["  ".join(row[key].ljust(width) for key, width in widths.items()).rstrip() for row in rows]
    return "\n".join(lines)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `inspect` command's parser."""
    parser = commands.add_parser(
        "inspect",
        help="show the layers and sites of a model that layer= and site= can name",
        description="Print the model's block list, hidden size, and for each layer the module that each "
        "site (output, input, attention, mlp) resolves to.",
    )
    add_model_option(parser)
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    """Load the model and print its report."""
    model, _ = load_model(args.model)
    print(inspect_report(model))
    return 0
