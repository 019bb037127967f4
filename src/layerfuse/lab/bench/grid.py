"""The grid of `bench`: batch × tokens shapes and thread counts, the forwards timed at each point, and each
method's own cost there.

At a point, the plain forward, the hook, the custom layer and, where the fusion merges, the merged model
run interleaved forward by forward on twins of the model that share its weights (`time_point`; the
merged twin has its own copy of the parameters the merge changes); `time_cost` times a method's
`Fusion.apply` alone on a hidden state of the point's shape.

>>> [rounds_for(batch, tokens) for batch, tokens in SHAPES]
[80, 32, 16, 6]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerfuse.approaches import APPROACHES
from layerfuse.config import FusionConfig
from layerfuse.errors import ArgumentValueError, MergeError, positive_int
from layerfuse.fusion import Fusion, fuse
from layerfuse.merging import Merged, merge, producer_of
from layerfuse.methods import METHODS

from ..compare import random_info
from ..timing import Interleaved, Summary, time_calls
from ..twins import shared_copy, side_by_side

SHAPES = ((1, 8), (8, 64), (32, 128), (16, 512))
THREADS = (1, 2)
FIXED_METHODS = tuple(name for name, cls in METHODS.items() if not cls.learned)
METHOD_ARGUMENTS: dict[str, dict[str, float]] = {"scale": {"alpha": 0.5}, "clamp": {"value": 1.0}}
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


def check_shapes(shapes: Sequence[tuple[int, int]], name: str) -> None:
    """Raise unless `shapes` is a non-empty sequence of (batch, tokens) pairs of positive ints.

    >>> check_shapes(((1, 8), (2, 0)), "shapes")
    Traceback (most recent call last):
    ...
    layerfuse.errors.ArgumentValueError: tokens in shapes must be a positive int, got 0
    """
    if not shapes:
        raise ArgumentValueError(f"{name} must hold at least one (batch, tokens) pair, got {shapes!r}")
    for shape in shapes:
        if not isinstance(shape, Sequence) or len(shape) != 2:
            raise ArgumentValueError(f"{name} must be (batch, tokens) pairs, got {shape!r} in {shapes!r}")
        positive_int(f"batch in {name}", shape[0])
        positive_int(f"tokens in {name}", shape[1])


def check_threads(threads: Sequence[int]) -> None:
    """Raise unless `threads` is a non-empty sequence of positive ints."""
    if not threads:
        raise ArgumentValueError(f"threads must hold at least one thread count, got {threads!r}")
    for count in threads:
        positive_int("threads", count)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: `torch.cuda.synchronize` on CUDA, nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def random_inputs(model: nn.Module, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """Seeded token ids (batch, tokens) from the upper half of the vocabulary and a full attention mask."""
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    ids = torch.randint(vocab // 2, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}


def attach(model: nn.Module, method: str, layer: int, approach: str) -> Fusion:
    """`method` with seeded random info and its bench arguments, fused into `model` at `layer` by `approach`."""
    info = random_info(method, model.config.hidden_size, seed=0)
    return fuse(model, info, layer=layer, method=method, approach=approach, **METHOD_ARGUMENTS.get(method, {}))


def twin_fusions(method: str, layer: int) -> dict[str, Callable[[nn.Module], Fusion]]:
    """For `side_by_side`: per approach, what attaches the fusion to a twin."""
    return {a: functools.partial(attach, method=method, layer=layer, approach=a) for a in APPROACHES}


def attach_merged(twin: nn.Module, method: str, layer: int) -> Merged:
    """`attach`'s fusion merged into `twin`, whose parameters that the merge changes are first made its own copies."""
    config = FusionConfig(method=method, arguments=METHOD_ARGUMENTS.get(method, {}), layer=layer)
    producer = producer_of(twin, config)
    for name, parameter in list(producer.named_parameters(recurse=False)):
        setattr(producer, name, nn.Parameter(parameter.detach().clone(), requires_grad=parameter.requires_grad))
    return merge(twin, random_info(method, twin.config.hidden_size, seed=0), config)


def merges(model: nn.Module, method: str, layer: int) -> bool:
    """Whether `attach`'s fusion merges into `model` (tried on a twin; `model` is left as it was)."""
    try:
        attach_merged(shared_copy(model), method, layer).unmerge()
    except MergeError:
        return False
    return True


def forward(network: Callable[..., Any], inputs: dict[str, torch.Tensor], sync: Callable[[], None]) -> None:
    """One forward of `network` on `inputs`, waited for."""
    network(**inputs)
    sync()


def time_point(model: nn.Module, batch: int, tokens: int, threads: int, method: str, layer: int, rounds: int) -> Point:
    """Time `rounds` forwards each of the plain model, the hook, the custom layer and the merged model at one point.

    The fusions sit on twins of the model that share its weights (`side_by_side`), so the
    forwards alternate call by call, in an order that turns round by round, with nothing attached or
    removed between them: each fused forward is paired with a plain one a moment apart, in the steady
    state of a user's loop of forwards.
    """
    inputs = random_inputs(model, batch, tokens)
    sync = synchronizer(next(model.parameters()).device)
    fusions: dict[str, Callable[[nn.Module], Any]] = {**twin_fusions(method, layer)}
    if merges(model, method, layer):
        fusions["merged"] = functools.partial(attach_merged, method=method, layer=layer)
    with torch.inference_mode(), side_by_side(model, fusions) as networks:
        calls = {name: functools.partial(forward, network, inputs, sync) for name, network in networks.items()}
        times = time_calls(calls, repeats=rounds, warmup=max(1, rounds // 10))
    return Point(batch, tokens, threads, method, times)


def time_cost(model: nn.Module, method: str, layer: int, batch: int, tokens: int, plain: Point) -> Cost:
    """Time `Fusion.apply` alone on a random hidden state of shape (batch, tokens, H)."""
    weight = next(model.parameters())
    hidden = torch.randn(batch, tokens, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
    sync = synchronizer(weight.device)
    repeats = 4 * rounds_for(batch, tokens)
    with torch.inference_mode(), attach(model, method, layer, "hook") as fusion:

        def apply() -> None:
            fusion.apply(hidden)
            sync()

        seconds = time_calls({"apply": apply}, repeats=repeats, warmup=max(1, repeats // 10))["apply"]
    return Cost(method, batch, tokens, plain.threads, Summary.of(seconds), plain.timings["plain"].median)
