"""Two result sets side by side, point by point (e.g. two library versions or two commits), with a
regression exit code that holds still when the whole machine drifts.

    python -m qna_bench.compare BASE NEW [--fail-over 5%] [--min-rel 5%] [--min-abs-ms 0.01]
                                [--memory-rel 1%] [--anchor peers|none] [--metric median_s|peak_bytes ...]
                                [--by COLUMN ...]

BASE and NEW are results parquets (or run folders holding a ``results.parquet``). Points match on the
layer and the whole problem (`MATCH_COLUMNS`), never on the environment, which is what is being
compared; ``--by device_name`` (or another environment column) adds a column to the match when a file
holds the same problem several times. A file with several rows for one point is refused, naming it.

Latency is judged against its peers (``--anchor peers``, the default): in each round, a point's time is
divided by the geometric mean of the other layers' times at the same problem, window and mode, measured
seconds apart in the same round (each round's geometric mean over its blocks, `qna_bench.rounds.round_times`;
a row without rounds counts as one round of its median). A machine that runs everything 1.3× slower
leaves these relative times as they were; one layer that got 1.3× slower moves its own. The change is
the ratio of the geometric means over the rounds of the relative times, new over base, and its spread
runs from the smallest new over the largest base to the largest new over the smallest base. A change is *significant* when all three hold: it exceeds ``--min-rel``
(default 5%), the raw medians differ by more than ``--min-abs-ms`` (default 0.01 ms), and the spread
excludes 1 (so with several rounds the noise between rounds holds it back), and it lies beyond the
noise *between the runs*: each run is a fresh process, and a point's time relative to its peers moves
on its own from run to run in a way its rounds cannot see. That noise is estimated from the comparison
itself (`between_runs_noise`: the robust σ of the points' log changes once each layer's mean change is
taken out, from 8 points on); one point counts beyond 4σ, or 4× its own noise over its rounds, or 4×
its layer's noise floor between processes as either run's rows record it (`qna_bench.noise`), whichever
is largest, and each layer is also judged over all its points: the geometric mean of their changes
counts beyond 3σ/√n. A layer that got slower everywhere fails the gate at a change no single point resolves.
Points without a peer on both sides, and ``--anchor none``, use the raw medians instead, with the within-run IQR bands q25..q75
(which must not overlap) in place of the spread. The raw medians and their ratio are printed either way.
Peak memory (``peak_bytes``) is deterministic, so any change beyond ``--memory-rel`` of the base
(default 1%) is reported.

Exit status: 1 when a point regressed — significantly slower by more than ``--fail-over``, memory grown
by more than ``--fail-over`` (and ``--memory-rel``), or ``ok`` in BASE and not ``ok`` in NEW — or a
layer did over its points;
2 on bad arguments (one line on stderr); 0 otherwise. Points present on one side only are listed but
do not fail the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd

from qna_bench import results
from qna_bench.compile_mode import is_compiled, mode_of
from qna_bench.noise import NoiseFloor, noise_floor
from qna_bench.rounds import geometric_mean, round_times

# What makes two rows the same point: the layer and its whole problem. Not the environment columns.
MATCH_COLUMNS: tuple[str, ...] = ("layer", *results.PROBLEM_COLUMNS)
# A layer's form: part of the match when either side has a compiled row (a missing value is eager).
FORM_COLUMN = "compile_mode"
# Environment columns that ``--by`` may add to the match (when one file holds a problem several times).
BY_COLUMNS: tuple[str, ...] = (
    "device_name", "threads", "torch_version", "timm_version", "natten_version", "python_version",
    "implementation", "layer_flags", "cpu_model", "hostname", "git_commit", "run_id",
)
Metric = Literal["median_s", "peak_bytes"]
METRICS: tuple[str, ...] = ("median_s", "peak_bytes")
Change = Literal["worse", "better", "same"]
Outcome = Literal["slower", "faster", "same", "status_changed", "not_timed", "only_in_base", "only_in_new"]

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_ARGUMENTS = 0, 1, 2
_OBSERVED = ("status", "reason", "median_s", "q25_s", "q75_s", "peak_bytes")
Anchor = Literal["peers", "none"]
ANCHORS: tuple[str, ...] = get_args(Anchor)

# Between two runs, a point's time relative to its peers still moves on its own: each run is a fresh
# process that lands differently in caches and memory. Back-to-back runs of unchanged code (qna,
# swin_fused, conv_dw; k = 3, 7, 13; both modes; 3 rounds) on the 2-core reference CPU moved by a robust
# σ of 6–10% (of the log) per point, up to 1.28× at one point, while the spread over each run's rounds
# excluded 1. The gate estimates that noise from the comparison itself (`between_runs_noise`).
POINT_Z = 4.0  # one point counts beyond POINT_Z σ: with ~20–100 points, 3σ would fire by chance
LAYER_Z = 3.0  # a layer's geometric mean over its n points counts beyond LAYER_Z σ / √n
MIN_NOISE_POINTS = 8  # points with peers needed to estimate σ; with fewer the gate uses the rounds only


@dataclass(frozen=True)
class Thresholds:
    """When a difference counts. Relative values are fractions (0.05 = 5%); times are in seconds."""

    min_rel: float = 0.05  # a latency change must exceed this fraction of the base median ...
    min_abs_s: float = 1e-5  # ... and this many seconds, and the IQR bands must not overlap
    fail_over: float = 0.05  # a significant slowdown (or memory growth) beyond this fraction fails
    memory_rel: float = 0.01  # a memory change beyond this fraction of the base is reported

    def __post_init__(self) -> None:
        for name in ("min_rel", "min_abs_s", "fail_over", "memory_rel"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: must be a finite number >= 0")


@dataclass(frozen=True)
class Observation:
    """What one side measured at a point."""

    status: str
    reason: str | None
    median_s: float | None
    q25_s: float | None
    q75_s: float | None
    peak_bytes: int | None
    # Each round's time (`qna_bench.rounds.round_times`); a row without rounds is one round of its median.
    round_times_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class MetricComparison:
    """One metric at one point, both sides ``ok`` and measured."""

    metric: str
    base: float
    new: float
    ratio: float | None  # new / base; None when base is 0
    change: Change  # "same" unless significant (latency) or beyond memory_rel (memory)
    regression: bool  # worse by more than fail_over, and significant
    why_same: str = ""  # which criterion held it back, when change is "same" and values differ
    # Latency against the peers: the change of the point's time relative to its peers', and its spread
    # over the rounds (low, high). None when judged on the raw medians.
    relative: float | None = None
    spread: tuple[float, float] | None = None
    # The standard error (of the log) of ``relative`` from the scatter of each side's rounds; None with
    # one round on both sides.
    round_noise: float | None = None


@dataclass(frozen=True)
class PointComparison:
    """One point: its identity, what each side observed (None: absent there), and the verdicts."""

    key: tuple[tuple[str, Any], ...]  # (column, value) for MATCH_COLUMNS and any --by columns
    base: Observation | None
    new: Observation | None
    latency: MetricComparison | None = None
    memory: MetricComparison | None = None
    # σ (of the log) of the change of this point's R-round medians from its layer's noise floor between
    # processes, the larger of the two runs' (`qna_bench.noise`); 0 when neither run recorded one.
    floor_sigma: float = 0.0

    def get(self, column: str) -> Any:
        return dict(self.key)[column]

    @property
    def status_change(self) -> tuple[str, str] | None:
        if self.base is None or self.new is None or self.base.status == self.new.status:
            return None
        return (self.base.status, self.new.status)

    @property
    def lost_ok(self) -> bool:
        """``ok`` in BASE and present but not ``ok`` in NEW."""
        return self.status_change is not None and self.status_change[0] == "ok"

    @property
    def regression(self) -> bool:
        return self.lost_ok or any(m is not None and m.regression for m in (self.latency, self.memory))

    @property
    def outcome(self) -> Outcome:
        if self.new is None:
            return "only_in_base"
        if self.base is None:
            return "only_in_new"
        if self.status_change is not None:
            return "status_changed"
        if self.latency is None:
            return "not_timed"
        return {"worse": "slower", "better": "faster", "same": "same"}[self.latency.change]


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


@dataclass(frozen=True)
class LayerChange:
    """A layer's change relative to its peers over all its points: the geometric mean of its points'
    changes, judged against the noise between runs shrunk by the square root of its point count."""

    group: tuple[tuple[str, Any], ...]  # ("layer", name) and any --by columns
    points: int
    relative: float
    limit: float  # the factor, either way, that ``relative`` must exceed to count
    change: Change
    regression: bool


class DuplicatePointError(ValueError):
    """One side holds several rows for the same point, so there is nothing unique to compare."""


def _value(value: Any) -> Any:
    return None if value is pd.NA or value is None or (isinstance(value, float) and math.isnan(value)) else value


def _observation(row: dict[str, Any]) -> Observation:
    observed = Observation(**{c: _value(row[c]) for c in _OBSERVED})
    per_round = round_times(row)
    if per_round:
        return dataclasses.replace(observed, round_times_s=tuple(per_round))
    if observed.median_s is not None:
        return dataclasses.replace(observed, round_times_s=(float(observed.median_s),))
    return observed


def describe_point(key: Iterable[tuple[str, Any]]) -> str:
    """A point in one line, e.g. ``qna window=3 forward B=8 56×56 C=128 h=4 float32 cpu``."""
    k = dict(key)
    extra = [f"{c}={k[c]}" for c in k if c not in (*MATCH_COLUMNS, FORM_COLUMN)]
    return " ".join([_layer_label(k), f"window={k['window']}", str(k["mode"]), shape_summary(k), *extra])


def _layer_label(key: dict[str, Any]) -> str:
    """The layer, and its form when compiled: ``qna[compiled:default]``."""
    form = key.get(FORM_COLUMN)
    return f"{key['layer']}[compiled:{form}]" if is_compiled(form) else str(key["layer"])


def shape_summary(key: dict[str, Any]) -> str:
    """Batch, size, channels, heads, dtype, device; stride, dilation and seed only when not the default."""
    parts = [f"B={key['batch']}", f"{key['height']}×{key['width']}", f"C={key['channels']}", f"h={key['heads']}"]
    parts += [str(key["dtype"]), str(key["device"])]
    for column, default in (("stride", 1), ("dilation", 1), ("seed", 0)):
        if key[column] != default:
            parts.append(f"{column}={key[column]}")
    return " ".join(parts)


def _index(frame: pd.DataFrame, columns: tuple[str, ...], side: str) -> dict[tuple, Observation]:
    missing = sorted((set(columns) - {FORM_COLUMN} | set(_OBSERVED)) - set(frame.columns))
    if missing:
        raise ValueError(f"{side}: not a results frame (missing columns {missing})")
    points: dict[tuple, Observation] = {}
    rows_of: dict[tuple, list[dict[str, Any]]] = {}
    for row in frame.to_dict("records"):
        key = tuple((c, mode_of(row.get(c)) if c == FORM_COLUMN else _value(row[c])) for c in columns)
        rows_of.setdefault(key, []).append(row)
        points[key] = _observation(row)
    for key, rows in rows_of.items():
        if len(rows) > 1:
            differ = [c for c in BY_COLUMNS if c in frame.columns and c not in columns
                      and len({_value(r[c]) for r in rows}) > 1]
            hint = (f"they differ in {', '.join(differ)}: add --by {differ[0]} to the match"
                    if differ else "they do not differ in any --by column")
            raise DuplicatePointError(f"{side}: {len(rows)} rows for the point {describe_point(key)}; {hint}")
    return points


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


def _sort_key(key: tuple[tuple[str, Any], ...]) -> tuple:
    k = dict(key)
    first = ["layer", "dtype", "device", "batch", "height", "width", "channels", "heads", "stride", "dilation", "seed"]
    order = first + [c for c in k if c not in first and c not in ("mode", "window")] + ["mode", "window"]
    return tuple((k[c] is None, "" if k[c] is None else k[c]) for c in order)


def _problem_of(key: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """A point's key without its layer and form: the points timed at the same problem anchor each other."""
    return tuple(kv for kv in key if kv[0] not in ("layer", FORM_COLUMN))


