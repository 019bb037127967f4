"""`layerfuse bench`: plain against fused forwards over a grid of shapes and threads, per call, peak memory, a plot.

Only this command's function imports the bench module, so the help names the grid's default shapes and
threads without their values, which live beside `bench()` alone; the report lists the ones it ran.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..paths import check_writable
from .options import (
    add_json_option,
    add_layer_option,
    add_method_option,
    add_model_option,
    counts_argument,
    shapes_argument,
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `bench` command's parser."""
    parser = commands.add_parser(
        "bench",
        help="time plain against fused forwards over a grid of shapes and threads; peak memory; a plot",
        description="Time the plain forward, the hook and the custom layer, interleaved forward by forward "
        "after warm-up rounds, at every batch x tokens shape and thread count; every fixed method end to end "
        "at the smallest shape and alone at every shape; per call, a fusion made and removed around every forward "
        "at batch 1, and fuse() + remove() alone; the peak memory of one forward per variant in fresh "
        "processes. Prints medians, interquartile ranges and ratios to the plain forward; progress goes to "
        "stderr. The default grid takes about 4.5 minutes on 2 cores.",
    )
    add_model_option(parser)
    add_layer_option(parser)
    add_method_option(parser, help="the grid's fixed method (default: addition)")
    parser.add_argument(
        "--shapes",
        type=shapes_argument,
        metavar="BxT,...",
        help="batch x tokens shapes (default: the standard grid's, which the report lists)",
    )
    parser.add_argument(
        "--threads",
        type=counts_argument,
        metavar="N,...",
        help="CPU thread counts (default: the standard grid's)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="timed forwards per variant at every shape and per call (default: by shape, 80 down to 6; 200 per call)",
    )
    parser.add_argument("--no-per-call", action="store_true", help="skip the per-call protocol")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(fullgraph=True) plain against fused forwards (adds about a minute of compiling)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    parser.add_argument("--plot", metavar="PNG", help="write a plot of the ratios to this PNG (needs layerfuse[bench])")
    add_json_option(parser)
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the grid, write the plot if asked, print the report."""
    from ..lab.bench import bench, plot, require_matplotlib

    if args.plot:
        require_matplotlib()
        check_writable(args.plot, "the plot")
    grid = {name: getattr(args, name) for name in ("method", "shapes", "threads") if getattr(args, name) is not None}
    report = bench(
        args.model,
        layer=args.layer,
        rounds=args.rounds,
        memory=not args.no_memory,
        per_call=not args.no_per_call,
        compiled=args.compile,
        device=args.device,
        dtype=args.dtype,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        **grid,
    )
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0
