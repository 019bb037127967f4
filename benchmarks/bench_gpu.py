"""`layerfuse bench` on a CUDA device in float32, float16 and bfloat16; skipped cleanly without one.

    python benchmarks/bench_gpu.py                # tables on stdout
    python benchmarks/bench_gpu.py --plots docs   # and docs/bench_cuda_<dtype>.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

from layerfuse.bench import DTYPES, bench, plot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plots", type=Path, help="folder for one PNG per dtype")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd forwards")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    transformers.utils.logging.disable_progress_bar()
    for dtype in DTYPES:
        report = bench(
            device="cuda", dtype=dtype, threads=(torch.get_num_threads(),), compiled=args.compile,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
        print(report.table() + "\n")
        if args.plots:
            args.plots.mkdir(parents=True, exist_ok=True)
            plot(report, args.plots / f"bench_cuda_{dtype}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
