"""Latency with `torch.utils.benchmark`: warm-up, thread count and CUDA synchronisation are its job;
ours is to keep every replicate and derive the statistics from them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch.utils.benchmark as torch_benchmark

from qna_bench.budget import PointBudget


@dataclass(frozen=True)
class LatencyStats:
    """Seconds per call. ``times_s`` are the raw replicates (each the mean of ``number_per_run`` calls)."""

    times_s: tuple[float, ...]
    number_per_run: int
    median_s: float
    q25_s: float
    q75_s: float
    min_s: float
    mean_s: float
    n: int

    @classmethod
    def from_times(cls, times_s: list[float] | tuple[float, ...], number_per_run: int = 1) -> LatencyStats:
        if not times_s:
            raise ValueError("times_s: need at least one replicate")
        samples = np.asarray(times_s, dtype=np.float64)
        q25, median, q75 = np.quantile(samples, [0.25, 0.5, 0.75])
        return cls(
            times_s=tuple(float(t) for t in samples),
            number_per_run=number_per_run,
            median_s=float(median),
            q25_s=float(q25),
            q75_s=float(q75),
            min_s=float(samples.min()),
            mean_s=float(samples.mean()),
            n=len(samples),
        )


def measure_latency(
    fn: Callable[[], object],
    *,
    threads: int,
    min_run_time_s: float = 1.0,
    min_replicates: int = 1,
    budget: PointBudget | None = None,
    label: str = "",
) -> LatencyStats:
    """Time ``fn`` with ``Timer.blocked_autorange``, topped up to ``min_replicates`` replicates.

    A slow call gets one replicate from ``blocked_autorange`` when it alone fills ``min_run_time_s``;
    extra blocks of the same size make the median and IQR mean something. With a ``budget``, one timed
    call first estimates the cost; if the measurement would not fit in what is left, `PointTimeout` is
    raised carrying that call, so one huge point cannot stall a sweep.
    """
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
    if budget is not None:
        first = timer.timeit(number=1).times[0]
        budget.check(first, calls_left=1 + min_replicates, extra_s=min_run_time_s)
    measurement = timer.blocked_autorange(min_run_time=min_run_time_s)
    times = [t for t in measurement.times if math.isfinite(t)]
    while len(times) < min_replicates:
        times.extend(timer.timeit(number=measurement.number_per_run).times)
    return LatencyStats.from_times(times, number_per_run=measurement.number_per_run)
