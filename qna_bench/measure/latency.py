"""Latency with `torch.utils.benchmark`: warm-up, thread count and CUDA synchronisation are its job;
ours is to keep every replicate and derive the statistics from them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch.utils.benchmark as torch_benchmark


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


class PointTimeout(Exception):
    """A point would exceed its time budget; carries what was measured before stopping."""

    def __init__(self, message: str, partial: LatencyStats):
        super().__init__(message)
        self.partial = partial


def measure_latency(
    fn: Callable[[], object],
    *,
    threads: int,
    min_run_time_s: float = 1.0,
    budget_s: float | None = None,
    label: str = "",
) -> LatencyStats:
    """Time ``fn`` with ``Timer.blocked_autorange``.

    With a ``budget_s``, one first call estimates the cost; if the full measurement (that call, the
    autorange calibration and ``min_run_time_s`` of replicates) would not fit, `PointTimeout` is raised
    carrying that first call as a single replicate, so one huge point cannot stall a sweep.
    """
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
    if budget_s is not None:
        start = time.perf_counter()
        first = timer.timeit(number=1).times[0]
        # blocked_autorange runs at least one calibration call and enough blocks to reach min_run_time.
        projected = (time.perf_counter() - start) + first + max(min_run_time_s, first)
        if projected > budget_s:
            partial = LatencyStats.from_times([first])
            raise PointTimeout(
                f"one call took {first:.3g} s; measuring would take about {projected:.3g} s, "
                f"over the per-point budget of {budget_s:g} s",
                partial,
            )
    measurement = timer.blocked_autorange(min_run_time=min_run_time_s)
    times = [t for t in measurement.times if math.isfinite(t)]
    return LatencyStats.from_times(times, number_per_run=measurement.number_per_run)
