"""`bench`: the cost of a fused forward against the plain one, over a grid of shapes and thread counts.

For each batch × tokens shape and thread count, the plain forward, the hook and the custom layer run
interleaved forward by forward on twins of the model that share its weights, after warm-up rounds; the
report gives medians, interquartile ranges and each fused forward's time over the plain one's in the
same round. Every fixed method also runs end to end at the smallest shape, and alone (its
`Fusion.apply` on a hidden state of each shape), as a share of the plain forward. Also the tensor
memory of one forward per variant (its peak and its total), each in a fresh process; optionally
`torch.compile`d plain against compiled fused forwards.

>>> report = bench(shapes=((1, 4),), threads=(1,), methods=("addition",), rounds=1, memory=False)
>>> [(point.batch, point.tokens, sorted(point.timings)) for point in report.points]
[(1, 4, ['hook', 'layer', 'plain'])]
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from layerfuse.errors import ArgumentValueError, positive_int
from layerfuse.fusion import Fusion, fuse
from layerfuse.methods import METHODS, canonical_name
from layerfuse.models import load_model, model_label
from layerfuse.sites import middle_layer, resolve_site

from ..compare import random_info
from ..timing import Interleaved, Summary, time_calls
from ..twins import side_by_side

SHAPES = ((1, 8), (8, 64), (32, 128), (16, 512))
THREADS = (1, 2)
APPROACHES = ("hook", "layer")
FIXED_METHODS = tuple(name for name, cls in METHODS.items() if not cls.learned)
METHOD_ARGUMENTS: dict[str, dict[str, float]] = {"scale": {"alpha": 0.5}, "clamp": {"value": 1.0}}
TARGET = 1.02
ROUNDS = ((64, 80), (1024, 32), (4096, 16))
"""Timed forwards per variant by batch tokens (B·T up to the first number), 6 beyond: the default grid fits in 5
minutes on 2 cores. A burst of other work on the machine weighs less on a longer forward, so 16×512 needs fewer
forwards than 32×128 to resolve the same ratio."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rounds_for(batch: int, tokens: int) -> int:
    """Timed forwards per variant at a shape: many where a forward takes milliseconds, few where it takes seconds."""
    return next((rounds for limit, rounds in ROUNDS if batch * tokens <= limit), 6)


@dataclass(frozen=True)
class Point(Interleaved):
    """One grid point: the seconds of the plain forward and of each fused forward, round by round."""

    batch: int
    tokens: int
    threads: int
    method: str
    seconds: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "tokens": self.tokens,
            "threads": self.threads,
            "method": self.method,
            "rounds": self.rounds,
            "seconds": {name: summary.to_dict() for name, summary in self.timings.items()},
            "ratio_to_plain": {name: self.ratio(name).to_dict() for name in self.seconds if name != "plain"},
            "seconds_by_round": self.seconds,
        }


@dataclass(frozen=True)
class Cost:
    """A method's own work, `Fusion.apply` on one hidden state, against the plain forward at that point."""

    method: str
    batch: int
    tokens: int
    threads: int
    seconds: Summary
    plain: float

    @property
    def share(self) -> float:
        """Median seconds of the fusion over the median seconds of the plain forward."""
        return self.seconds.median / self.plain

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "batch": self.batch,
            "tokens": self.tokens,
            "threads": self.threads,
            "seconds": self.seconds.to_dict(),
            "share_of_plain": self.share,
        }


