"""Latency with `torch.utils.benchmark`: warm-up, thread count and CUDA synchronisation are its job;
ours is to keep every replicate and derive the statistics from them, and to time the layers of one point
in alternating blocks (`measure_interleaved`), so that a ratio's two sides share every slow spell."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch.utils.benchmark as torch_benchmark

from qna_bench.budget import PointBudget
from qna_bench.rounds import rotated


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


class _FixedBlockTimer(torch_benchmark.Timer):
    """`Timer` whose blocks are ``number`` calls, chosen by the caller: ``blocked_autorange(min_run_time=0)``
    then times exactly one block, with no untimed calls of its own."""

    def __init__(self, *args, number: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.number = number

    def _estimate_block_size(self, min_run_time: float) -> int:
        return self.number


def measure_interleaved(
    fns: Sequence[Callable[[], object]],
    *,
    threads: int,
    one_call_s: Sequence[float],
    min_run_time_s: float = 1.0,
    min_replicates: int = 1,
    budget: PointBudget | None = None,
    labels: Sequence[str] = (),
) -> list[LatencyStats]:
    """Time several callables in alternating blocks: ``min_replicates`` passes, each timing one block of
    every callable, pass p starting at callable p (mod their count). Each callable's blocks hold the calls
    that make its ``min_replicates`` blocks last about ``max(min_run_time_s, min_replicates × one call)``,
    ``one_call_s`` being a call timed beforehand (the point's first call).

    Timed one after the other, two layers of a point each meet the machine's slow spells at different
    moments, and their ratio moves between runs by more than either time's own spread shows. Alternating,
    both sides of each ratio span the same seconds. With a ``budget``, a run that would not fit raises
    `PointTimeout` before any call.
    """
    if len(fns) != len(one_call_s):
        raise ValueError("one_call_s: need one timed call per callable")
    passes = max(1, min_replicates)
    timers = []
    for index, (fn, call_s) in enumerate(zip(fns, one_call_s)):
        call_s = max(call_s, 1e-9)
        number = max(1, round(max(min_run_time_s, passes * call_s) / (passes * call_s)))
        label = labels[index] if index < len(labels) else ""
        timers.append(_FixedBlockTimer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label,
                                       number=number))
    if budget is not None:
        slowest = max(one_call_s)
        calls = sum(timer.number * call_s for timer, call_s in zip(timers, one_call_s)) * passes / max(slowest, 1e-9)
        budget.check(slowest, calls_left=calls)
    times: list[list[float]] = [[] for _ in fns]
    for pass_index in range(passes):
        for index in rotated(range(len(fns)), pass_index):
            measurement = timers[index].blocked_autorange(min_run_time=0.0)
            times[index].extend(t for t in measurement.times if math.isfinite(t))
    return [LatencyStats.from_times(t, number_per_run=timer.number) for t, timer in zip(times, timers)]
