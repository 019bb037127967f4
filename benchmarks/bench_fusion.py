"""The figures of docs/performance.md: `layerfuse bench` on the embedded MiniLM BERT, saved under docs/.

Runs the default grid (plain vs hook vs custom layer at 1x8, 8x64, 32x128 and 16x512 tokens, 1 and 2
threads; every fixed method at 1x8; peak memory in fresh processes) and the per-call protocol (a fusion
made and removed around every forward at batch 1; fuse() + remove() alone), prints the Markdown tables
and writes docs/bench.json and docs/bench.png. About 4.5 minutes on 2 cores; --compile adds the compiled
forwards (about a minute more).

    python benchmarks/bench_fusion.py
    python benchmarks/bench_fusion.py --compile

Those figures were taken with glibc keeping freed memory, which removes page faults from every
forward alike (see docs/performance.md):

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/bench_fusion.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import transformers

from layerfuse.lab.bench import bench, plot

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd forwards")
    parser.add_argument(
        "--output", type=Path, default=DOCS, help="folder for bench.json and bench.png (default: docs/)"
    )
    args = parser.parse_args()

    transformers.utils.logging.disable_progress_bar()
    report = bench(compiled=args.compile, progress=lambda line: print(line, file=sys.stderr, flush=True))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot(report, args.output / "bench.png")
    print(report.table())


if __name__ == "__main__":
    main()
