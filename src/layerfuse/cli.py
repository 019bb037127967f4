"""The `layerfuse` command: parses, calls the library, prints.

    layerfuse compare --layer 3 --method clamp --value 2 --positions tokens --json
    layerfuse methods
    layerfuse inspect
    layerfuse run corpus.jsonl --output embeddings.parquet --layer 3 --info steer.npy
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from torch import nn
from transformers.utils import logging as transformers_logging

from .config import FusionConfig
from .errors import ArgumentValueError, LayerfuseError
from .info import LAYOUTS, read_info
from .lab.bench import SHAPES, THREADS, bench, plot, require_matplotlib
from .lab.compare import compare
from .lab.sweep_report import sweep_report, write_outputs
from .methods import METHODS, method_names, method_parameters
from .models import DEFAULT_TEXTS, load_model
from .positions import NAMED, PositionsLike
from .run import ENGINES, POOLINGS, embed_corpus
from .saving import load_config
from .sites import find_blocks, site_table


def positions_argument(text: str) -> PositionsLike:
    """`all`, `tokens`, `first`, `last`, or comma-separated token indices such as `0,-1`."""
    if text in NAMED:
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of {', '.join(NAMED)} nor comma-separated token indices"
        ) from None


def shapes_argument(text: str) -> tuple[tuple[int, int], ...]:
    """Comma-separated batch x tokens shapes such as `1x8,8x64`."""
    try:
        shapes = tuple((int(b), int(t)) for b, t in (part.lower().split("x") for part in text.split(",")))
    except ValueError:
        shapes = ()
    if not shapes or min(min(shape) for shape in shapes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated BATCHxTOKENS shapes such as 1x8,8x64")
    return shapes


def counts_argument(text: str) -> tuple[int, ...]:
    """Comma-separated positive ints such as `1,2`."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated positive ints such as 1,2")
    return counts


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerfuse",
        description="Fuse extra information into a chosen layer of a transformer.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "methods",
        help="list the integration methods with their formulas and arguments",
        description="List every registered integration method: its formula, the info it takes and its arguments.",
    )
    inspect = commands.add_parser(
        "inspect",
        help="show the layers and sites of a model that layer= and site= can name",
        description="Print the model's block list, hidden size, and for each layer the module that each "
        "site (output, input, attention, mlp) resolves to.",
    )
    inspect.add_argument("--model", default=None, help="hub name or local folder (default: the embedded MiniLM BERT)")
    cmp = commands.add_parser(
        "compare",
        help="fuse by hook and by custom layer on one padded batch; check they agree and time them",
        description="Run the plain forward, the hook and the custom layer on the same padded batch, "
        "report whether the approaches agree (exit code 1 if not), how much the fusion changed the "
        "output, and median forward times against the plain forward.",
    )
    cmp.add_argument("--model", default=None, help="hub name or local folder (default: the embedded MiniLM BERT)")
    cmp.add_argument("--layer", type=int, default=None, help="hidden_states index to fuse at (default: the middle block)")
    cmp.add_argument("--method", default="addition", help="integration method (see 'layerfuse methods'; default: addition)")
    cmp.add_argument("--alpha", type=float, help="the method's alpha (addition, scale, interpolate)")
    cmp.add_argument("--value", type=float, help="the method's value (clamp)")
    cmp.add_argument(
        "--info", metavar="FILE",
        help="info tensor from a .npy, .pt or .safetensors file (default: seeded random of the method's shape)",
    )
    cmp.add_argument(
        "--positions", type=positions_argument, default="all",
        help="all (default), tokens, first, last, or comma-separated token indices such as 0,-1",
    )
    cmp.add_argument(
        "--text", action="append", dest="texts", metavar="TEXT",
        help="a text of the batch; repeat for more (default: %d texts of different lengths)" % len(DEFAULT_TEXTS),
    )
    cmp.add_argument("--repeats", type=int, default=20, help="interleaved timed runs per variant (default: 20)")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the random info (default: 0)")
    cmp.add_argument("--json", action="store_true", help="print only JSON on stdout")
    run = commands.add_parser(
        "run",
        help="embed every text of a corpus with the fused model: resumable, bad-row tolerant, locally or on Ray",
        description="Embed the texts of INPUT with the model fused by --layer (--method, --info, ...) or by "
        "--fusion DIR (neither: the plain model) into --output. Bad rows are skipped, counted and listed in a "
        "rejects file; a killed run carries on with --resume. Exit code 1 if some embeddings held NaN or "
        "infinity (they are rejected, not written), 2 for bad arguments.",
    )
    run.add_argument("input", metavar="INPUT", help=".txt (one text a line), .jsonl, .csv or .parquet")
    run.add_argument(
        "--output", "-o", required=True, metavar="OUT",
        help=".parquet (row, id, text, embedding), .npy or .safetensors; with --engine ray, a folder of Parquet files",
    )
    run.add_argument("--model", default=None, help="hub name or local folder (default: the embedded MiniLM BERT)")
    run.add_argument("--layer", type=int, metavar="K", help="hidden_states index to fuse at")
    run.add_argument("--method", help="integration method (see 'layerfuse methods'; default: addition)")
    run.add_argument("--alpha", type=float, help="the method's alpha (addition, scale, interpolate)")
    run.add_argument("--value", type=float, help="the method's value (clamp)")
    run.add_argument(
        "--info", metavar="FILE",
        help="info tensor from a .npy, .pt or .safetensors file: (D,) for every row, or (N, D) with one row per "
        "corpus row, bad rows included",
    )
    run.add_argument("--approach", help="hook (default, or the saved fusion's) or layer")
    run.add_argument("--positions", choices=NAMED, help="where to fuse: all (default), tokens, first, last")
    run.add_argument("--fusion", metavar="DIR", help="a saved fusion's folder, instead of --layer and --method")
    run.add_argument(
        "--text-column", metavar="NAME", help="the texts' column in .jsonl, .csv and .parquet input (default: text)"
    )
    run.add_argument("--id-column", metavar="NAME", help="a column carried to the output as id")
    run.add_argument("--include-text", action="store_true", help="write the texts to the Parquet output too")
    run.add_argument(
        "--pooling", choices=POOLINGS, default="mean",
        help="mean over real tokens (default), cls (first token), or none: every real token's state (Parquet only)",
    )
    run.add_argument(
        "--max-length", type=int, metavar="TOKENS", help="truncate to this many tokens (default: the model's limit)"
    )
    run.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per forward (default: 32)")
    run.add_argument(
        "--shard-size", type=int, default=4096, metavar="ROWS",
        help="rows per shard, the most a kill can lose (default: 4096)",
    )
    run.add_argument("--rejects", metavar="FILE", help="the bad rows' list (default: OUT's name with .rejects.jsonl)")
    run.add_argument("--overwrite", action="store_true", help="replace OUT and its rejects file if they exist")
    run.add_argument("--resume", action="store_true", help="carry on the interrupted run of the same job")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar (none either off a terminal)")
    run.add_argument(
        "--engine", choices=ENGINES, default="local", help="local (default) or ray (pip install 'layerfuse[ray]')"
    )
    run.add_argument(
        "--ray-address", metavar="ADDRESS", help="the Ray cluster to run on (default: a local Ray started for the job)"
    )
    run.add_argument(
        "--workers", type=int, metavar="N", help="Ray actors, one CPU each (default: every CPU of the cluster)"
    )
    bnc = commands.add_parser(
        "bench",
        help="time plain against fused forwards over a grid of shapes and threads; peak memory; a plot",
        description="Time the plain forward, the hook and the custom layer, interleaved forward by forward "
        "after warm-up rounds, at every batch x tokens shape and thread count; every fixed method end to end "
        "at the smallest shape and alone at every shape; the peak memory of one forward per variant in fresh "
        "processes. Prints medians, interquartile ranges and ratios to the plain forward. The default grid takes "
        "about 4.5 minutes on 2 cores.",
    )
    bnc.add_argument("--model", default=None, help="hub name or local folder (default: the embedded MiniLM BERT)")
    bnc.add_argument("--layer", type=int, default=None, help="hidden_states index to fuse at (default: the middle block)")
    bnc.add_argument("--method", default="addition", help="the grid's fixed method (default: addition)")
    bnc.add_argument(
        "--shapes", type=shapes_argument, default=SHAPES, metavar="BxT,...",
        help="batch x tokens shapes (default: %s)" % ",".join(f"{b}x{t}" for b, t in SHAPES),
    )
    bnc.add_argument(
        "--threads", type=counts_argument, default=THREADS, metavar="N,...",
        help="CPU thread counts (default: %s)" % ",".join(map(str, THREADS)),
    )
    bnc.add_argument("--rounds", type=int, help="timed forwards per variant at every shape (default: by shape, 80 down to 6)")
    bnc.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bnc.add_argument(
        "--compile", action="store_true",
        help="also time torch.compile(fullgraph=True) plain against fused forwards (adds about a minute of compiling)",
    )
    bnc.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    bnc.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    bnc.add_argument("--plot", metavar="PNG", help="write a plot of the ratios to this PNG (needs layerfuse[bench])")
    bnc.add_argument("--json", action="store_true", help="print only JSON on stdout (progress goes to stderr)")
    swp = commands.add_parser(
        "sweep",
        help="the output for each of K infos fused at one layer, running the layers before it once",
        description="Fuse each of the K infos in FILE (a (K, ...) tensor) at --layer, on one padded batch of "
        "texts, running the embeddings and the blocks up to --layer once and the rest once per info, "
        "batched over infos. Prints how much each info changed the output; --output saves the outputs "
        "(K, B, T, H).",
    )
    swp.add_argument("--infos", required=True, metavar="FILE", help="infos (K, ...) in a .npy, .pt or .safetensors file")
    swp.add_argument("--model", default=None, help="hub name or local folder (default: the embedded MiniLM BERT)")
    swp.add_argument("--layer", type=int, default=None, help="hidden_states index to fuse at (default: the middle block)")
    swp.add_argument("--method", default="addition", help="integration method (see 'layerfuse methods'; default: addition)")
    swp.add_argument("--alpha", type=float, help="the method's alpha (addition, interpolate)")
    swp.add_argument("--value", type=float, help="the method's value (clamp)")
    swp.add_argument(
        "--positions", type=positions_argument, default="all",
        help="all (default), tokens, first, last, or comma-separated token indices such as 0,-1",
    )
    swp.add_argument(
        "--text", action="append", dest="texts", metavar="TEXT",
        help="a text of the batch; repeat for more (default: %d texts of different lengths)" % len(DEFAULT_TEXTS),
    )
    swp.add_argument("--chunk-size", type=int, help="infos per pass (default: as many as fit in 2048 tokens on a CPU)")
    swp.add_argument("--output", "-o", metavar="FILE", help="save the outputs (K, B, T, H) to a .pt, .npy or .safetensors file")
    swp.add_argument("--json", action="store_true", help="print only JSON on stdout")
    return parser


