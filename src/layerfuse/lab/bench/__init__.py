"""`bench`: the cost of a fused forward against the plain one, over a grid of shapes and thread counts.

For each batch × tokens shape and thread count, the plain forward, the hook, the custom layer and,
where the fusion merges (`layerfuse.merge`), the merged model, a plain model whose cost is the plain
forward's, run interleaved forward by forward on twins of the model that share its weights, after warm-up rounds; the
report gives medians, interquartile ranges and each fused forward's time over the plain one's in the
same round. Every fixed method also runs end to end at the smallest shape, and alone (its
`Fusion.apply` on a hidden state of each shape), as a share of the plain forward. Beside this
attached-once protocol, the per-call one (`per_call`): a fusion made and removed around every forward
at batch 1, and `fuse()` + `remove()` alone. Also the tensor
memory of one forward per variant (its peak and its total), each in a fresh process; optionally
`torch.compile`d plain against compiled fused forwards.

>>> report = bench(shapes=((1, 4),), threads=(1,), methods=("addition",), rounds=1, memory=False)
>>> [(point.batch, point.tokens, sorted(point.timings)) for point in report.points]
[(1, 4, ['hook', 'layer', 'merged', 'plain'])]
>>> [(point.threads, point.rounds) for point in report.per_call]
[(1, 1)]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from layerfuse.errors import ArgumentValueError, positive_int
from layerfuse.methods import METHODS, canonical_name
from layerfuse.models import load_model, model_label
from layerfuse.sites import middle_layer, resolve_site

from .compiled import time_compiled
from .grid import (
    DTYPES,
    FIXED_METHODS,
    METHOD_ARGUMENTS,
    SHAPES,
    THREADS,
    Cost,
    Point,
    check_shapes,
    check_threads,
    parse_device,
    rounds_for,
    time_cost,
    time_point,
)
from .memory import measure_memory
from .per_call import TEXT, PerCall, time_per_call
from .plot import plot, require_matplotlib
from .report import GRID_VARIANTS, Report, environment, per_call_row, point_row

__all__ = [
    "DTYPES",
    "FIXED_METHODS",
    "SHAPES",
    "THREADS",
    "Cost",
    "PerCall",
    "Point",
    "Report",
    "bench",
    "environment",
    "measure_memory",
    "parse_device",
    "plot",
    "require_matplotlib",
    "rounds_for",
]


def _check_positions(network: torch.nn.Module, shapes: Sequence[tuple[int, int]]) -> None:
    """Refuse shapes with more tokens than the model has positions."""
    positions = getattr(network.config, "max_position_embeddings", None)
    longest = max(shapes, key=lambda shape: shape[1])
    if positions is not None and longest[1] > positions:
        raise ArgumentValueError(
            f"shape {longest[0]}x{longest[1]} has more tokens than this model's {positions} positions: "
            f"use at most {positions} tokens"
        )


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
    per_call: bool = True,
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
    `rounds_for` (and the per-call protocol's 200). `per_call` times the per-call protocol at every thread
    count (batch 1, `per_call.TEXT`). `memory` measures tensor memory at the largest shape, in fresh processes;
    `compiled` adds forwards compiled by `compile_backend` at `compile_shapes`, with the most threads.
    """
    start = time.perf_counter()
    parsed_device, parsed_dtype = parse_device(device, dtype)
    check_shapes(shapes, "shapes")
    check_shapes(method_shapes, "method_shapes")
    check_shapes(compile_shapes, "compile_shapes")
    check_threads(threads)
    if rounds is not None:
        positive_int("rounds", rounds)
    method = canonical_name(method)
    methods = list(dict.fromkeys(canonical_name(m) for m in methods))
    learned = [m for m in [method, *methods] if METHODS[m].learned]
    if learned:
        raise ArgumentValueError(f"bench times fixed methods; {', '.join(learned)} must be trained first")
    network, tokenizer = load_model(model)
    network = network.to(device=parsed_device, dtype=parsed_dtype)
    _check_positions(network, [*shapes, *method_shapes, *(compile_shapes if compiled else ())])
    layer = resolve_site(network, layer=middle_layer(network) if layer is None else layer).layer
    previous_threads = torch.get_num_threads()
    points: list[Point] = []
    costs: list[Cost] = []
    per_calls: list[PerCall] = []
    try:
        for count in threads:
            torch.set_num_threads(count)
            for batch, tokens in shapes:
                rounds_here = rounds or rounds_for(batch, tokens)
                point = time_point(network, batch, tokens, count, method, layer, rounds_here)
                points.append(point)
                progress(point_row(point, GRID_VARIANTS))
                for other in methods:
                    if other != method and (batch, tokens) in method_shapes:
                        points.append(time_point(network, batch, tokens, count, other, layer, rounds_here))
                        progress(point_row(points[-1], GRID_VARIANTS))
                    costs.append(time_cost(network, other, layer, batch, tokens, point))
            if per_call:
                inputs = {key: value.to(parsed_device) for key, value in tokenizer([TEXT], return_tensors="pt").items()}
                per_calls.append(
                    time_per_call(
                        network,
                        inputs,
                        layer=layer,
                        threads=count,
                        method=method,
                        arguments=METHOD_ARGUMENTS.get(method),
                        **({} if rounds is None else {"rounds": rounds, "attach_calls": rounds}),
                    )
                )
                progress(per_call_row(per_calls[-1]))
        compiled_points, compile_seconds = [], {}
        if compiled:
            torch.set_num_threads(max(threads))
            compiled_points, compile_seconds = time_compiled(
                network,
                method=method,
                layer=layer,
                shapes=compile_shapes,
                threads=max(threads),
                backend=compile_backend,
            )
    finally:
        torch.set_num_threads(previous_threads)
    peak = None
    if memory:
        batch, tokens = max(shapes, key=lambda shape: shape[0] * shape[1])
        peak = measure_memory(
            model,
            method=method,
            layer=layer,
            batch=batch,
            tokens=tokens,
            threads=max(threads),
            device=device,
            dtype=dtype,
            hidden_size=network.config.hidden_size,
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
        per_call=per_calls,
        memory=peak,
        compiled=compiled_points,
        compile_seconds=compile_seconds,
        seconds=time.perf_counter() - start,
    )
