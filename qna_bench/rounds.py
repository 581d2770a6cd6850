"""Rounds: a sweep measures every point R times, the layers of a point timed together, and a ratio pairs
round r of one layer with round r of the other. Pure functions, no torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` starting at ``round_index`` modulo their count: round r's order of the layers."""
    if not items:
        return []
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def geometric_mean(values: Sequence[float]) -> float:
    """exp of the mean log of ``values`` (all positive)."""
    return float(np.exp(np.mean(np.log(np.asarray(values, dtype=np.float64)))))


def latency_summary(
    times_s: Sequence[float], round_medians_s: Sequence[float], round_geomeans_s: Sequence[float]
) -> dict[str, Any]:
    """The latency columns of a row over all its rounds.

    ``median_s`` is the median of the round medians (a round disturbed by other work moves it less than
    it moves the pooled median); the quartiles, min, mean and ``n`` are over every replicate of every round.
    ``round_geomeans_s`` are each round's geometric mean, what a ratio is formed from (`round_times`).
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
        round_geomeans_s=[float(m) for m in round_geomeans_s],
        rounds=len(round_medians_s),
    )


def add_round(row: dict[str, Any], round_times_s: Sequence[float]) -> dict[str, Any]:
    """The latency columns of ``row`` with one more round, whose replicates are ``round_times_s``."""
    times = [*row["times_s"], *round_times_s]
    medians = [*row["round_medians_s"], float(np.median(np.asarray(round_times_s, dtype=np.float64)))]
    return latency_summary(times, medians, [*round_times(row), geometric_mean(round_times_s)])


def round_times(row: Mapping[str, Any]) -> list[float]:
    """A row's time per round, as ratios pair them: each round's geometric mean over its replicates, or
    in files written before those were recorded, each round's median; [] when the row has neither.

    The layers of a point are timed in the same passes of alternating blocks, each with as many blocks
    as the other, so the ratio of two layers' round geometric means is the geometric mean of the ratios
    of their blocks timed side by side: every block pair votes, where a ratio of medians heard one
    block per layer. On back-to-back runs of the same command it moved half as much (issue 25's note).
    """
    for column in ("round_geomeans_s", "round_medians_s"):
        values = row.get(column)
        if isinstance(values, list | tuple | np.ndarray) and len(values):
            return [float(v) for v in values]
    return []


def ratio_spread(
    qna_rounds: Sequence[float], peer_rounds: Sequence[float]
) -> tuple[float, float, float]:
    """A peer's latency over QnA's, round r paired with round r (`round_times`): the geometric mean,
    min and max over the rounds.

    Rounds beyond the shorter list are left out; each pair was measured seconds apart, so the machine's
    drift between rounds cancels in each ratio and shows in the spread only when it hit one side of a pair.
    """
    pairs = min(len(qna_rounds), len(peer_rounds))
    if pairs == 0:
        raise ValueError("ratio_spread: need at least one round on both sides")
    ratios = np.asarray(peer_rounds[:pairs], dtype=np.float64) / np.asarray(qna_rounds[:pairs], dtype=np.float64)
    return geometric_mean(ratios), float(ratios.min()), float(ratios.max())