def inspect_report(model: nn.Module) -> str:
    """The model's blocks, hidden size and, for each layer, the module each site resolves to."""
    blocks = find_blocks(model)
    rows = site_table(model)
    widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in rows[0]}
    lines = [
        f"{type(model).__name__} (model_type {model.config.model_type}), hidden size {model.config.hidden_size}, "
        f"{len(blocks)} blocks: {blocks[0].name} .. {blocks[-1].name}",
        "layer=k is hidden_states[k]; sites: output (default), input, attention, mlp, embeddings (= layer 0),",
        "or any module by its dotted name. Both approaches (hook, layer) apply at every site.",
        "",
        "  ".join(key.ljust(width) for key, width in widths.items()).rstrip(),
    ]
    lines += ["  ".join(row[key].ljust(width) for key, width in widths.items()).rstrip() for row in rows]
    return "\n".join(lines)


def _method_arguments(args: argparse.Namespace) -> dict[str, float]:
    """The method arguments given on the command line (--alpha, --value)."""
    return {key: getattr(args, key) for key in ("alpha", "value") if getattr(args, key) is not None}


def _inspect(args: argparse.Namespace) -> int:
    model, _ = load_model(args.model)
    print(inspect_report(model))
    return 0


def _methods(args: argparse.Namespace) -> int:
    print(methods_table())
    return 0


