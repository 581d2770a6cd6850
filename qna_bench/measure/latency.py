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


# A call this slow is a block of its own: torch's estimate picks 1 call per block once a call outlasts
# 10⁴ × the timer's overhead (~2 µs here) and min_run_time / 1000.
SINGLE_CALL_BLOCK_S = 0.05


class _SingleCallBlockTimer(torch_benchmark.Timer):
    """`Timer` whose ``blocked_autorange`` knows its block is one call, so it skips the size estimate:
    one more untimed call of a slow layer, after the caller's own warm-up."""

    def _estimate_block_size(self, min_run_time: float) -> int:
        return 1


def measure_latency(
    fn: Callable[[], object],
    *,
    threads: int,
    min_run_time_s: float = 1.0,
    min_replicates: int = 1,
    one_call_s: float | None = None,
    budget: PointBudget | None = None,
    label: str = "",
) -> LatencyStats:
    """Time ``fn`` with ``Timer.blocked_autorange`` for at least ``min_replicates`` replicates.

    ``one_call_s``, a call already timed after or as the warm-up (the runner's first call), sizes the
    run up front: the autorange lasts about ``min_replicates`` such calls, so a slow layer gets its
    replicates from one autorange and no extra warm-ups (each ``Timer.timeit`` warms up with two calls
    of its own, and the block-size estimate is skipped when a call is a block). Without it one call is
    timed first. With a ``budget``, a measurement that would not fit in what is left
    raises `PointTimeout` carrying that call, so one huge point cannot stall a sweep.
    """
    timer_class = torch_benchmark.Timer
    if one_call_s is not None and one_call_s >= SINGLE_CALL_BLOCK_S:
        timer_class = _SingleCallBlockTimer
    timer = timer_class(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
    if one_call_s is None:
        one_call_s = timer.timeit(number=1).times[0]
    # Half a call short of the replicates, so that blocks a little faster or slower than ``one_call_s``
    # still stop at ``min_replicates`` (for 3: from 17 % faster to 25 % slower).
    run_time_s = max(min_run_time_s, (min_replicates - 0.5) * one_call_s)
    if budget is not None:
        estimate_calls = 0 if isinstance(timer, _SingleCallBlockTimer) else 1
        budget.check(one_call_s, calls_left=estimate_calls + min_replicates, extra_s=max(0.0, min_run_time_s - min_replicates * one_call_s))
    measurement = timer.blocked_autorange(min_run_time=run_time_s)
    times = [t for t in measurement.times if math.isfinite(t)]
    number = measurement.number_per_run
    while len(times) < min_replicates:
        times.extend(t for t in _more_blocks(timer, number, min_replicates - len(times), max(times)) if math.isfinite(t))
    return LatencyStats.from_times(times, number_per_run=measurement.number_per_run)


def _more_blocks(timer: torch_benchmark.Timer, number: int, missing: int, call_s: float) -> list[float]:
    """``missing`` more blocks of ``number`` calls, by the cheaper of the Timer's two ways.

    ``blocked_autorange`` re-estimates the block size (about 1.1 blocks of calls), ``timeit`` warms up
    with ``max(number // 100, 2)`` calls per block: for single-call blocks of a slow layer the first
    is cheaper, for blocks of many fast calls the second.
    """
    if number == 1:
        return list(timer.blocked_autorange(min_run_time=missing * call_s).times)
    return [timer.timeit(number=number).times[0] for _ in range(missing)]
