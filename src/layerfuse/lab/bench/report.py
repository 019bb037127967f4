"""Everything `bench` measured, with the setting it measured it in: as JSON, or as Markdown tables.

>>> environment(torch.device("cpu"))["device"]
'cpu'
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from layerfuse.approaches import APPROACHES

from ..timing import Summary
from .grid import Cost, Point
from .memory import Memory
from .per_call import TEXT, PerCall, variants

GRID_VARIANTS = (*APPROACHES, "merged")
"""The eager grid's fused variants: the approaches, and the merged model where the fusion merges."""

TARGET = 1.02
"""The largest fused / plain median the grid aims for."""


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
    per_call: list[PerCall] = field(default_factory=list)
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
            "per_call": [point.to_dict() for point in self.per_call],
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
            "| batch x tokens | threads | method | timed | plain median (IQR) | hook / plain (IQR) | layer / plain (IQR) "
            "| merged / plain (IQR) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [point_row(point, GRID_VARIANTS) for point in self.points]
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
        if self.per_call:
            names = list(variants())
            lines += [
                "",
                f"Per call: `with fuse(model, v, layer={self.layer}): model(**batch)` around every forward, batch 1 "
                f"({TEXT!r}), interleaved with the plain forward; ratios to it (IQR), and `fuse()` + `remove()` alone:",
                "",
                "| threads | timed | plain median (IQR) | " + " | ".join(f"{name} / plain" for name in names) + " |",
                "|---|---|---|" + "---|" * len(names),
            ]
            lines += [per_call_row(point) for point in self.per_call]
            lines += [
                "",
                "| threads | "
                + " | ".join(f"fuse+remove, {name}" for name in names)
                + " | one forward hook, add+remove |",
                "|---|" + "---|" * (len(names) + 1),
            ]
            lines += [
                f"| {point.threads} | "
                + " | ".join(_spread(point.attach[name]) for name in [*names, "one forward hook"])
                + " |"
                for point in self.per_call
            ]
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
                extras = (
                    ("-", "-")
                    if name == "plain"
                    else (_signed_mib(memory.extra(name)), _signed_mib(memory.extra_allocated(name)))
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
            lines += [point_row(point) for point in self.compiled]
            lines += [
                "",
                "Compile seconds (first call, per shape): "
                + ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.compile_seconds.items()),
            ]
        return "\n".join(lines)


def point_row(point: Point, variants: tuple[str, ...] = APPROACHES) -> str:
    """One grid point as a row of the report's Markdown table: the ratio of each of `variants` ("-" where absent)."""
    ratios = " | ".join(_ratio_cell(point, variant) for variant in variants)
    return (
        f"| {point.batch} x {point.tokens} | {point.threads} | {point.method} | {point.rounds} | "
        f"{_spread(point.timings['plain'])} | {ratios} |"
    )


def per_call_row(point: PerCall) -> str:
    """One thread count of the per-call protocol as a row of the report's Markdown table."""
    ratios = " | ".join(f"{r.median:.3f}x ({r.q1:.3f}-{r.q3:.3f})" for r in (point.ratio(name) for name in variants()))
    return f"| {point.threads} | {point.rounds} | {_spread(point.timings['plain'])} | {ratios} |"


def _ratio_cell(point: Point, variant: str) -> str:
    if variant not in point.seconds:
        return "-"
    ratio = point.ratio(variant)
    return f"{ratio.median:.3f}x ({ratio.q1:.3f}-{ratio.q3:.3f})"


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


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def _spread(summary: Summary) -> str:
    """Median and IQR in one unit: ms, or us below a millisecond."""
    scale, unit, digits = (1e3, "ms", 2) if summary.median >= 1e-3 else (1e6, "us", 0)
    return (
        f"{summary.median * scale:.{digits}f} {unit} ({summary.q1 * scale:.{digits}f}-{summary.q3 * scale:.{digits}f})"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _signed_mib(size: int) -> str:
    return f"{size / 2**20:+.2f} MiB"
