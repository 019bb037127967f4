"""Tensor memory of one forward, plain against fused by every fixed method and both approaches.

Each forward runs in a fresh Python process (`layerfuse.lab.bench.measure_memory`), which counts the bytes
of the tensors it allocates: the peak and the total, from the profiler's memory events on the CPU and
the allocator's statistics on CUDA. The fusion's allowance is one hidden-sized tensor (B x T x H) per
fused layer.

    python benchmarks/bench_memory.py                 # 16 x 512 tokens, about 2 minutes on 2 cores
    python benchmarks/bench_memory.py --shape 32x128 --device cuda
"""

from __future__ import annotations

import argparse

import torch

from layerfuse.lab.bench import DTYPES, FIXED_METHODS, measure_memory, parse_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16x512", help="batch x tokens (default: 16x512)")
    parser.add_argument("--layer", type=int, default=3, help="layer to fuse (default: 3 of 6)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="float32 (default), float16 or bfloat16")
    args = parser.parse_args()

    parse_device(args.device, args.dtype)
    batch, tokens = (int(n) for n in args.shape.split("x"))
    hidden = batch * tokens * 384 * DTYPES[args.dtype].itemsize
    print(
        f"embedded MiniLM BERT, layer {args.layer}, {batch} x {tokens} tokens, {args.dtype} on {args.device}; "
        f"one hidden-sized tensor: {hidden / 2**20:.1f} MiB\n"
    )
    print("| method | plain peak | extra peak (hook, layer) | plain allocated | extra allocated (hook, layer) |")
    print("|---|---|---|---|---|")
    for method in FIXED_METHODS:
        memory = measure_memory(
            None,
            method=method,
            layer=args.layer,
            batch=batch,
            tokens=tokens,
            threads=args.threads,
            device=args.device,
            dtype=args.dtype,
            hidden_size=384,
        )
        extra_peak = ", ".join(f"{memory.extra(v) / 2**20:+.3f}" for v in ("hook", "layer"))
        extra_allocated = ", ".join(f"{memory.extra_allocated(v) / 2**20:+.3f}" for v in ("hook", "layer"))
        print(
            f"| {method} | {memory.peak['plain'] / 2**20:.1f} MiB | {extra_peak} MiB | "
            f"{memory.allocated['plain'] / 2**20:.1f} MiB | {extra_allocated} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
