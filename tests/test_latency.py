"""Latency statistics come from the raw replicates that torch.utils.benchmark produced."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from qna_bench.budget import PointBudget, PointTimeout
from qna_bench.measure.latency import LatencyStats, measure_interleaved


def test_statistics_are_computed_from_the_raw_samples():
    samples = [0.5, 0.1, 0.4, 0.2, 0.3, 0.9]
    stats = LatencyStats.from_times(samples)
    assert stats.times_s == tuple(samples)
    assert stats.median_s == pytest.approx(statistics.median(samples))
    assert stats.q25_s == pytest.approx(np.quantile(samples, 0.25))
    assert stats.q75_s == pytest.approx(np.quantile(samples, 0.75))
    assert stats.min_s == 0.1
    assert stats.mean_s == pytest.approx(sum(samples) / 6)
    assert stats.n == 6


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="times_s"):
        LatencyStats.from_times([])


def test_the_alarm_stops_a_call_that_runs_past_the_budget():
    budget = PointBudget(0.3)
    start = time.perf_counter()
    with pytest.raises(PointTimeout, match="ran past"), budget.alarm():
        for _ in range(100):
            time.sleep(0.05)
    assert time.perf_counter() - start < 1.0


def test_interleaved_timing_alternates_blocks_rotating_who_goes_first():
    order = []
    fns = [lambda name=name: (order.append(name), time.sleep(0.002)) for name in "abc"]
    stats = measure_interleaved(fns, threads=1, one_call_s=[0.002] * 3, min_run_time_s=0.0, min_replicates=3)
    # One block (one call here) of each per pass; pass p starts at callable p.
    assert "".join(order) == "abc" + "bca" + "cab"
    assert [s.n for s in stats] == [3, 3, 3] and all(s.number_per_run == 1 for s in stats)
    assert all(s.min_s >= 0.002 for s in stats)


def test_interleaved_blocks_hold_enough_calls_to_fill_the_minimum_run_time():
    calls = {"fast": 0, "slow": 0}

    def fast() -> None:
        calls["fast"] += 1

    def slow() -> None:
        calls["slow"] += 1
        time.sleep(0.02)

    fast_stats, slow_stats = measure_interleaved([fast, slow], threads=1, one_call_s=[1e-3, 0.02],
                                                 min_run_time_s=0.04, min_replicates=2)
    # Blocks of 0.04 / (2 × 1 ms) = 20 fast calls; a slow call outlasts its share and is a block alone.
    assert fast_stats.number_per_run == 20 and slow_stats.number_per_run == 1
    assert calls == {"fast": 40, "slow": 2}  # no untimed calls: the first call, timed before, warmed up


def test_an_interleaved_run_over_its_budget_stops_before_any_call():
    calls = []
    with pytest.raises(PointTimeout, match="budget"):
        measure_interleaved([lambda: calls.append(1)] * 2, threads=1, one_call_s=[0.3, 0.3], min_run_time_s=0.0,
                            min_replicates=3, budget=PointBudget(1.0))
    assert calls == []
