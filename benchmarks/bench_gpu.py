"""`layerfuse bench` on a CUDA device in float32, float16 and bfloat16; skipped cleanly without one.

A forward on a GPU takes milliseconds at every shape of the grid, so each shape gets the same number
of timed forwards per variant (default 100). Prints one table per dtype; with --output, also writes
bench_cuda_<dtype>.json and .png there.

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --output docs --compile
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

from layerfuse.lab.bench import DTYPES, bench, plot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub name or local folder (default: the embedded MiniLM BERT)")
    parser.add_argument(
        "--rounds", type=int, default=100, help="timed forwards per variant at every shape (default: 100)"
    )
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated (default: {','.join(DTYPES)})")
    parser.add_argument("--output", type=Path, help="folder for one JSON and one PNG per dtype")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd forwards")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    transformers.utils.logging.disable_progress_bar()
    for dtype in args.dtypes.split(","):
        report = bench(
            args.model,
            device="cuda",
            dtype=dtype,
            threads=(torch.get_num_threads(),),
            rounds=args.rounds,
            compiled=args.compile,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
        print(report.table() + "\n", flush=True)
        if args.output:
            args.output.mkdir(parents=True, exist_ok=True)
            (args.output / f"bench_cuda_{dtype}.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            plot(report, args.output / f"bench_cuda_{dtype}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
