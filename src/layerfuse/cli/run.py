"""`layerfuse run`: embed every text of a corpus with the fused model, resumable, locally or on Ray.

`layerfuse.run` imports pyarrow (and its engines tqdm and Ray), so only this command's function imports it;
the library checks the pooling and engine names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..config import FusionConfig
from ..errors import ArgumentValueError
from ..paths import check_readable
from ..saving import load_config
from .options import add_fusion_options, add_model_option, fusion_options


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `run` command's parser."""
    parser = commands.add_parser(
        "run",
        help="embed every text of a corpus with the fused model: resumable, bad-row tolerant, locally or on Ray",
        description="Embed the texts of INPUT with the model fused by --layer (--method, --info, ...) or by "
        "--fusion DIR (neither: the plain model) into --output. Bad rows are skipped, counted and listed in a "
        "rejects file; a killed run carries on with --resume. Exit code 1 if some embeddings held NaN or "
        "infinity (they are rejected, not written), 2 for bad arguments.",
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        nargs="+",
        help=".txt (one text a line), .jsonl, .csv or .parquet; or several of one format: paths, a folder or a glob",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="OUT",
        help=".parquet (row, id, text, embedding), .npy or .safetensors; with --engine ray, a folder of Parquet files",
    )
    add_model_option(parser)
    add_fusion_options(
        parser,
        layer="hidden_states index to fuse at",
        info="info tensor from a .npy, .pt or .safetensors file: (D,) for every row, or (N, D) with one row per "
        "corpus row, bad rows included",
        positions="where to fuse: all (default), tokens, first, last; token indices depend on how a batch is "
        "padded, so a run refuses them",
        approach=True,
    )
    parser.add_argument("--fusion", metavar="DIR", help="a saved fusion's folder, instead of --layer and --method")
    parser.add_argument(
        "--text-column", metavar="NAME", help="the texts' column in .jsonl, .csv and .parquet input (default: text)"
    )
    parser.add_argument("--id-column", metavar="NAME", help="a column carried to the output as id")
    parser.add_argument("--include-text", action="store_true", help="write the texts to the Parquet output too")
    parser.add_argument(
        "--pooling",
        metavar="NAME",
        help="mean over real tokens, cls (first token), max, lasttoken, weightedmean, mean_sqrt_len_tokens, or none: "
        "every real token's state (Parquet only); default: a sentence-transformers folder's own, else mean",
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        help="L2-normalise each embedding, or not (default: as a sentence-transformers folder says, else not)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="TOKENS",
        help="truncate to this many tokens (default: a sentence-transformers folder's max_seq_length, else the "
        "model's limit)",
    )
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per forward (default: 32)")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=4096,
        metavar="ROWS",
        help="rows per shard, the most a kill can lose (default: 4096)",
    )
    parser.add_argument(
        "--rejects", metavar="FILE", help="the bad rows' list (default: OUT's name with .rejects.jsonl)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT and its rejects file if they exist")
    parser.add_argument("--resume", action="store_true", help="carry on the interrupted run of the same job")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar (none either off a terminal)")
    parser.add_argument(
        "--backend",
        default="torch",
        metavar="NAME",
        help="torch (default) or onnx: the fused model exported once and run by ONNX Runtime "
        "(pip install 'layerfuse[onnx]'); onnx takes one info for every row",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the torch backend runs the model: cpu (default), cuda or cuda:N; with --engine ray, cuda puts "
        "each actor on a GPU of its own",
    )
    parser.add_argument(
        "--engine", default="local", metavar="NAME", help="local (default) or ray (pip install 'layerfuse[ray]')"
    )
    parser.add_argument(
        "--ray-address", metavar="ADDRESS", help="the Ray cluster to run on (default: a local Ray started for the job)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray actors, one CPU each, and one GPU each with --device cuda (default: every CPU, or every GPU, of "
        "the cluster)",
    )
    parser.set_defaults(execute=execute, interrupted=interrupted)


def execute(args: argparse.Namespace) -> int:
    """Run the job and print its summary; exit code 1 if some embeddings were not finite."""
    from ..run import embed_corpus

    config, info = run_fusion(args)
    summary = embed_corpus(
        args.input[0] if len(args.input) == 1 else args.input,
        args.output,
        model=args.model,
        fusion=config,
        info=info,
        saved=args.fusion,
        text_column=args.text_column,
        id_column=args.id_column,
        include_text=args.include_text,
        pooling=args.pooling,
        normalize=args.normalize,
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        rejects=args.rejects,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.quiet and sys.stderr.isatty(),
        backend=args.backend,
        device=args.device,
        engine=args.engine,
        ray_address=args.ray_address,
        workers=args.workers,
    )
    print(summary.report())
    return 1 if summary.nonfinite else 0


def interrupted(args: argparse.Namespace) -> str:
    """What to do after an interrupt: carry on from the finished shards, or run again."""
    from ..run.job import partial_folder

    partial = partial_folder(Path(args.output))
    if partial.is_dir():
        return f"the finished shards are kept in {partial}: carry on with the same command and --resume"
    return "no shard was finished: run the command again"


def run_fusion(args: argparse.Namespace) -> tuple[FusionConfig | None, torch.Tensor | None]:
    """The `FusionConfig` and info that run's options name: by --layer, or --fusion's with --approach; or neither."""
    options = fusion_options(args)
    info = options.pop("info", None)
    if args.fusion is not None:
        if Path(args.fusion).is_dir():
            check_readable(args.fusion, "the saved fusion")
        given = sorted(set(options) - {"approach"})
        if given:
            raise ArgumentValueError(
                f"a saved fusion brings its own layer, method, arguments and positions: give none of them "
                f"with --fusion (got {', '.join(given)})"
            )
        approach = options.get("approach")
        return (None if approach is None else load_config(args.fusion).replace(approach=approach)), info
    if "layer" not in options:
        given = [*options, *(["info"] if info is not None else [])]
        if given:
            raise ArgumentValueError(f"fusion options ({', '.join(given)}) need --layer or --fusion")
        return None, None
    return FusionConfig(**options), info
