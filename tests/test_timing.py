"""Interleaved timing: what runs in which context, and the summaries. No duration is asserted."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from layerfuse.timing import Summary, paired_ratios, time_calls, time_interleaved


def test_settle_calls_run_inside_the_context_and_are_not_timed():
    log: list[tuple[str, str]] = []
    current = ["none"]

    def variant(name: str):
        @contextmanager
        def context():
            current[0] = name
            log.append((name, "enter"))
            yield
            log.append((name, "exit"))
            current[0] = "none"

        return context

    times = time_interleaved(lambda: log.append((current[0], "call")), {"a": variant("a"), "b": variant("b")},
                             repeats=3, warmup=1, settle=2, calls=3)
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 9, "b": 9}
    assert ("none", "call") not in log
    entries = [name for name, event in log if event == "enter"]
    assert entries == ["a", "b", "b", "a", "a", "b", "b", "a"]  # each round starts one further along
    for start in range(0, len(log), 7):  # enter, 2 settle calls, 3 timed calls, exit
        name = log[start][0]
        assert log[start:start + 7] == [(name, "enter"), *[(name, "call")] * 5, (name, "exit")]


def test_time_calls_interleaves_and_drops_warmup():
    order: list[str] = []
    times = time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=2)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(seconds) == 2 and min(seconds) >= 0 for seconds in times.values())


def test_paired_ratios_cancel_drift():
    plain = [1.0, 2.0, 4.0, 8.0, 16.0]  # the machine slows down round by round
    fused = [1.01 * t for t in plain]
    ratios = paired_ratios({"plain": plain, "fused": fused}, "plain")
    assert ratios["plain"] == Summary(1.0, 1.0, 1.0)
    assert ratios["fused"].median == pytest.approx(1.01) and ratios["fused"].q3 - ratios["fused"].q1 < 1e-12
    with pytest.raises(ValueError):
        paired_ratios({"plain": plain, "fused": fused[:-1]}, "plain")


def test_summary_quartiles():
    assert Summary.of([3.0, 1.0, 2.0, 5.0, 4.0]) == Summary(3.0, 2.0, 4.0)
    assert Summary.of([7.0]) == Summary(7.0, 7.0, 7.0)
