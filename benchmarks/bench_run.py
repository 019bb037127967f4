"""Throughput of `layerfuse run` on generated sentences: fused against plain, bucketed against naive batching.

The corpus is 10k seeded sentences of log-normal word counts (median 14 words, a long tail to 150).
Three embedders (the plain model, the fused one, the fused one without length sorting) go through
the corpus in chunks, interleaved chunk by chunk with the order rotating, so drift in the machine's
speed falls on each alike; the table gives total times and the median over chunks of each one's time
over the plain one's. The padding that bucketing saves is counted exactly. Then the whole job runs
once, end to end, on the corpus with a few bad rows.

    python benchmarks/bench_run.py                  # 10k rows, a few minutes on 2 cores
    python benchmarks/bench_run.py --rows 1000 --chunk 100     # a smoke run
    python benchmarks/bench_run.py --compare-rows 5000 --threads 1      # on a machine shared with other work
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy
import pyarrow as pa
import torch
import transformers

from layerfuse import FusionConfig
from layerfuse.run import Embedder, embed_corpus

WORDS = (
    "the of and a to in is was that for on as with by he at from his an were are which this be or had not but "
    "first one their its new after who they have her she two been other when there all during into school time "
    "may years more most only over city some world would where later up such used many can state about national "
    "out known university united then made model layer fusion text corpus batch token vector information"
).split()
BAD_ROWS = {17: "", 2024: "   ", 5151: "\t", 9090: ""}


def sentences(count: int, seed: int = 0) -> list[str]:
    generator = numpy.random.default_rng(seed)
    lengths = numpy.clip(generator.lognormal(numpy.log(14), 0.7, count).astype(int), 3, 150)
    return [" ".join(generator.choice(WORDS, length)).capitalize() + "." for length in lengths]


def interleaved(variants: dict[str, Embedder], texts: list[str], chunk: int) -> dict[str, list[float]]:
    """Seconds each embedder takes on each chunk of `texts`, the variants' order rotating chunk by chunk."""
    names, seconds = list(variants), {name: [] for name in variants}
    for index, first in enumerate(range(0, len(texts), chunk)):
        table = pa.table({"row": range(first, min(first + chunk, len(texts))), "text": texts[first : first + chunk]})
        for name in names[index % len(names) :] + names[: index % len(names)]:
            start = time.perf_counter()
            variants[name](table)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def padded_tokens(lengths: numpy.ndarray, batch_size: int, shard_size: int, bucket: bool) -> int:
    """Tokens the forwards process, padding included, when shards are cut into batches sorted by length or not."""
    total = 0
    for first in range(0, len(lengths), shard_size):
        shard = lengths[first : first + shard_size]
        shard = numpy.sort(shard) if bucket else shard
        batches = numpy.array_split(shard, range(batch_size, len(shard), batch_size))
        total += sum(len(batch) * int(batch.max()) for batch in batches)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="sentences in the corpus (default: 10000)")
    parser.add_argument("--compare-rows", type=int, help="sentences for the interleaved comparison (default: --rows)")
    parser.add_argument("--chunk", type=int, default=500, help="rows per interleaved chunk (default: 500)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward (default: 32)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    transformers.utils.logging.disable_progress_bar()
    texts = sentences(args.rows)
    compared = texts[: args.compare_rows or args.rows]
    info = torch.randn(384, generator=torch.Generator().manual_seed(0))
    fusion = FusionConfig(layer=3, method="addition")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads; embedded MiniLM BERT, addition at layer 3, mean pooling, "
        f"batch {args.batch_size}\n"
    )

    with (
        Embedder.load(batch_size=args.batch_size) as plain,
        Embedder.load(fusion=fusion, info=info, batch_size=args.batch_size) as fused,
        Embedder.load(fusion=fusion, info=info, batch_size=args.batch_size, bucket=False) as naive,
    ):
        lengths = numpy.array([len(ids) for ids in plain.tokenizer(texts)["input_ids"]])
        for embedder in (plain, fused, naive):
            embedder(pa.table({"row": range(64), "text": texts[:64]}))
        seconds = interleaved({"plain": plain, "fused": fused, "fused, naive batches": naive}, compared, args.chunk)
    print(f"{len(compared)} sentences in chunks of {args.chunk}, the three pipelines interleaved chunk by chunk:\n")
    print("| pipeline | seconds | rows/s | time / plain, median over chunks (IQR) |")
    print("|---|---|---|---|")
    for name, spent in seconds.items():
        ratios = numpy.array(spent) / numpy.array(seconds["plain"])
        q1, median, q3 = numpy.percentile(ratios, [25, 50, 75])
        print(f"| {name} | {sum(spent):.1f} | {len(compared) / sum(spent):.1f} | {median:.3f} ({q1:.3f}-{q3:.3f}) |")
    real = int(lengths.sum())
    bucketed, unsorted = (padded_tokens(lengths, args.batch_size, 4096, bucket) for bucket in (True, False))
    print(
        f"\ntokens through the model for all {args.rows} sentences ({real} real): {bucketed} with batches sorted "
        f"by length in shards of 4096, {unsorted} in input order ({unsorted / bucketed:.2f}x)\n"
    )

    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.txt"
        corpus.write_text("\n".join(BAD_ROWS.get(row, text) for row, text in enumerate(texts)) + "\n")
        summary = embed_corpus(
            corpus, Path(folder) / "out.parquet", fusion=fusion, info=info, batch_size=args.batch_size
        )
        print(f"end to end: {args.rows} rows with {len(BAD_ROWS)} bad ones, fused, into Parquet")
        print(summary.report().replace(folder + "/", ""))


if __name__ == "__main__":
    main()
