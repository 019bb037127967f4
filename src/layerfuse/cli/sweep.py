"""`layerfuse sweep`: the output for each of K infos fused at one layer, the layers before it run once."""

from __future__ import annotations

import argparse
import json

from ..info import read_info
from ..lab.sweep_report import check_outputs_path, sweep_report, write_outputs
from ..models import DEFAULT_TEXTS
from ..sweep import sweep
from .options import (
    add_fusion_options,
    add_json_option,
    add_model_option,
    add_texts_option,
    fusion_options,
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `sweep` command's parser."""
    parser = commands.add_parser(
        "sweep",
        help="the output for each of K infos fused at one layer, running the layers before it once",
        description="Fuse each of the K infos in FILE (a (K, ...) tensor) at --layer, on one padded batch of "
        "texts, running the embeddings and the blocks up to --layer once and the rest once per info, "
        "batched over infos. Prints how much each info changed the output; --output saves the outputs "
        "(K, B, T, H).",
    )
    parser.add_argument(
        "--infos", required=True, metavar="FILE", help="infos (K, ...) in a .npy, .pt or .safetensors file"
    )
    add_model_option(parser)
    add_fusion_options(parser)
    add_texts_option(parser)
    parser.add_argument(
        "--chunk-size", type=int, help="infos per pass (default: as many as fit in 2048 tokens on a CPU)"
    )
    parser.add_argument(
        "--output", "-o", metavar="FILE", help="save the outputs (K, B, T, H) to a .pt, .npy or .safetensors file"
    )
    add_json_option(parser)
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    """Sweep the infos, save the outputs if asked, print the report."""
    fusion = fusion_options(args, passed_to=(sweep_report, sweep))
    arguments = fusion.pop("arguments", {})
    if args.output:
        check_outputs_path(args.output)
    report, outputs = sweep_report(
        args.model,
        read_info(args.infos),
        **fusion,
        texts=args.texts or DEFAULT_TEXTS,
        chunk_size=args.chunk_size,
        **arguments,
    )
    if args.output:
        write_outputs(args.output, outputs)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0
