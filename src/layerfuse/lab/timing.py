"""Time several calls interleaved round by round, and summarise with medians and paired ratios.

>>> times = time_calls({"plain": lambda: sum(range(100))}, repeats=3)
>>> len(times["plain"])
3
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


def time_calls(calls: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each of `calls`, once per round for `repeats` rounds after `warmup` untimed ones.

    Each round runs every call once, starting one further along each time, so that drift in the
    machine's speed falls on all of them alike.

    >>> sorted(time_calls({"a": lambda: None, "b": lambda: None}, repeats=2))
    ['a', 'b']
    """

    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            seconds = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def paired_ratio(seconds: list[float], reference: list[float]) -> Summary:
    """`seconds` over `reference`'s in the same round, summarised over the rounds.

    Pairing by round cancels drift that a ratio of medians keeps.

    >>> paired_ratio([1.1, 2.2], [1.0, 2.0]).median
    1.1
    """
    return Summary.of([spent / base for spent, base in zip(seconds, reference, strict=True)])


class Interleaved:
    """Base of a result that holds what `time_calls` measured: `seconds`, each variant's round by round.

    One of the variants is "plain", the reference of every ratio.
    """

    seconds: dict[str, list[float]]

    @property
    def rounds(self) -> int:
        return len(self.seconds["plain"])

    @property
    def timings(self) -> dict[str, Summary]:
        """Median and quartiles of each variant's seconds."""
        return {name: Summary.of(seconds) for name, seconds in self.seconds.items()}

    def ratio(self, variant: str) -> Summary:
        """`variant`'s seconds over the plain forward's in the same round: median and quartiles."""
        return paired_ratio(self.seconds[variant], self.seconds["plain"])


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
