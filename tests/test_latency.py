"""Latency statistics come from the raw replicates that torch.utils.benchmark produced."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from qna_bench.budget import PointBudget, PointTimeout
from qna_bench.measure.latency import SINGLE_CALL_BLOCK_S, LatencyStats, measure_latency


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


def test_measure_latency_keeps_every_replicate():
    stats = measure_latency(lambda: sum(range(1000)), threads=1, min_run_time_s=0.05)
    assert stats.n == len(stats.times_s) >= 1
    assert stats.median_s == pytest.approx(float(np.median(stats.times_s)))
    assert stats.number_per_run >= 1


def test_slow_calls_are_topped_up_to_the_minimum_replicates():
    stats = measure_latency(lambda: time.sleep(0.03), threads=1, min_run_time_s=0.01, min_replicates=5)
    # torch's block-size estimate may put 1 or 10 calls in a block (it was 10 once on a fresh machine);
    # either way each replicate is one call's mean and there are at least the minimum of them.
    assert stats.n >= 5 and stats.number_per_run >= 1
    assert stats.min_s >= 0.03


def test_a_point_over_its_budget_stops_with_what_it_measured():
    with pytest.raises(PointTimeout) as caught:
        measure_latency(lambda: time.sleep(0.2), threads=1, min_run_time_s=1.0, budget=PointBudget(0.5))
    assert caught.value.one_call_s >= 0.2
    assert "budget" in str(caught.value)


def test_the_alarm_stops_a_call_that_runs_past_the_budget():
    budget = PointBudget(0.3)
    start = time.perf_counter()
    with pytest.raises(PointTimeout, match="ran past"), budget.alarm():
        for _ in range(100):
            time.sleep(0.05)
    assert time.perf_counter() - start < 1.0


def test_a_call_timed_beforehand_sizes_the_run_so_slow_layers_need_no_extra_warm_ups():
    calls = []

    def slow() -> None:
        calls.append(None)
        time.sleep(0.03)

    stats = measure_latency(slow, threads=1, min_run_time_s=0.01, min_replicates=4, one_call_s=0.03)
    assert stats.n >= 4
    # Untimed calls: blocked_autorange's block-size estimate (1 + 10 + … + number_per_run calls) and, only
    # when torch picks blocks of several calls (a noisy overhead estimate), two warm-ups per top-up block.
    # Single-call blocks get their replicates without `Timer.timeit`'s warm-ups.
    untimed = len(calls) - stats.n * stats.number_per_run
    top_up_warm_ups = 0 if stats.number_per_run == 1 else 2 * stats.n
    assert untimed <= (10 * stats.number_per_run - 1) // 9 + top_up_warm_ups, (untimed, stats)


def test_a_call_that_is_a_block_of_its_own_runs_no_untimed_call():
    calls = []

    def slow() -> None:
        calls.append(None)
        time.sleep(SINGLE_CALL_BLOCK_S)

    stats = measure_latency(slow, threads=1, min_run_time_s=0.01, min_replicates=3, one_call_s=SINGLE_CALL_BLOCK_S)
    assert stats.number_per_run == 1 and stats.n >= 3
    assert len(calls) == stats.n
