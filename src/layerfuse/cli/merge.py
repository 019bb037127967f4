"""`layerfuse merge`: fold saved fusions into a model's weights and write a model folder that runs without layerfuse."""

from __future__ import annotations

import argparse

from ..exporting import export_merged
from .options import add_model_option


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `merge` command's parser."""
    parser = commands.add_parser(
        "merge",
        help="merge saved fusions into the weights and write a plain model folder",
        description="Fold each saved fusion (fixed, affine, the same for every example and position) into "
        "the parameters of the operation that produces its layer, in order, and write a model folder "
        "(safetensors, the tokenizer, the other modules of a sentence-transformers model) that loads "
        "with plain transformers. Exit code 2 where a fusion cannot merge.",
    )
    add_model_option(parser)
    parser.add_argument(
        "--fusion",
        action="append",
        required=True,
        metavar="DIR",
        help="a saved fusion folder (repeat to merge several)",
    )
    parser.add_argument("--output", required=True, metavar="OUT", help="the model folder to write (new or empty)")
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    """Merge and write the folder; print where."""
    path = export_merged(args.model, args.fusion, args.output)
    print(f"wrote {path}: {len(args.fusion)} fusion(s) merged")
    return 0
