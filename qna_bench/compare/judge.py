"""The verdicts of `compare`: each point's latency against its peers (or on the raw medians) and its
peak memory, the noise between the two runs, and each layer's change over its points."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from qna_bench.compare.machine import MachineChange, compute_shares, excuse, machine_change
from qna_bench.compare.points import (
    ANCHORS,
    BY_COLUMNS,
    FORM_COLUMN,
    MATCH_COLUMNS,
    METRICS,
    Change,
    DuplicatePointError,
    LayerChange,
    MetricComparison,
    Observation,
    PointComparison,
    Thresholds,
    _index,
    _problem_of,
    _sort_key,
    _timed,
)
from qna_bench.labels import is_compiled
from qna_bench.noise import NoiseFloor, noise_floor
from qna_bench.rounds import geometric_mean

__all__ = ["DuplicatePointError"]

# Between two runs, a point's time relative to its peers still moves on its own: each run is a fresh
# process that lands differently in caches and memory. Back-to-back runs of unchanged code (qna,
# swin_fused, conv_dw; k = 3, 7, 13; both modes; 3 rounds) on the 2-core reference CPU moved by a robust
# σ of 6–10% (of the log) per point, up to 1.28× at one point, while the spread over each run's rounds
# excluded 1. The gate estimates that noise from the comparison itself (`between_runs_noise`).
POINT_Z = 4.0  # one point counts beyond POINT_Z σ: with ~20–100 points, 3σ would fire by chance
LAYER_Z = 3.0  # a layer's geometric mean over its n points counts beyond LAYER_Z σ / √n
MIN_NOISE_POINTS = 8  # points with peers needed to estimate σ; with fewer the gate uses the rounds only


@dataclass(frozen=True)
class BetweenRuns:
    """The noise between the two runs: the robust σ (median absolute deviation × 1.4826) of the log of
    each point's change relative to its peers, once each layer's own mean change is taken out (a layer
    that really changed moves all its points, and its peers' relative times the other way)."""

    sigma: float
    points: int

    @property
    def point_limit(self) -> float:
        return math.exp(POINT_Z * self.sigma)



def relative_rounds(point: Observation, peers: Sequence[Observation]) -> list[float]:
    """The point's round times over the geometric mean of its peers' in the same rounds (rounds that
    every one of them has)."""
    count = min(len(o.round_times_s) for o in (point, *peers))
    return [point.round_times_s[r] / geometric_mean([p.round_times_s[r] for p in peers]) for r in range(count)]


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _anchored(base: Observation, new: Observation, base_peers: Sequence[Observation],
              new_peers: Sequence[Observation], t: Thresholds) -> MetricComparison:
    """Latency judged relative to the peers measured in the same rounds (see the module's docstring)."""
    b_rel, n_rel = relative_rounds(base, base_peers), relative_rounds(new, new_peers)
    b, n = float(base.median_s), float(new.median_s)
    relative = geometric_mean(n_rel) / geometric_mean(b_rel)
    low, high = min(n_rel) / max(b_rel), max(n_rel) / min(b_rel)
    why_same = ""
    if abs(relative - 1) <= t.min_rel:
        why_same = f"|Δ vs peers| ≤ {t.min_rel:.1%}"
    elif abs(n - b) <= t.min_abs_s:
        why_same = f"|Δ| ≤ {t.min_abs_s * 1e3:g} ms"
    elif low <= 1 <= high:
        why_same = "spread over rounds includes 1"
    change: Change = "same" if why_same else ("worse" if relative > 1 else "better")
    regression = change == "worse" and relative - 1 > t.fail_over
    return MetricComparison("median_s", b, n, n / b if b else None, change, regression,
                            why_same if relative != 1 else "", relative, (low, high), _round_noise(b_rel, n_rel))


def _round_noise(base_rounds: Sequence[float], new_rounds: Sequence[float]) -> float | None:
    """The standard error of the difference of the two sides' mean log round values, from their pooled
    scatter over the rounds."""
    sides = [[math.log(v) for v in rounds] for rounds in (base_rounds, new_rounds)]
    dof = sum(len(logs) - 1 for logs in sides)
    if dof < 1:
        return None
    squares = math.fsum((x - math.fsum(logs) / len(logs)) ** 2 for logs in sides for x in logs)
    return math.sqrt(squares / dof * sum(1 / len(logs) for logs in sides))


def _latency(base: Observation, new: Observation, t: Thresholds) -> MetricComparison | None:
    if base.median_s is None or new.median_s is None:
        return None
    b, n = float(base.median_s), float(new.median_s)
    delta = n - b
    # A side without an IQR counts as the single value [median, median].
    b_lo, b_hi = _band(base)
    n_lo, n_hi = _band(new)
    overlap = n_lo <= b_hi and b_lo <= n_hi
    why_same = ""
    if abs(delta) <= t.min_rel * b:
        why_same = f"|Δ| ≤ {t.min_rel:.1%}"
    elif abs(delta) <= t.min_abs_s:
        why_same = f"|Δ| ≤ {t.min_abs_s * 1e3:g} ms"
    elif overlap:
        why_same = "IQR bands overlap"
    change: Change = "same" if why_same else ("worse" if delta > 0 else "better")
    regression = change == "worse" and delta > t.fail_over * b
    return MetricComparison("median_s", b, n, n / b if b else None, change, regression,
                            why_same if delta else "")


def _band(obs: Observation) -> tuple[float, float]:
    lo = obs.q25_s if obs.q25_s is not None else obs.median_s
    hi = obs.q75_s if obs.q75_s is not None else obs.median_s
    return float(lo), float(hi)


def _memory(base: Observation, new: Observation, t: Thresholds) -> MetricComparison | None:
    if base.peak_bytes is None or new.peak_bytes is None:
        return None
    b, n = int(base.peak_bytes), int(new.peak_bytes)
    delta = n - b
    # Deterministic, so no noise band: any change beyond memory_rel of the base (base 0: any change).
    changed = abs(delta) > t.memory_rel * b if b else delta != 0
    change: Change = "same" if not changed else ("worse" if delta > 0 else "better")
    regression = change == "worse" and (delta > t.fail_over * b if b else True)
    return MetricComparison("peak_bytes", b, n, n / b if b else None, change, regression,
                            f"|Δ| ≤ {t.memory_rel:.1%}" if delta and not changed else "")



def compare_results(
    base: pd.DataFrame,
    new: pd.DataFrame,
    thresholds: Thresholds,
    *,
    by: Sequence[str] = (),
    metrics: Sequence[str] = METRICS,
    anchor: str = "peers",
    floors: tuple[NoiseFloor, NoiseFloor] | None = None,
) -> list[PointComparison]:
    """Every point of either side, sorted by layer, shape, mode and window.

    Points match on `MATCH_COLUMNS`, the form (`FORM_COLUMN`) when either side has a compiled row, plus ``by``. Metrics are compared where both sides are ``ok`` and
    have a value; with ``anchor="peers"``, latency relative to the other layers timed on both sides at
    the same problem, window and mode. Raises `DuplicatePointError` when a side has several rows for one point, and
    ValueError for an unknown ``by`` column or metric.
    """
    unknown_by = [c for c in by if c not in BY_COLUMNS]
    if unknown_by:
        raise ValueError(f"by={unknown_by}: allowed columns are {', '.join(BY_COLUMNS)}")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor={anchor!r}: allowed values are {', '.join(ANCHORS)}")
    unknown_metrics = [m for m in metrics if m not in METRICS]
    if unknown_metrics:
        raise ValueError(f"metrics={unknown_metrics}: allowed metrics are {', '.join(METRICS)}")
    forms = tuple(FORM_COLUMN for frame in (base, new) if FORM_COLUMN in frame
                  and frame[FORM_COLUMN].astype(object).map(is_compiled).any())[:1]
    columns = MATCH_COLUMNS + forms + tuple(dict.fromkeys(by))
    base_points = _index(base, columns, "BASE")
    new_points = _index(new, columns, "NEW")
    timed = {key for key in base_points.keys() & new_points.keys()
             if _timed(base_points[key]) and _timed(new_points[key])}
    peers: dict[tuple, list[tuple]] = {}
    for key in timed:
        peers.setdefault(_problem_of(key), []).append(key)
    comparisons = []
    for key in sorted(base_points.keys() | new_points.keys(), key=_sort_key):
        b, n = base_points.get(key), new_points.get(key)
        latency = memory = None
        if b is not None and n is not None and b.status == n.status == "ok":
            others = [k for k in peers.get(_problem_of(key), []) if k != key]
            if "median_s" not in metrics:
                latency = None
            elif anchor == "peers" and key in timed and others:
                latency = _anchored(b, n, [base_points[k] for k in others], [new_points[k] for k in others],
                                    thresholds)
            else:
                latency = _latency(b, n, thresholds)
            memory = _memory(b, n, thresholds) if "peak_bytes" in metrics else None
        comparisons.append(PointComparison(key, b, n, latency, memory))
    noise = between_runs_noise(comparisons)
    floors = floors or (noise_floor(base), noise_floor(new))
    comparisons = [dataclasses.replace(p, floor_sigma=_floor_sigma(p, floors)) for p in comparisons]
    return [_judged_against(noise, p) for p in comparisons]


def _floor_sigma(point: PointComparison, floors: tuple[NoiseFloor, NoiseFloor]) -> float:
    """The σ of the point's change that its layer's noise floor between processes implies: the larger
    of the two runs' σ of one round, times √(2/R) for the change of two R-round means."""
    if point.base is None or point.new is None:
        return 0.0
    count = max(1, min(len(point.base.round_times_s), len(point.new.round_times_s)))
    return max(floor.layer_sigma(point.get("layer")) for floor in floors) * math.sqrt(2 / count)


def _changes_by_layer(points: Sequence[PointComparison]) -> dict[tuple, list[float]]:
    """The log of each point's change relative to its peers, grouped by layer (and any --by columns)."""
    groups: dict[tuple, list[float]] = {}
    for p in points:
        if p.latency is not None and p.latency.relative:
            group = tuple(kv for kv in p.key if kv[0] == "layer" or kv[0] in BY_COLUMNS)
            groups.setdefault(group, []).append(math.log(p.latency.relative))
    return groups


def between_runs_noise(points: Sequence[PointComparison]) -> BetweenRuns | None:
    """σ of the per-point change between the runs (see `BetweenRuns`), or None with too few points."""
    groups = [logs for logs in _changes_by_layer(points).values() if len(logs) >= 2]
    residuals = [x - math.fsum(logs) / len(logs) for logs in groups for x in logs]
    if len(residuals) < MIN_NOISE_POINTS:
        return None
    # Removing each layer's mean leaves len(residuals) - len(groups) degrees of freedom.
    correction = math.sqrt(len(residuals) / (len(residuals) - len(groups)))
    return BetweenRuns(1.4826 * _median([abs(r) for r in residuals]) * correction, len(residuals))


def _judged_against(noise: BetweenRuns | None, point: PointComparison) -> PointComparison:
    """The point, its latency change held back when it lies within POINT_Z σ of its noise: the largest of
    the noise between runs (all points, when there are enough), its own over its rounds (a point that
    scatters more than most, e.g. a short call, needs a larger change) and its layer's noise floor
    between processes (``floor_sigma``)."""
    lat = point.latency
    if lat is None or lat.relative is None or lat.change == "same":
        return point
    floor = point.floor_sigma
    between = noise.sigma if noise is not None else 0.0
    sigma = max(between, lat.round_noise or 0.0, floor)
    if sigma == 0.0:
        return point
    limit = math.exp(POINT_Z * sigma)
    if max(lat.relative, 1 / lat.relative) > limit:
        return point
    source = ("the noise between runs" if sigma == between else
              "the noise over its own rounds" if sigma == (lat.round_noise or 0.0) else
              "its layer's noise floor between processes")
    why = f"within {source}: {POINT_Z:g}σ = ×{limit:.2f}"
    return dataclasses.replace(point, latency=dataclasses.replace(lat, change="same", regression=False, why_same=why))


def layer_changes(points: Sequence[PointComparison], thresholds: Thresholds,
                  noise: BetweenRuns | None = None) -> list[LayerChange]:
    """Each layer's change over its points with peers (two at least), when the noise can be estimated."""
    noise = noise or between_runs_noise(points)
    if noise is None:
        return []
    floors: dict[tuple, float] = {}  # each layer's largest noise floor between processes
    for p in points:
        group = tuple(kv for kv in p.key if kv[0] == "layer" or kv[0] in BY_COLUMNS)
        floors[group] = max(floors.get(group, 0.0), p.floor_sigma)
    changes = []
    for group, logs in sorted(_changes_by_layer(points).items()):
        if len(logs) < 2:
            continue
        relative = math.exp(math.fsum(logs) / len(logs))
        sigma = max(noise.sigma, floors.get(group, 0.0))
        limit = max(1 + thresholds.min_rel, math.exp(LAYER_Z * sigma / math.sqrt(len(logs))))
        change: Change = "same" if max(relative, 1 / relative) <= limit else ("worse" if relative > 1 else "better")
        regression = change == "worse" and relative - 1 > thresholds.fail_over
        changes.append(LayerChange(group, len(logs), relative, limit, change, regression))
    return changes



@dataclass(frozen=True)
class Comparison:
    """Everything `compare` decides, computed once: the points, each layer's change over its points, the
    noise between the runs, each run's noise floor, whether the machine changed, and (when it did) each
    layer's share of the compute roof in BASE."""

    points: list[PointComparison]
    layers: list[LayerChange]
    noise: BetweenRuns | None
    floors: tuple[NoiseFloor, NoiseFloor]
    machine: MachineChange
    shares: dict[str, float]

    @property
    def regressed(self) -> bool:
        return any(p.regression for p in self.points) or any(c.regression for c in self.layers)

    @property
    def excused(self) -> tuple[list[PointComparison], list[LayerChange]]:
        """The points and layers that would have failed, had the machine not changed."""
        return [p for p in self.points if p.excused], [c for c in self.layers if c.excused]


def compare_runs(base: pd.DataFrame, new: pd.DataFrame, thresholds: Thresholds, *, by: Sequence[str] = (),
                 metrics: Sequence[str] = METRICS, anchor: str = "peers") -> Comparison:
    """`compare_results`, `layer_changes` and `qna_bench.compare.machine.machine_change` together; where
    the machine changed, what it explains is excused (`qna_bench.compare.machine.excuse`)."""
    floors = noise_floor(base), noise_floor(new)
    points = compare_results(base, new, thresholds, by=by, metrics=metrics, anchor=anchor, floors=floors)
    noise = between_runs_noise(points)
    layers = layer_changes(points, thresholds, noise) if "median_s" in metrics else []
    machine = machine_change(base, new, floors)
    shares = compute_shares(base) if machine.changed else {}
    point_limit = max(1 + thresholds.min_rel, noise.point_limit if noise is not None else 1.0)
    points, layers = excuse(points, layers, machine, shares, point_limit)
    return Comparison(points, layers, noise, floors, machine, shares)
