"""Tensor memory of one forward per variant, plain, hook and layer, each measured in a fresh process.

A fresh process per variant keeps what one forward allocated (caches, the allocator's pools) out of the
next one's figures. On the CPU the bytes come from the profiler's memory events, on CUDA from the
allocator's statistics.

>>> memory = Memory(1, 8, "addition", {"plain": 100, "hook": 100}, {"plain": 900, "hook": 1000}, 64)
>>> memory.extra("hook"), memory.extra_allocated("hook")
(0, 100)
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from layerfuse.approaches import APPROACHES
from layerfuse.errors import MeasurementError
from layerfuse.models import load_model

from .grid import DTYPES, attach, random_inputs


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


def forward_memory(
    model: str | None,
    variant: str,
    method: str,
    layer: int,
    batch: int,
    tokens: int,
    threads: int,
    device: str,
    dtype: str,
) -> tuple[int, int]:
    """Peak and total bytes of the tensors one forward of `variant` allocates, after a small warm-up forward.

    On CPU from the profiler's memory events, on CUDA from the allocator's statistics. `measure_memory`
    runs it in a fresh process per variant.
    """
    torch.set_num_threads(threads)
    network = load_model(model)[0].to(device=device, dtype=DTYPES[dtype])
    inputs = random_inputs(network, batch, tokens)
    fusion = nullcontext() if variant == "plain" else attach(network, method, layer, variant)
    with torch.inference_mode(), fusion:
        network(**random_inputs(network, 1, 8))
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
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
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
    code = (
        f"import json, sys; from {forward_memory.__module__} import forward_memory; "
        "print(*forward_memory(**json.loads(sys.argv[1])))"
    )
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
            raise MeasurementError(f"the {variant} memory probe failed:\n{err}")
        peak[variant], allocated[variant] = (int(number) for number in out.split()[-2:])
    return Memory(batch, tokens, method, peak, allocated, batch * tokens * hidden_size * DTYPES[dtype].itemsize)
