"""Compiled plain against compiled fused forwards: twins of the model sharing its weights, fused before compiling.

>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).eval()
>>> points, seconds = time_compiled(model, method="addition", layer=1, shapes=((1, 4),), threads=1, backend="eager")
>>> sorted(points[0].timings), sorted(seconds)
(['hook', 'layer', 'plain'], ['hook 1x4', 'layer 1x4', 'plain 1x4'])
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch
from torch import nn

from layerfuse.errors import MeasurementError

from ..timing import time_calls
from ..twins import side_by_side
from .grid import Point, forward, random_inputs, rounds_for, synchronizer, twin_fusions


def time_compiled(
    model: nn.Module, *, method: str, layer: int, shapes: Sequence[tuple[int, int]], threads: int, backend: str
) -> tuple[list[Point], dict[str, float]]:
    """Time compiled forwards at each of `shapes`; also the seconds of each variant's first call per shape.

    torch guards on module hooks here, so that the hook variant never runs the plain variant's graph;
    each compiled forward is checked against its eager forward before it is timed.
    """
    fusions = twin_fusions(method, layer)
    sync = synchronizer(next(model.parameters()).device)
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
            inputs = random_inputs(model, batch, tokens)
            for name, network in compiled.items():
                start = time.perf_counter()
                output = network(**inputs).last_hidden_state
                sync()
                compile_seconds[f"{name} {batch}x{tokens}"] = time.perf_counter() - start
                if not torch.allclose(output, networks[name](**inputs).last_hidden_state, rtol=1e-2, atol=1e-2):
                    raise MeasurementError(
                        f"the compiled {name} forward differs from the eager one at {batch}x{tokens}"
                    )
            calls = {name: functools.partial(forward, network, inputs, sync) for name, network in compiled.items()}
            rounds = rounds_for(batch, tokens)
            times = time_calls(calls, repeats=rounds, warmup=max(1, rounds // 10))
            points.append(Point(batch, tokens, threads, method, times))
    return points, compile_seconds
