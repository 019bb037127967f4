"""`layerfuse compare`: the plain forward, the hook and the custom layer on one padded batch; agreement and timings."""

from __future__ import annotations

import argparse
import json

from ..lab.compare import compare
from ..models import DEFAULT_TEXTS
from .options import (
    add_fusion_options,
    add_json_option,
    add_model_option,
    add_texts_option,
    fusion_options,
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `compare` command's parser."""
    parser = commands.add_parser(
        "compare",
        help="fuse by hook and by custom layer on one padded batch; check they agree and time them",
        description="Run the plain forward, the hook and the custom layer on the same padded batch, "
        "report whether the approaches agree (exit code 1 if not), how much the fusion changed the "
        "output, and median forward times against the plain forward.",
    )
    add_model_option(parser)
    add_fusion_options(
        parser,
        info="info tensor from a .npy, .pt or .safetensors file (default: seeded random of the method's shape)",
    )
    add_texts_option(parser)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timed runs per variant (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random info (default: 0)")
    add_json_option(parser)
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    """Compare, print the report; exit code 1 if the approaches disagree."""
    fusion = fusion_options(args, passed_to=(compare,))
    arguments = fusion.pop("arguments", {})
    result = compare(
        args.model, **fusion, texts=args.texts or DEFAULT_TEXTS, repeats=args.repeats, seed=args.seed, **arguments
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0 if result.identical else 1
