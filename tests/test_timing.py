"""Interleaved timing: what runs in which order, and the summaries. No duration is asserted."""

from __future__ import annotations

import pytest

from layerfuse.timing import Summary, paired_ratios, time_calls


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
