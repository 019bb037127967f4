"""The Ray engine of `layerfuse run`: the driver's peak memory as the corpus grows, and rows/s against the local engine.

Memory: corpora of generated sentences (.jsonl files of 10k rows each; 20k and 200k rows by default)
go through `layerfuse run --engine ray --workers 2` in a subprocess, with a small random BERT (the
driver's memory does not depend on the model, which it never loads); the driver's peak resident set
(VmHWM) is read from /proc while it runs. A driver that held the corpus or the output would grow
with it; a streaming one stays flat. Throughput: a corpus (20k rows by default, in files of 10k)
through `layerfuse run` with the embedded model, as a command, on the local engine (torch's threads,
one per core) and on the Ray engine (`--workers`, one CPU and one thread each), the engines taking
turns; each time is the whole command's, Python's start, Ray's start and the model loads included.
The same on a small corpus (500 rows) is each engine's fixed cost; the rows past it over the seconds
past it, its steady rows/s.

    python benchmarks/bench_ray.py                              # both parts, docs/bench_ray.json
    python benchmarks/bench_ray.py --part memory                # the driver's memory only
    python benchmarks/bench_ray.py --part throughput            # rows/s of both engines only
    python benchmarks/bench_ray.py --memory-rows 2000 4000 --throughput-rows 1000 --small-rows 100   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy
import torch

FILE_ROWS = 10_000
WORDS = (
    "the of and a to in is was that for on as with by he at from his an were are which this be or had not but "
    "first one their its new after who they have her she two been other when there all during into school time "
    "model layer fusion text corpus batch token vector information"
).split()


def write_corpus(folder: Path, rows: int, seed: int = 0) -> Path:
    """`rows` generated sentences (log-normal word counts, median 14) in .jsonl files of `FILE_ROWS` rows."""
    folder.mkdir(parents=True)
    generator = numpy.random.default_rng(seed)
    for number, first in enumerate(range(0, rows, FILE_ROWS)):
        count = min(FILE_ROWS, rows - first)
        lengths = numpy.clip(generator.lognormal(numpy.log(14), 0.7, count).astype(int), 3, 150)
        lines = [json.dumps({"text": " ".join(generator.choice(WORDS, length))}) for length in lengths]
        (folder / f"part-{number:04d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def small_model(folder: Path) -> Path:
    """A 2-block random BERT (hidden 32) with the embedded model's tokenizer: fast, so the driver is what is measured."""
    from transformers import BertConfig, BertModel

    import layerfuse

    _, tokenizer = layerfuse.load_model()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peak_rss(pid: int) -> int | None:
    """The peak resident set of process `pid` so far, in bytes (Linux /proc), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def driver_memory(corpus: Path, model: Path, output: Path, workers: int) -> dict[str, float]:
    """Run the Ray engine on `corpus` in a subprocess; its peak resident set and time."""
    command = [sys.executable, "-m", "layerfuse", "run", str(corpus), "-o", str(output), "--model", str(model)]
    command += ["--engine", "ray", "--workers", str(workers), "--quiet"]
    start = time.perf_counter()
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while driver.poll() is None:
        peak = max(peak, peak_rss(driver.pid) or 0)
        time.sleep(0.05)
    _, err = driver.communicate()
    if driver.returncode != 0:
        raise SystemExit(f"the Ray run failed:\n{err}")
    return {"driver_peak_rss_mib": round(peak / 2**20, 1), "seconds": round(time.perf_counter() - start, 1)}


def job_seconds(corpus: Path, output: Path, engine: str, workers: int) -> float:
    """The wall time of `layerfuse run` on `corpus` with the embedded model, as a command: start to exit."""
    command = [sys.executable, "-m", "layerfuse", "run", str(corpus), "-o", str(output), "--quiet"]
    if engine == "ray":
        command += ["--engine", "ray", "--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {engine} run failed:\n{done.stderr}")
    return time.perf_counter() - start


def throughput(rows: int, small_rows: int, folder: Path, workers: int) -> dict[str, Any]:
    """Each engine's whole job on a corpus of `rows` rows and on one of `small_rows`: rows/s, fixed cost and rows/s past it.

    A job's time is that of the command, Python's start, Ray's start and the model loads included.
    The small corpus's time is the fixed cost (a few rows embedded besides); the rows past it over the
    seconds past it are the steady rows/s. The engines take turns on each corpus.
    """
    corpus = write_corpus(folder / "throughput", rows, seed=1)
    small = write_corpus(folder / "small", small_rows, seed=2)
    seconds: dict[str, dict[str, float]] = {"local": {}, "ray": {}}
    for name, path in (("small", small), ("full", corpus)):
        for engine in seconds:
            output = folder / f"{engine}-{name}{'.parquet' if engine == 'local' else ''}"
            seconds[engine][name] = job_seconds(path, output, engine, workers)
    results: dict[str, Any] = {"workers": workers, "rows": rows, "small_rows": small_rows}
    for engine, measured in seconds.items():
        results[engine] = {
            "seconds": round(measured["full"], 1),
            "rows_per_s": round(rows / measured["full"], 1),
            "fixed_seconds": round(measured["small"], 1),
            "steady_rows_per_s": round((rows - small_rows) / (measured["full"] - measured["small"]), 1),
        }
    local, on_ray = results["local"], results["ray"]
    results["ray_over_local"] = {
        "rows_per_s": round(on_ray["rows_per_s"] / local["rows_per_s"], 3),
        "steady_rows_per_s": round(on_ray["steady_rows_per_s"] / local["steady_rows_per_s"], 3),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("memory", "throughput", "both"), default="both")
    parser.add_argument("--memory-rows", type=int, nargs="+", default=[20_000, 200_000], help="corpus sizes")
    parser.add_argument("--throughput-rows", type=int, default=20_000, help="the throughput corpus (default: 20000)")
    parser.add_argument("--small-rows", type=int, default=500, help="the corpus of the fixed cost (default: 500)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default: 2)")
    parser.add_argument("--output", type=Path, default=Path("docs/bench_ray.json"))
    args = parser.parse_args()
    if not 0 < args.small_rows < args.throughput_rows:
        parser.error("--small-rows must be from 1 to fewer than --throughput-rows")

    results: dict = json.loads(args.output.read_text()) if args.output.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        if args.part in ("memory", "both"):
            model = small_model(folder / "model")
            results["memory"] = {"workers": args.workers, "runs": []}
            for rows in args.memory_rows:
                corpus = write_corpus(folder / f"corpus-{rows}", rows)
                measured = driver_memory(corpus, model, folder / f"out-{rows}", args.workers)
                results["memory"]["runs"].append({"rows": rows, **measured})
                print(f"{rows} rows: the driver's peak RSS {measured['driver_peak_rss_mib']} MiB", flush=True)
        if args.part in ("throughput", "both"):
            results["throughput"] = throughput(args.throughput_rows, args.small_rows, folder, args.workers)
            print(json.dumps(results["throughput"]), flush=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