@dataclass(frozen=True)
class Memory:
    """Tensor memory of one forward per variant, each measured in a fresh process: its peak and its total."""

    batch: int
    tokens: int
    method: str
    peak: dict[str, int]
    allocated: dict[str, int]
    hidden: int

    def extra(self, variant: str) -> int:
        """Bytes of peak memory `variant` needs beyond the plain forward."""
        return self.peak[variant] - self.peak["plain"]

    def extra_allocated(self, variant: str) -> int:
        """Bytes `variant` allocates beyond the plain forward, over the whole forward."""
        return self.allocated[variant] - self.allocated["plain"]

    def to_dict(self) -> dict[str, Any]:
        fused = [name for name in self.peak if name != "plain"]
        return {
            "batch": self.batch,
            "tokens": self.tokens,
            "method": self.method,
            "peak_bytes": self.peak,
            "allocated_bytes": self.allocated,
            "extra_peak_bytes": {name: self.extra(name) for name in fused},
            "extra_allocated_bytes": {name: self.extra_allocated(name) for name in fused},
            "hidden_tensor_bytes": self.hidden,
        }


@dataclass(frozen=True)
class Report:
    """Everything `bench` measured, with the setting it measured it in."""

    model: str
    layer: int
    method: str
    device: str
    dtype: str
    environment: dict[str, str]
    points: list[Point]
    costs: list[Cost]
    memory: Memory | None = None
    compiled: list[Point] = field(default_factory=list)
    compile_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def max_ratio(self) -> float:
        """The largest median ratio of fused to plain, over every eager grid point and approach."""
        return self.largest()[2].median

    def largest(self) -> tuple[Point, str, Summary]:
        """The eager grid point and approach with the largest median ratio of fused to plain, and that ratio."""
        return max(
            ((point, a, point.ratio(a)) for point in self.points for a in APPROACHES), key=lambda found: found[2].median
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return {
            "model": self.model,
            "layer": self.layer,
            "method": self.method,
            "device": self.device,
            "dtype": self.dtype,
            "environment": self.environment,
            "target_ratio": TARGET,
            "max_ratio": self.max_ratio(),
            "points": [point.to_dict() for point in self.points],
            "fusion_costs": [cost.to_dict() for cost in self.costs],
            "memory": None if self.memory is None else self.memory.to_dict(),
            "compiled": [point.to_dict() for point in self.compiled],
            "compile_seconds": self.compile_seconds,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """The report as Markdown tables, for a terminal or a README."""
        env = self.environment
        lines = [
            f"{self.model}: {self.method} at layer {self.layer}, {self.dtype} on {self.device}",
            f"torch {env['torch']}, transformers {env['transformers']}, {env['machine']}, "
            f"{env['cpus']} CPUs; {self.seconds:.0f} s in all",
            "",
            "| batch x tokens | threads | method | timed | plain median (IQR) | hook / plain (IQR) | layer / plain (IQR) |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [_point_row(point) for point in self.points]
        point, approach, ratio = self.largest()
        lines += [
            "",
            f"Largest fused / plain median: {ratio.median:.3f}x (target: {TARGET}x or less), {approach} at "
            f"{point.batch} x {point.tokens} with {point.threads} thread{'s' if point.threads > 1 else ''} "
            f"({point.method}), where the paired ratios' IQR is {ratio.q1:.3f}-{ratio.q3:.3f} over {point.rounds} "
            "forwards",
        ]
        if self.costs:
            shapes = sorted({(c.batch, c.tokens) for c in self.costs}, key=lambda s: s[0] * s[1])
            lines += [
                "",
                "Each method's own work (`Fusion.apply` on a B x T x H hidden state), median, and its share "
                "of the plain forward:",
                "",
                "| method | threads | " + " | ".join(f"{b} x {t}" for b, t in shapes) + " |",
                "|---|---|" + "---|" * len(shapes),
            ]
            by_key = {(c.method, c.threads, c.batch, c.tokens): c for c in self.costs}
            for method, threads in dict.fromkeys((c.method, c.threads) for c in self.costs):
                cells = [by_key.get((method, threads, b, t)) for b, t in shapes]
                lines.append(
                    f"| {method} | {threads} | "
                    + " | ".join("-" if c is None else f"{_time(c.seconds.median)} ({c.share:.2%})" for c in cells)
                    + " |"
                )
        if self.memory is not None:
            memory = self.memory
            lines += [
                "",
                f"Tensor memory of one forward at {memory.batch} x {memory.tokens} ({memory.method}), each variant in "
                f"a fresh process; one hidden-sized tensor (B x T x H) is {_mib(memory.hidden)}:",
                "",
                "| variant | peak | peak vs plain | allocated in all | allocated vs plain |",
                "|---|---|---|---|---|",
            ]
            for name in memory.peak:
                extras = ("-", "-") if name == "plain" else (
                    _signed_mib(memory.extra(name)), _signed_mib(memory.extra_allocated(name))
                )
                lines.append(
                    f"| {name} | {_mib(memory.peak[name])} | {extras[0]} | {_mib(memory.allocated[name])} | {extras[1]} |"
                )
        if self.compiled:
            lines += [
                "",
                "torch.compile(model, fullgraph=True), compiled plain against compiled fused forwards:",
                "",
                "| batch x tokens | threads | method | timed | compiled plain median (IQR) "
                "| hook / plain (IQR) | layer / plain (IQR) |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [_point_row(point) for point in self.compiled]
            lines += ["", "Compile seconds (first call, per shape): " + ", ".join(
                f"{name} {seconds:.1f}" for name, seconds in self.compile_seconds.items()
            )]
        return "\n".join(lines)


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def _spread(summary: Summary) -> str:
    """Median and IQR in one unit: ms, or us below a millisecond."""
    scale, unit, digits = (1e3, "ms", 2) if summary.median >= 1e-3 else (1e6, "us", 0)
    return f"{summary.median * scale:.{digits}f} {unit} ({summary.q1 * scale:.{digits}f}-{summary.q3 * scale:.{digits}f})"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _signed_mib(size: int) -> str:
    return f"{size / 2**20:+.2f} MiB"


def _point_row(point: Point) -> str:
    ratios = " | ".join(
        f"{r.median:.3f}x ({r.q1:.3f}-{r.q3:.3f})" for r in (point.ratio(a) for a in APPROACHES)
    )
    return (
        f"| {point.batch} x {point.tokens} | {point.threads} | {point.method} | {point.rounds} | "
        f"{_spread(point.timings['plain'])} | {ratios} |"
    )


def environment(device: torch.device) -> dict[str, str]:
    """Versions and hardware, for the report's header."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def parse_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Check a device and dtype name; a CUDA device must be present."""
    if dtype not in DTYPES:
        raise ArgumentValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ArgumentValueError(f"unknown device {device!r}: use cpu or cuda") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentValueError("no CUDA device is available here: use --device cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise ArgumentValueError(f"unknown device {device!r}: use cpu or cuda")
    return parsed, DTYPES[dtype]


def _check_shapes(shapes: Sequence[tuple[int, int]], name: str) -> None:
    if not shapes or any(
        not isinstance(size, int) or isinstance(size, bool) or size < 1 for shape in shapes for size in shape
    ) or any(len(shape) != 2 for shape in shapes):
        raise ArgumentValueError(f"{name} must be non-empty (batch, tokens) pairs of positive ints, got {shapes!r}")


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def _batch(model: nn.Module, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    ids = torch.randint(vocab // 2, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}


def _fusion(model: nn.Module, method: str, layer: int, approach: str) -> Fusion:
    info = random_info(method, model.config.hidden_size, seed=0)
    return fuse(model, info, layer=layer, method=method, approach=approach, **METHOD_ARGUMENTS.get(method, {}))


def _twin_fusions(method: str, layer: int) -> dict[str, Callable[[nn.Module], Fusion]]:
    """For `side_by_side`: per approach, what attaches the fusion to a twin."""
    return {a: functools.partial(_fusion, method=method, layer=layer, approach=a) for a in APPROACHES}


def time_point(model: nn.Module, batch: int, tokens: int, threads: int, method: str, layer: int, rounds: int) -> Point:
    """Time `rounds` forwards each of the plain model, the hook and the custom layer at one grid point.

    The fusions sit on twins of the model that share its weights (`side_by_side`), so the three
    forwards alternate call by call, in an order that turns round by round, with nothing attached or
    removed between them: each fused forward is paired with a plain one a moment apart, in the steady
    state of a user's loop of forwards.
    """
    inputs = _batch(model, batch, tokens)
    sync = _synchronizer(next(model.parameters()).device)
    fusions = _twin_fusions(method, layer)
    with torch.inference_mode(), side_by_side(model, fusions) as networks:
        calls = {name: functools.partial(_call, network, inputs, sync) for name, network in networks.items()}
        times = time_calls(calls, repeats=rounds, warmup=max(1, rounds // 10))
    return Point(batch, tokens, threads, method, times)


def time_cost(model: nn.Module, method: str, layer: int, batch: int, tokens: int, plain: Point) -> Cost:
    """Time `Fusion.apply` alone on a random hidden state of shape (batch, tokens, H)."""
    weight = next(model.parameters())
    hidden = torch.randn(batch, tokens, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
    sync = _synchronizer(weight.device)
    repeats = 4 * rounds_for(batch, tokens)
    with torch.inference_mode(), _fusion(model, method, layer, "hook") as fusion:

        def apply() -> None:
            fusion.apply(hidden)
            sync()

        seconds = time_calls({"apply": apply}, repeats=repeats, warmup=max(1, repeats // 10))["apply"]
    return Cost(method, batch, tokens, plain.threads, Summary.of(seconds), plain.timings["plain"].median)


def forward_memory(
    model: str | None, variant: str, method: str, layer: int, batch: int, tokens: int, threads: int, device: str, dtype: str
) -> tuple[int, int]:
    """Peak and total bytes of the tensors one forward of `variant` allocates, after a small warm-up forward.

    On CPU from the profiler's memory events, on CUDA from the allocator's statistics. `measure_memory`
    runs it in a fresh process per variant.
    """
    torch.set_num_threads(threads)
    network = load_model(model)[0].to(device=device, dtype=DTYPES[dtype])
    inputs = _batch(network, batch, tokens)
    fusion = nullcontext() if variant == "plain" else _fusion(network, method, layer, variant)
    with torch.inference_mode(), fusion:
        network(**_batch(network, 1, 8))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_stats()
            network(**inputs)
            torch.cuda.synchronize()
            after = torch.cuda.memory_stats()
            return (
                after["allocated_bytes.all.peak"] - before["allocated_bytes.all.current"],
                after["allocated_bytes.all.allocated"] - before["allocated_bytes.all.allocated"],
            )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
            network(**inputs)
    changes = sorted(
        (event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"
    )
    live = peak = total = 0
    for _, size in changes:
        live += size
        peak = max(peak, live)
        total += max(size, 0)
    return peak, total


def measure_memory(
    model: str | None,
    *,
    method: str,
    layer: int,
    batch: int,
    tokens: int,
    threads: int,
    device: str,
    dtype: str,
    hidden_size: int,
) -> Memory:
    """Tensor memory of one plain, hook and layer forward, each in a fresh Python process (run side by side)."""
    code = "import json, sys; from layerfuse.lab.bench import forward_memory; print(*forward_memory(**json.loads(sys.argv[1])))"
    arguments = dict(
        model=model, method=method, layer=layer, batch=batch, tokens=tokens, threads=threads, device=device, dtype=dtype
    )
    processes = {
        variant: subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(arguments | {"variant": variant})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for variant in ("plain", *APPROACHES)
    }
    peak, allocated = {}, {}
    for variant, process in processes.items():
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the {variant} memory probe failed:\n{err}")
        peak[variant], allocated[variant] = (int(number) for number in out.split()[-2:])
    return Memory(batch, tokens, method, peak, allocated, batch * tokens * hidden_size * DTYPES[dtype].itemsize)


def time_compiled(
    model: nn.Module, *, method: str, layer: int, shapes: Sequence[tuple[int, int]], threads: int, backend: str
) -> tuple[list[Point], dict[str, float]]:
    """Compiled plain against compiled fused forwards: twins of the model sharing its weights, fused before compiling.

    torch guards on module hooks here, so that the hook variant never runs the plain variant's graph;
    each compiled forward is checked against its eager forward before it is timed.
    """
    fusions = _twin_fusions(method, layer)
    sync = _synchronizer(next(model.parameters()).device)
    points, compile_seconds = [], {}
    with (
        torch.inference_mode(),
        torch._dynamo.config.patch(skip_nnmodule_hook_guards=False),
        side_by_side(model, fusions) as networks,
    ):
        compiled = {
            name: torch.compile(network, fullgraph=True, dynamic=False, backend=backend)
            for name, network in networks.items()
        }
        for batch, tokens in shapes:
            inputs = _batch(model, batch, tokens)
            for name, network in compiled.items():
                start = time.perf_counter()
                output = network(**inputs).last_hidden_state
                sync()
                compile_seconds[f"{name} {batch}x{tokens}"] = time.perf_counter() - start
                if not torch.allclose(output, networks[name](**inputs).last_hidden_state, rtol=1e-2, atol=1e-2):
                    raise RuntimeError(f"the compiled {name} forward differs from the eager one at {batch}x{tokens}")
            calls = {name: functools.partial(_call, network, inputs, sync) for name, network in compiled.items()}
            rounds = rounds_for(batch, tokens)
            times = time_calls(calls, repeats=rounds, warmup=max(1, rounds // 10))
            points.append(Point(batch, tokens, threads, method, times))
    return points, compile_seconds


def _call(network: Callable[..., Any], inputs: dict[str, torch.Tensor], sync: Callable[[], None]) -> None:
    network(**inputs)
    sync()


def bench(
    model: str | None = None,
    *,
    layer: int | None = None,
    method: str = "addition",
    methods: Sequence[str] = FIXED_METHODS,
    shapes: Sequence[tuple[int, int]] = SHAPES,
    method_shapes: Sequence[tuple[int, int]] = SHAPES[:1],
    threads: Sequence[int] = THREADS,
    rounds: int | None = None,
    memory: bool = True,
    compiled: bool = False,
    compile_shapes: Sequence[tuple[int, int]] = SHAPES[:2],
    compile_backend: str = "inductor",
    device: str = "cpu",
    dtype: str = "float32",
    progress: Callable[[str], None] = lambda line: None,
) -> Report:
    """Time plain against fused forwards of `model` (default: the embedded MiniLM BERT).

    The grid is `shapes` × `threads` for `method` (at `layer`, default the middle block); each of
    `methods` also runs end to end at `method_shapes` and alone at every shape. `rounds` overrides
    `rounds_for`. `memory` measures tensor memory at the largest shape, in fresh processes;
    `compiled` adds forwards compiled by `compile_backend` at `compile_shapes`, with the most threads.
    """
    start = time.perf_counter()
    parsed_device, parsed_dtype = parse_device(device, dtype)
    _check_shapes(shapes, "shapes")
    _check_shapes(method_shapes, "method_shapes")
    _check_shapes(compile_shapes, "compile_shapes")
    if not threads or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in threads):
        raise ArgumentValueError(f"threads must be positive ints, got {threads!r}")
    if rounds is not None:
        positive_int("rounds", rounds)
    method = canonical_name(method)
    methods = list(dict.fromkeys(canonical_name(m) for m in methods))
    learned = [m for m in [method, *methods] if METHODS[m].learned]
    if learned:
        raise ArgumentValueError(f"bench times fixed methods; {', '.join(learned)} must be trained first")
    network = load_model(model)[0].to(device=parsed_device, dtype=parsed_dtype)
    layer = resolve_site(network, layer=middle_layer(network) if layer is None else layer).layer
    previous_threads = torch.get_num_threads()
    points: list[Point] = []
    costs: list[Cost] = []
    try:
        for count in threads:
            torch.set_num_threads(count)
            for batch, tokens in shapes:
                rounds_here = rounds or rounds_for(batch, tokens)
                point = time_point(network, batch, tokens, count, method, layer, rounds_here)
                points.append(point)
                progress(_point_row(point))
                for other in methods:
                    if other != method and (batch, tokens) in method_shapes:
                        points.append(time_point(network, batch, tokens, count, other, layer, rounds_here))
                        progress(_point_row(points[-1]))
                    costs.append(time_cost(network, other, layer, batch, tokens, point))
        compiled_points, compile_seconds = [], {}
        if compiled:
            torch.set_num_threads(max(threads))
            compiled_points, compile_seconds = time_compiled(
                network, method=method, layer=layer, shapes=compile_shapes, threads=max(threads), backend=compile_backend
            )
    finally:
        torch.set_num_threads(previous_threads)
    peak = None
    if memory:
        batch, tokens = max(shapes, key=lambda shape: shape[0] * shape[1])
        peak = measure_memory(
            model, method=method, layer=layer, batch=batch, tokens=tokens, threads=max(threads), device=device,
            dtype=dtype, hidden_size=network.config.hidden_size,
        )
    return Report(
        model=model_label(model),
        layer=layer,
        method=method,
        device=str(parsed_device),
        dtype=dtype,
        environment=environment(parsed_device),
        points=points,
        costs=costs,
        memory=peak,
        compiled=compiled_points,
        compile_seconds=compile_seconds,
        seconds=time.perf_counter() - start,
    )


def plot(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write a PNG of each fused forward's median over the plain one, with IQR bars, per shape and thread count."""
    figure_class = require_matplotlib()
    threads = sorted({point.threads for point in report.points})
    figure = figure_class(figsize=(4.8 * len(threads), 3.8), layout="constrained")
    axes = figure.subplots(1, len(threads), sharey=True, squeeze=False)[0]
    series = [("hook", "o", report.points), ("layer", "s", report.points)]
    if report.compiled:
        series += [("hook", "^", report.compiled), ("layer", "v", report.compiled)]
    for ax, count in zip(axes, threads):
        shapes = [(p.batch, p.tokens) for p in report.points if p.threads == count and p.method == report.method]
        for index, (approach, marker, points) in enumerate(series):
            chosen = [p for p in points if p.threads == count and p.method == report.method]
            if not chosen:
                continue
            ratios = [p.ratio(approach) for p in chosen]
            x = [shapes.index((p.batch, p.tokens)) + (index - (len(series) - 1) / 2) * 0.12 for p in chosen]
            ax.errorbar(
                x,
                [r.median for r in ratios],
                yerr=[[r.median - r.q1 for r in ratios], [r.q3 - r.median for r in ratios]],
                fmt=marker,
                capsize=3,
                label=("compiled " if points is report.compiled else "") + approach,
            )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(TARGET, color="tab:red", linestyle="--", linewidth=0.8, label=f"target {TARGET}x")
        ax.set_xticks(range(len(shapes)), [f"{b}x{t}" for b, t in shapes])
        ax.set_xlabel("batch x tokens")
        ax.set_title(f"{count} thread{'s' if count > 1 else ''}")
    axes[0].set_ylabel("fused / plain median time")
    axes[-1].legend(fontsize="small")
    figure.suptitle(f"{report.method} at layer {report.layer}, {report.dtype} on {report.device} (bars: IQR)")
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def require_matplotlib() -> type:
    """matplotlib's `Figure` class, or a clear error saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ArgumentValueError(
            "the plot needs matplotlib, which is not installed: pip install 'layerfuse[bench]'"
        ) from None
    return Figure
