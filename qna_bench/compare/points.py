"""What `compare` matches and what it records: a point's key, what each side observed there, and the
verdicts on it. Data only; `qna_bench.compare.judge` forms the verdicts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import pandas as pd

from qna_bench import results
from qna_bench.labels import is_compiled, mode_of
from qna_bench.rounds import round_times
from qna_bench.text import image_size

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
    # Why a change that would fail is not counted: the machine changed and explains it
    # (`qna_bench.compare.machine`); "" when it counts.
    excused: str = ""

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
        if self.excused:
            return False
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
class LayerChange:
    """A layer's change relative to its peers over all its points: the geometric mean of its points'
    changes, judged against the noise between runs shrunk by the square root of its point count."""

    group: tuple[tuple[str, Any], ...]  # ("layer", name) and any --by columns
    points: int
    relative: float
    limit: float  # the factor, either way, that ``relative`` must exceed to count
    change: Change
    regression: bool
    excused: str = ""  # why a change that would fail is not counted (the machine changed); "" when it counts


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
    parts = [f"B={key['batch']}", image_size(key), f"C={key['channels']}", f"h={key['heads']}"]
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


def _sort_key(key: tuple[tuple[str, Any], ...]) -> tuple:
    k = dict(key)
    first = ["layer", "dtype", "device", "batch", "height", "width", "channels", "heads", "stride", "dilation", "seed"]
    order = first + [c for c in k if c not in first and c not in ("mode", "window")] + ["mode", "window"]
    return tuple((k[c] is None, "" if k[c] is None else k[c]) for c in order)


def _problem_of(key: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """A point's key without its layer and form: the points timed at the same problem anchor each other."""
    return tuple(kv for kv in key if kv[0] not in ("layer", FORM_COLUMN))



def _timed(obs: Observation) -> bool:
    return obs.status == "ok" and obs.median_s is not None and all(m > 0 for m in obs.round_times_s)

