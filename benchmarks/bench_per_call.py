"""Where the per-call protocol's time goes: `with fuse(model, v, layer=k): model(**batch)` taken apart.

At batch 1 ("Hello, how are you?") on the embedded MiniLM, addition at layer 2, round by round: the
plain forward; a forward with the fusion attached once (attached and removed outside the timing),
at positions "all" and "tokens"; the per-call forward (fuse, forward, remove, all timed); `fuse()` +
`remove()` timed right after a forward ("cold": what the per-call protocol pays) and again right
after that ("hot": a tight loop's figure); and, for scale, one forward hook added to the fused block
and removed, right after a forward. Each is the median over the rounds and its ratio to the plain
forward's median. The whole run is made with the garbage collector on, then off, at 1 and 2
threads. Prints a Markdown table and writes everything to `docs/bench_per_call.json`.

    python benchmarks/bench_per_call.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import layerfuse
from layerfuse.sites import resolve_site

TEXT = "Hello, how are you?"
LAYER = 2
PARTS = (
    "plain",
    "attached once",
    "attached once, tokens",
    "per call",
    "per call, tokens",
    "fuse + remove, cold",
    "fuse + remove, hot",
    "one hook, cold",
)


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _nothing(*_: object) -> None:
    pass


def rounds_of(model, batch, info, rounds: int) -> dict[str, list[float]]:
    """Seconds of every part, once a round, for `rounds` rounds after a tenth as many untimed ones."""

    def forward() -> None:
        model(**batch)

    def per_call(positions: str) -> None:
        with layerfuse.fuse(model, info, layer=LAYER, positions=positions):
            model(**batch)

    def fuse_remove() -> None:
        layerfuse.fuse(model, info, layer=LAYER).remove()

    block = resolve_site(model, layer=LAYER).module

    def one_hook() -> None:
        block.register_forward_hook(_nothing).remove()

    seconds: dict[str, list[float]] = {part: [] for part in PARTS}
    for round_ in range(rounds + rounds // 10):
        got = {"plain": _timed(forward)}
        fusion = layerfuse.fuse(model, info, layer=LAYER)
        got["attached once"] = _timed(forward)
        fusion.remove()
        fusion = layerfuse.fuse(model, info, layer=LAYER, positions="tokens")
        got["attached once, tokens"] = _timed(forward)
        fusion.remove()
        got["per call"] = _timed(lambda: per_call("all"))
        got["per call, tokens"] = _timed(lambda: per_call("tokens"))
        forward()
        got["fuse + remove, cold"] = _timed(fuse_remove)
        got["fuse + remove, hot"] = _timed(fuse_remove)
        forward()
        got["one hook, cold"] = _timed(one_hook)
        if round_ >= rounds // 10:
            for part, value in got.items():
                seconds[part].append(value)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--output", type=Path, default=Path("docs/bench_per_call.json"))
    options = parser.parse_args()
    model, tokenizer = layerfuse.load_model()
    batch = dict(tokenizer([TEXT], return_tensors="pt"))
    info = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    runs = []
    print("| threads | garbage collector | " + " | ".join(PARTS) + " |")
    print("|---|---|" + "---|" * len(PARTS))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for collector in (True, False):
            (gc.enable if collector else gc.disable)()
            try:
                with torch.inference_mode():
                    seconds = rounds_of(model, batch, info, options.rounds)
            finally:
                gc.enable()
            medians = {part: statistics.median(values) for part, values in seconds.items()}
            plain = medians["plain"]
            cells = [f"{medians[part] * 1e6:.0f} µs ({medians[part] / plain:.3f})" for part in PARTS]
            print(f"| {threads} | {'on' if collector else 'off'} | " + " | ".join(cells) + " |")
            runs.append({"threads": threads, "gc": collector, "median_seconds": medians, "seconds": seconds})
    options.output.write_text(
        json.dumps(
            {
                "text": TEXT,
                "layer": LAYER,
                "rounds": options.rounds,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "machine": platform.machine(),
                "runs": runs,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
