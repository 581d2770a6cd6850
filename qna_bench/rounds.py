"""Rounds: a sweep measures every point R times, the layers of a point timed together, and a ratio pairs
round r of one layer with round r of the other. Pure functions, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` starting at ``round_index`` modulo their count: round r's order of the layers."""
    if not items:
        return []
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def latency_summary(times_s: Sequence[float], round_medians_s: Sequence[float]) -> dict[str, Any]:
    """The latency columns of a row over all its rounds.

    ``median_s`` is the median of the round medians (a round disturbed by other work moves it less than
    it moves the pooled median); the quartiles, min, mean and ``n`` are over every replicate of every round.
    """
    samples = np.asarray(times_s, dtype=np.float64)
    q25, q75 = np.quantile(samples, [0.25, 0.75])
    return dict(
        median_s=float(np.median(np.asarray(round_medians_s, dtype=np.float64))),
        q25_s=float(q25),
        q75_s=float(q75),
        min_s=float(samples.min()),
        mean_s=float(samples.mean()),
        n=len(samples),
        times_s=[float(t) for t in samples],
        round_medians_s=[float(m) for m in round_medians_s],
        rounds=len(round_medians_s),
    )


def add_round(row: dict[str, Any], round_times_s: Sequence[float]) -> dict[str, Any]:
    """The latency columns of ``row`` with one more round, whose replicates are ``round_times_s``."""
    times = [*row["times_s"], *round_times_s]
    medians = [*row["round_medians_s"], float(np.median(np.asarray(round_times_s, dtype=np.float64)))]
    return latency_summary(times, medians)


def ratio_spread(
    qna_round_medians: Sequence[float], peer_round_medians: Sequence[float]
) -> tuple[float, float, float]:
    """A peer's latency over QnA's, round r paired with round r: (median, min, max) over the rounds.

    Rounds beyond the shorter list are left out; each pair was measured seconds apart, so the machine's
    drift between rounds cancels in each ratio and shows in the spread only when it hit one side of a pair.
    """
    pairs = min(len(qna_round_medians), len(peer_round_medians))
    if pairs == 0:
        raise ValueError("ratio_spread: need at least one round on both sides")
    ratios = np.asarray(peer_round_medians[:pairs], dtype=np.float64) / np.asarray(qna_round_medians[:pairs], dtype=np.float64)
    return float(np.median(ratios)), float(ratios.min()), float(ratios.max())
