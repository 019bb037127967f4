"""Time one call under several variants, interleaved round by round, and summarise with medians.

>>> from contextlib import nullcontext
>>> times = time_interleaved(lambda: sum(range(100)), {"plain": nullcontext}, repeats=3)
>>> len(times["plain"])
3
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass


def time_interleaved(
    run: Callable[[], object],
    variants: Mapping[str, Callable[[], AbstractContextManager[object]]],
    *,
    repeats: int,
    warmup: int = 1,
    settle: int = 0,
    calls: int = 1,
) -> dict[str, list[float]]:
    """Seconds of `run()` inside each variant's context: `calls` per round, `repeats` rounds after `warmup`.

    Every round enters each variant's context once, starting one further along each time, so that
    drift in the machine's speed falls on all variants alike. Entering and leaving the context is
    not timed, nor are the `settle` calls run in it before the timed ones: the first call after
    entering a context can pay for waking threads and refilling caches, which a loop of calls does not.
    """

    def timed(name: str) -> list[float]:
        with variants[name]():
            for _ in range(settle):
                run()
            seconds = []
            for _ in range(calls):
                start = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - start)
            return seconds

    return _rounds(list(variants), timed, repeats, warmup)


def time_calls(calls: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each of `calls`, interleaved round by round as `time_interleaved` runs its variants.

    >>> sorted(time_calls({"a": lambda: None, "b": lambda: None}, repeats=2))
    ['a', 'b']
    """

    def timed(name: str) -> list[float]:
        start = time.perf_counter()
        calls[name]()
        return [time.perf_counter() - start]

    return _rounds(list(calls), timed, repeats, warmup)


def _rounds(names: list[str], timed: Callable[[str], list[float]], repeats: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed(name)
            if round_ >= warmup:
                times[name] += seconds
    return times


def paired_ratios(times: Mapping[str, list[float]], reference: str) -> dict[str, Summary]:
    """Each variant's seconds over `reference`'s in the same round, summarised over the rounds.

    Pairing by round cancels drift that a ratio of medians keeps.

    >>> paired_ratios({"plain": [1.0, 2.0], "fused": [1.1, 2.2]}, "plain")["fused"].median
    1.1
    """
    return {
        name: Summary.of([spent / base for spent, base in zip(seconds, times[reference], strict=True)])
        for name, seconds in times.items()
    }


@dataclass(frozen=True)
class Summary:
    """Median and interquartile range of a list of seconds."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, seconds: list[float]) -> Summary:
        if len(seconds) < 2:
            return cls(seconds[0], seconds[0], seconds[0])
        q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
        return cls(median, q1, q3)

    def to_dict(self) -> dict[str, float]:
        """Median and quartiles, in the summary's unit."""
        return {"median": self.median, "q1": self.q1, "q3": self.q3}
