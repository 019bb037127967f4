"""The plot of a `bench` report: each fused forward's median over the plain one, with IQR bars.

matplotlib, an optional extra (`layerfuse[bench]`), is imported only when a plot is asked for.

>>> require_matplotlib().__name__
'Figure'
"""

from __future__ import annotations

import os
from pathlib import Path

from layerfuse.errors import ArgumentValueError

from .report import TARGET, Report


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
