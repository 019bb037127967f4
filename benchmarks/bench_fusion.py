"""Time the plain forward against fused forwards (hook and custom layer) on the embedded MiniLM BERT.

Runs are interleaved round by round, so drift in the machine's speed falls on every variant alike;
the table gives medians, interquartile ranges and each fused median over the plain median.

    python benchmarks/bench_fusion.py            # the full grid, about two minutes on 2 cores
    python benchmarks/bench_fusion.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import platform
from contextlib import nullcontext

import torch
import transformers

import layerfuse
from layerfuse.timing import Summary, time_interleaved

SHAPES = ((1, 8, 300), (32, 128, 15))  # batch, tokens, timed rounds
THREADS = (1, 2)
APPROACHES = ("hook", "layer")


def bench(model, batch_size: int, tokens: int, repeats: int, layer: int, method: str) -> dict[str, Summary]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch_size, tokens), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    info = torch.randn(model.config.hidden_size, generator=generator)
    variants = {"plain": nullcontext} | {
        a: (lambda a=a: layerfuse.fuse(model, info, layer=layer, method=method, approach=a)) for a in APPROACHES
    }
    with torch.inference_mode():
        times = time_interleaved(lambda: model(**batch), variants, repeats=repeats, warmup=3)
    return {name: Summary.of(seconds) for name, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the rounds, for a smoke run")
    parser.add_argument("--layer", type=int, default=3, help="layer to fuse (default: 3 of 6)")
    parser.add_argument("--method", default="addition", help="integration method (default: addition)")
    args = parser.parse_args()

    transformers.utils.logging.disable_progress_bar()
    model, _ = layerfuse.load_model()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}")
    print(f"embedded MiniLM BERT, {args.method} at layer {args.layer}, float32, CPU\n")
    print("| batch x tokens | threads | plain median (IQR) | hook / plain | layer / plain |")
    print("|---|---|---|---|---|")
    for threads in THREADS:
        torch.set_num_threads(threads)
        for batch_size, tokens, repeats in SHAPES:
            repeats = max(3, repeats // 10) if args.quick else repeats
            result = bench(model, batch_size, tokens, repeats, args.layer, args.method)
            plain = result["plain"]
            ratios = " | ".join(f"{result[a].median / plain.median:.3f}x" for a in APPROACHES)
            print(
                f"| {batch_size} x {tokens} | {threads} | {plain.median * 1e3:.2f} ms "
                f"({plain.q1 * 1e3:.2f}-{plain.q3 * 1e3:.2f}) | {ratios} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
