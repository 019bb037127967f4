"""Interleaved timing: what runs in which order, and the summaries. No duration is asserted."""

from __future__ import annotations

import pytest

from layerfuse.lab.timing import Summary, paired_ratio, time_calls


def test_time_calls_interleaves_and_drops_warmup():
    order: list[str] = []
    times = time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=2)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(seconds) == 2 and min(seconds) >= 0 for seconds in times.values())


def test_paired_ratio_cancels_drift():
    plain = [1.0, 2.0, 4.0, 8.0, 16.0]  # the machine slows down round by round
    fused = [1.01 * t for t in plain]
    assert paired_ratio(plain, plain) == Summary(1.0, 1.0, 1.0)
    ratio = paired_ratio(fused, plain)
    assert ratio.median == pytest.approx(1.01) and ratio.q3 - ratio.q1 < 1e-12
    with pytest.raises(ValueError):
        paired_ratio(fused[:-1], plain)


def test_summary_quartiles():
    assert Summary.of([3.0, 1.0, 2.0, 5.0, 4.0]) == Summary(3.0, 2.0, 4.0)
    assert Summary.of([7.0]) == Summary(7.0, 7.0, 7.0)
