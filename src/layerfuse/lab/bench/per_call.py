"""The per-call protocol: a fusion made and removed around every forward, `with fuse(model, v, layer=k): model(**batch)`.

At batch 1 on one short text, the plain forward and the per-call forward of each approach, at positions
"all" and "tokens", run interleaved forward by forward on the same model, with nothing attached between
the calls; each ratio is the per-call forward's time over the plain one's in the same round. Also
`fuse()` + `remove()` alone, beside what adding and removing one forward hook costs on the same block.

>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> point = time_per_call(model, {"input_ids": torch.tensor([[1, 2, 3]])}, layer=1, threads=1, rounds=2)
>>> sorted(point.timings), sorted(point.attach)
(['hook', 'hook tokens', 'layer', 'layer tokens', 'plain'], ['hook', 'hook tokens', 'layer', 'layer tokens', 'one forward hook'])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerfuse.approaches import APPROACHES
from layerfuse.fusion import fuse
from layerfuse.sites import resolve_site

from ..compare import random_info
from ..timing import Interleaved, Summary, time_calls

TEXT = "Hello, how are you?"
"""The one text of the per-call forwards (batch 1)."""
ROUNDS = 200
"""Per-call forwards per variant: the median of 200 resolves a ratio of 1.02 at batch 1."""
ATTACH_CALLS = 1000
"""`fuse()` + `remove()` calls per variant when timed alone."""
POSITIONS = ("all", "tokens")


@dataclass(frozen=True)
class PerCall(Interleaved):
    """The per-call forwards at one thread count, round by round, and each variant's `fuse()` + `remove()` alone."""

    threads: int
    method: str
    seconds: dict[str, list[float]]
    attach: dict[str, Summary]
    """Seconds of one `fuse()` + `remove()` per variant (of 20 batches of calls: median and quartiles),
    and of adding and removing one forward hook on the fused block ("one forward hook")."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "method": self.method,
            "rounds": self.rounds,
            "seconds": {name: summary.to_dict() for name, summary in self.timings.items()},
            "ratio_to_plain": {name: self.ratio(name).to_dict() for name in self.seconds if name != "plain"},
            "fuse_remove_seconds": {name: summary.to_dict() for name, summary in self.attach.items()},
            "seconds_by_round": self.seconds,
        }


def variants() -> dict[str, tuple[str, str]]:
    """Per-call variant names and their (approach, positions): "hook", "layer", "hook tokens", "layer tokens"."""
    return {
        f"{approach}{'' if positions == 'all' else ' ' + positions}": (approach, positions)
        for positions in POSITIONS
        for approach in APPROACHES
    }


def _per_call(model: nn.Module, inputs: dict[str, torch.Tensor], make: Callable[[], Any]) -> None:
    with make():
        model(**inputs)


def time_per_call(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    layer: int,
    threads: int,
    method: str = "addition",
    arguments: dict[str, Any] | None = None,
    rounds: int = ROUNDS,
    attach_calls: int = ATTACH_CALLS,
) -> PerCall:
    """Time `rounds` forwards each of the plain model and of every per-call variant on `inputs`, interleaved;
    then `fuse()` + `remove()` of each variant alone, `attach_calls` times in 20 batches."""
    info = random_info(method, model.config.hidden_size, seed=0)
    makers = {
        name: functools.partial(
            fuse, model, info, layer=layer, method=method, approach=approach, positions=positions, **(arguments or {})
        )
        for name, (approach, positions) in variants().items()
    }
    calls = {"plain": functools.partial(model, **inputs)}
    calls |= {name: functools.partial(_per_call, model, inputs, make) for name, make in makers.items()}
    with torch.inference_mode():
        times = time_calls(calls, repeats=rounds, warmup=max(1, rounds // 10))
    block = resolve_site(model, layer=layer).module
    alone = {name: functools.partial(lambda make: make().remove(), make) for name, make in makers.items()}
    alone["one forward hook"] = lambda: block.register_forward_hook(_nothing).remove()
    batches = 20
    batch = max(1, attach_calls // batches)
    per_batch = time_calls(
        {name: functools.partial(_repeat, call, batch) for name, call in alone.items()}, repeats=batches
    )
    attach = {name: Summary.of([seconds / batch for seconds in spent]) for name, spent in per_batch.items()}
    return PerCall(threads, method, times, attach)


def _nothing(*_: object) -> None:
    return None


def _repeat(call: Callable[[], object], times: int) -> None:
    for _ in range(times):
        call()