def _compare(args: argparse.Namespace) -> int:
    method_arguments = _method_arguments(args)
    result = compare(
        args.model,
        layer=args.layer,
        method=args.method,
        info=read_info(args.info) if args.info else None,
        positions=args.positions,
        texts=args.texts or DEFAULT_TEXTS,
        repeats=args.repeats,
        seed=args.seed,
        **method_arguments,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0 if result.identical else 1


def run_fusion_options(args: argparse.Namespace) -> FusionConfig | None:
    """The `FusionConfig` that run's options name: by --layer, or --fusion's with --approach; None for neither."""
    given = {
        "method": args.method, "arguments": _method_arguments(args) or None, "approach": args.approach,
        "positions": args.positions,
    }
    if args.fusion is not None:
        if args.layer is not None or any(given[key] is not None for key in ("method", "arguments", "positions")):
            raise ArgumentValueError(
                "a saved fusion brings its own layer, method, arguments and positions: give none of them with --fusion"
            )
        return None if args.approach is None else load_config(args.fusion).replace(approach=args.approach)
    if args.layer is None:
        named = [name for name, value in given.items() if value is not None] + (["info"] if args.info else [])
        if named:
            raise ArgumentValueError(f"fusion options ({', '.join(named)}) need --layer or --fusion")
        return None
    return FusionConfig(
        layer=args.layer, method=args.method or "addition", arguments=given["arguments"] or {},
        approach=args.approach or "hook", positions=args.positions or "all",
    )


def _run(args: argparse.Namespace) -> int:
    summary = embed_corpus(
        args.input,
        args.output,
        model=args.model,
        fusion=run_fusion_options(args),
        info=read_info(args.info) if args.info else None,
        saved=args.fusion,
        text_column=args.text_column,
        id_column=args.id_column,
        include_text=args.include_text,
        pooling=args.pooling,
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        rejects=args.rejects,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.quiet and sys.stderr.isatty(),
        engine=args.engine,
        ray_address=args.ray_address,
        workers=args.workers,
    )
    print(summary.report())
    return 1 if summary.nonfinite else 0


def _bench(args: argparse.Namespace) -> int:
    if args.plot:
        require_matplotlib()
    report = bench(
        args.model,
        layer=args.layer,
        method=args.method,
        shapes=args.shapes,
        threads=args.threads,
        rounds=args.rounds,
        memory=not args.no_memory,
        compiled=args.compile,
        device=args.device,
        dtype=args.dtype,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


def _sweep(args: argparse.Namespace) -> int:
    method_arguments = _method_arguments(args)
    report, outputs = sweep_report(
        args.model,
        read_info(args.infos),
        layer=args.layer,
        method=args.method,
        positions=args.positions,
        texts=args.texts or DEFAULT_TEXTS,
        chunk_size=args.chunk_size,
        **method_arguments,
    )
    if args.output:
        write_outputs(args.output, outputs)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


COMMANDS = {"methods": _methods, "inspect": _inspect, "compare": _compare, "run": _run, "bench": _bench, "sweep": _sweep}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 approaches disagree, 2 bad input)."""
    args = _parser().parse_args(argv)
    transformers_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except LayerfuseError as error:
        print(f"layerfuse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