def compare_results(
    base: pd.DataFrame,
    new: pd.DataFrame,
    thresholds: Thresholds,
    *,
    by: Sequence[str] = (),
    metrics: Sequence[str] = METRICS,
    anchor: str = "peers",
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
    floors = noise_floor(base), noise_floor(new)
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


def layer_changes(points: Sequence[PointComparison], thresholds: Thresholds) -> list[LayerChange]:
    """Each layer's change over its points with peers (two at least), when the noise can be estimated."""
    noise = between_runs_noise(points)
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


def _timed(obs: Observation) -> bool:
    return obs.status == "ok" and obs.median_s is not None and all(m > 0 for m in obs.round_times_s)


# ---------------------------------------------------------------------------------------- formatting

_LATENCY_LABELS = {"worse": "slower", "better": "faster", "same": "same (within noise)"}
_MEMORY_LABELS = {"worse": "grew", "better": "shrank", "same": "same"}


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:#.4g}"


def _bytes(value: float | None) -> str:
    if value is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _ratio(metric: MetricComparison | None) -> str:
    if metric is None:
        return ""
    return "—" if metric.ratio is None else f"{metric.ratio:.3f}×"


def _relative(metric: MetricComparison | None) -> str:
    if metric is None:
        return ""
    if metric.relative is None:
        return "raw"
    low, high = metric.spread
    return f"{metric.relative:.3f}× ({low:.2f}–{high:.2f})"


def _row(point: PointComparison, metrics: Sequence[str], by: Sequence[str]) -> list[str]:
    b, n = point.base, point.new
    only = {"only_in_base": "only in BASE", "only_in_new": "only in NEW"}.get(point.outcome)
    status = " → ".join(point.status_change) if point.status_change else (b or n).status
    cells = [_layer_label(dict(point.key)), str(point.get("window")), str(point.get("mode")), shape_summary(dict(point.key))]
    cells += [str(point.get(c)) for c in by]
    cells.append(status)
    if "median_s" in metrics:
        lat = point.latency
        label = only or ("status changed" if point.status_change else
                         _LATENCY_LABELS[lat.change] if lat else "not timed")
        cells += [_ms(b.median_s if b else None), _ms(n.median_s if n else None), _ratio(lat), _relative(lat), label]
    if "peak_bytes" in metrics:
        mem = point.memory
        if only:  # said once, in the latency column when there is one
            label = "" if "median_s" in metrics else only
        else:
            label = _MEMORY_LABELS[mem.change] if mem else ""
        cells += [_bytes(b.peak_bytes if b else None), _bytes(n.peak_bytes if n else None), _ratio(mem), label]
    cells.append("REGRESSION" if point.regression else "")
    return cells


def _align(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_table(points: Sequence[PointComparison], metrics: Sequence[str] = METRICS, by: Sequence[str] = ()) -> str:
    """The comparison as an aligned table, one line per point."""
    header = ["layer", "window", "mode", "shape", *by, "status"]
    right = {1}
    if "median_s" in metrics:
        right |= {len(header), len(header) + 1, len(header) + 2}
        header += ["base ms", "new ms", "new/base", "vs peers (spread)", "latency"]
    if "peak_bytes" in metrics:
        right |= {len(header), len(header) + 1, len(header) + 2}
        header += ["base peak", "new peak", "new/base", "memory"]
    header.append("")
    return "\n".join(_align([header] + [_row(p, metrics, by) for p in points], right))


def format_layers(changes: Sequence[LayerChange], noise: BetweenRuns | None) -> str:
    """The noise between the runs and each layer's change over its points, as lines of text."""
    if noise is None:
        return (f"between runs: noise not estimated (needs {MIN_NOISE_POINTS} points with peers on both sides); "
                "points are judged on their rounds alone")
    head = (f"between runs: a point's change vs its peers scatters by σ = {math.expm1(noise.sigma):.1%} "
            f"({noise.points} points, each layer's own mean change taken out); one point counts beyond "
            f"{POINT_Z:g}σ (×{noise.point_limit:.2f}), a layer's geometric mean over n points beyond {LAYER_Z:g}σ/√n")
    rows = [["layer", "points", "vs peers (geometric mean)", "limit", "latency", ""]]
    for c in changes:
        name = " ".join(str(v) for _, v in c.group)
        rows.append([name, str(c.points), f"{c.relative:.3f}×", f"×{c.limit:.2f}",
                     _LATENCY_LABELS[c.change], "REGRESSION" if c.regression else ""])
    return "\n".join([head, "", *_align(rows, {1, 2, 3})]) if changes else head


def format_summary(points: Sequence[PointComparison], thresholds: Thresholds, metrics: Sequence[str] = METRICS,
                   layers: Sequence[LayerChange] = ()) -> str:
    """One line: how many points compared, slower, faster, unchanged, on one side only, regressions."""
    count = {o: sum(p.outcome == o for p in points) for o in get_args(Outcome)}
    both = len(points) - count["only_in_base"] - count["only_in_new"]
    parts = [f"{both} compared"]
    if "median_s" in metrics:
        parts += [f"{count['slower']} slower", f"{count['faster']} faster", f"{count['same']} unchanged"]
    parts += [f"{count['status_changed']} status changed"]
    if "median_s" in metrics and count["not_timed"]:
        parts.append(f"{count['not_timed']} not timed on both sides")
    parts += [f"only-in-base {count['only_in_base']}", f"only-in-new {count['only_in_new']}"]
    line = ", ".join(parts)
    if "peak_bytes" in metrics:
        mems = [p.memory.change for p in points if p.memory is not None]
        line += (f"; memory: {mems.count('worse')} grew, {mems.count('better')} shrank, "
                 f"{mems.count('same')} unchanged")
    regressions = sum(p.regression for p in points)
    line += f"; {regressions} regression{'s' if regressions != 1 else ''} (fail over {thresholds.fail_over:.1%})"
    if layers:
        regressed = sum(c.regression for c in layers)
        line += f"; {regressed} of {len(layers)} layers regressed over their points"
    return line


def format_rule(thresholds: Thresholds, anchor: str = "peers") -> str:
    latency = (f"|Δ| relative to the same-point peers > {thresholds.min_rel:.1%}, beyond the noise between runs, "
               f"with its spread over the rounds excluding 1 (no peers: |Δ median| > {thresholds.min_rel:.1%} and "
               f"IQR bands apart)"
               if anchor == "peers" else
               f"|Δ median| > {thresholds.min_rel:.1%} and IQR bands (q25..q75) apart")
    return (f"significant: {latency}, and > {thresholds.min_abs_s * 1e3:g} ms; memory reported beyond "
            f"{thresholds.memory_rel:.1%}; fails over {thresholds.fail_over:.1%} or when ok becomes not ok")


def describe_side(name: str, path: Path, frame: pd.DataFrame) -> str:
    """Where a side comes from: its row count and the environment values it holds."""
    def values(column: str) -> str:
        found = sorted({str(v) for v in frame[column].dropna().unique()})
        return ",".join(found[:3]) + (f",+{len(found) - 3}" if len(found) > 3 else "") if found else "?"

    return (f"{name}: {path} ({len(frame)} rows; torch {values('torch_version')}, git {values('git_commit')}, "
            f"{values('device_name')}, threads {values('threads')})")


# ----------------------------------------------------------------------------------------------- CLI

class BadArguments(Exception):
    """What was wrong with the command line, in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadArguments(message)


def parse_fraction(text: str) -> float:
    """``5%`` or ``0.05`` → 0.05. A bare number of 1 or more is refused as ambiguous (5 % or 500 %?)."""
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a percentage (5%) or a fraction (0.05)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite amount >= 0, e.g. 5% or 0.05")
    if not percent and value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: ambiguous; write a percentage ({text}%) or a fraction below 1")
    return value / 100 if percent else value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of milliseconds, e.g. 0.01") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of milliseconds >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    defaults = Thresholds()
    parser = _Parser(prog="python -m qna_bench.compare", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="BASE results parquet (or a run folder holding results.parquet)")
    parser.add_argument("new", type=Path, help="NEW results parquet (or a run folder holding results.parquet)")
    parser.add_argument("--fail-over", type=parse_fraction, default=defaults.fail_over, metavar="FRACTION",
                        help="exit 1 when a point is significantly slower (or uses more memory) by more than this "
                             "(5%% or 0.05; default %(default)s)")
    parser.add_argument("--min-rel", type=parse_fraction, default=defaults.min_rel, metavar="FRACTION",
                        help="a latency change smaller than this fraction of the base median is noise (default %(default)s)")
    parser.add_argument("--min-abs-ms", type=_milliseconds, default=defaults.min_abs_s * 1e3, metavar="MS",
                        help="a latency change smaller than this many ms is noise (default %(default)s)")
    parser.add_argument("--memory-rel", type=parse_fraction, default=defaults.memory_rel, metavar="FRACTION",
                        help="a peak-memory change smaller than this fraction is not reported (default %(default)s)")
    parser.add_argument("--anchor", choices=ANCHORS, default="peers",
                        help="judge latency relative to the other layers at the same point, measured in the same "
                             "rounds (peers: machine drift cancels), or on the raw medians (none); default %(default)s")
    parser.add_argument("--metric", action="append", choices=METRICS, default=None,
                        help="compare only this metric (repeatable; default: both)")
    parser.add_argument("--by", action="append", choices=BY_COLUMNS, default=None, metavar="COLUMN",
                        help="also match on this environment column, when a file holds a problem several times "
                             f"({', '.join(BY_COLUMNS)})")
    return parser


def _read(path: Path, side: str) -> pd.DataFrame:
    if path.is_dir() and (path / results.RESULTS_FILE).is_file():
        path = path / results.RESULTS_FILE
    if not path.exists():
        raise BadArguments(f"{side} {path}: no such file")
    if path.is_dir():
        raise BadArguments(f"{side} {path}: a folder without a {results.RESULTS_FILE}")
    try:
        return results.read_results(path)
    except results.ResultsFileError as exc:
        raise BadArguments(f"{side} {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison; return 0, 1 (a regression) or 2 (bad arguments)."""
    try:
        args = _parser().parse_args(argv)
        thresholds = Thresholds(args.min_rel, args.min_abs_ms / 1e3, args.fail_over, args.memory_rel)
        metrics = tuple(dict.fromkeys(args.metric or METRICS))
        by = tuple(dict.fromkeys(args.by or ()))
        base, new = _read(args.base, "BASE"), _read(args.new, "NEW")
        points = compare_results(base, new, thresholds, by=by, metrics=metrics, anchor=args.anchor)
    except (BadArguments, ValueError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    print(describe_side("BASE", args.base, base))
    print(describe_side("NEW ", args.new, new))
    print(format_rule(thresholds, args.anchor))
    print(f"noise floor BASE: {noise_floor(base).summary()}")
    print(f"noise floor NEW : {noise_floor(new).summary()}")
    print()
    if points:
        print(format_table(points, metrics, by))
        print()
    layers = layer_changes(points, thresholds) if "median_s" in metrics else []
    if "median_s" in metrics and args.anchor == "peers":
        print(format_layers(layers, between_runs_noise(points)))
        print()
    print(format_summary(points, thresholds, metrics, layers))
    regressed = any(p.regression for p in points) or any(c.regression for c in layers)
    return EXIT_REGRESSION if regressed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
