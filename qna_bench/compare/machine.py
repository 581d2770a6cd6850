"""Whether two runs ran on the same machine, read from their rows: the machine's fingerprint (CPU model
and instruction set, threads, cache sizes) and how fast it ran the fixed work that every run times (the
canary around every round, `qna_bench.measure.canary`; the compute and bandwidth probes,
`qna_bench.measure.probes`), each compared against its own noise.

``hostname`` tells nothing: cloud hosts of one kind all read ``vm``. Two hosts of one kind can still
differ by 10% in speed, and a layer near the compute roof moves with the core while its peers, held back
by memory, move less: against its peers it looks like a regression. Where the machine changed, a layer
whose share of the compute roof, above or below its peers', explains the direction and size of its move
is named and not counted, nor is a point that crossed its time budget on the slower machine.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from qna_bench.compare.points import LayerChange, PointComparison
from qna_bench.noise import NoiseFloor
from qna_bench.roofline import work_flops

# The fingerprint: columns every row records that name the machine's kind (not its speed).
FINGERPRINT_COLUMNS: tuple[str, ...] = ("device_name", "cpu_model", "threads", "l2_bytes_probe", "llc_bytes_probe")
# The probes: (name, column, unit, scale to that unit); each a rate, higher is faster.
PROBES: tuple[tuple[str, str, str, float], ...] = (
    ("compute probe", "peak_flops_probe", "GFLOP/s", 1e-9),
    ("L2 probe", "peak_bytes_per_s_l2_probe", "GB/s", 1e-9),
    ("LLC probe", "peak_bytes_per_s_llc_probe", "GB/s", 1e-9),
    ("DRAM probe", "peak_bytes_per_s_probe", "GB/s", 1e-9),
)
# How far a level may move and still be the same machine. The canary's median over a run's rounds moved
# by 2.7% at most across three runs on the 2-core AVX-512 EPYC (0.530, 0.536, 0.544 ms; 2026-12-06/07),
# though its standard error over ~900 canaries is far smaller: runs differ by more than rounds do.
CANARY_MIN_MOVE = 0.05
CANARY_Z = 4.0  # and beyond this many standard errors of the two medians
# A probe is the best of a few calls, one value per run, with no noise of its own recorded. On that host
# the GEMM probe repeated within 0.4% (223.4 and 222.5 GFLOP/s) and the L2 copy within 8.5% (280.9, 304.9
# GB/s), so the compute probe counts beyond 5% and the bandwidth probes beyond 10%.
PROBE_MIN_MOVE = {"compute probe": 0.05}
BANDWIDTH_MIN_MOVE = 0.10
# Levels that time compute (not memory): what a layer near the compute roof moves with.
COMPUTE_LEVELS = ("canary", "compute probe")
MACHINE_EXCUSE = "machine change"
TIMEOUT_EXCUSE = "crossed the time budget on the slower machine"
# A probe method's text less its results and date: the same text means the same probe workloads.
_PROBE_RESULTS = re.compile(r"[\d.]+ G/s|measured \S+")


@dataclass(frozen=True)
class Level:
    """How fast each run did one fixed piece of work, and the factor beyond which a move counts."""

    name: str
    unit: str
    base: float
    new: float
    limit: float
    higher_is_faster: bool

    @property
    def slowdown(self) -> float:
        """How many times slower NEW's machine did this work (below 1: faster)."""
        return self.base / self.new if self.higher_is_faster else self.new / self.base

    @property
    def moved(self) -> bool:
        return max(self.slowdown, 1 / self.slowdown) > self.limit


@dataclass(frozen=True)
class MachineChange:
    """What differs between the machines of BASE and NEW: fingerprint columns (column, base, new), levels
    (each compared whether it moved or not), and notes on what could not be compared."""

    fingerprint: tuple[tuple[str, str], ...]  # BASE's fingerprint (column, value)
    differs: tuple[tuple[str, str, str], ...]
    levels: tuple[Level, ...]
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.differs) or any(level.moved for level in self.levels)

    @property
    def compute_slowdown(self) -> float:
        """The largest move (either way) of the levels that time compute; 1 when neither was measured."""
        moves = [level.slowdown for level in self.levels if level.name in COMPUTE_LEVELS]
        return max(moves, key=lambda s: abs(math.log(s)), default=1.0)


def _usual(frame: pd.DataFrame, column: str) -> str | None:
    """The value of ``column`` that most rows hold, as text (None when no row holds one)."""
    if column not in frame:
        return None
    values = frame[column].dropna()
    if values.empty:
        return None
    value = values.astype(str).mode().iloc[0]
    return value[:-2] if value.endswith(".0") else value


def _median(frame: pd.DataFrame, column: str) -> float | None:
    if column not in frame:
        return None
    values = pd.to_numeric(frame[column], errors="coerce").dropna()
    values = values[values > 0]
    return float(values.median()) if len(values) else None


def _canary(base: NoiseFloor, new: NoiseFloor) -> Level | None:
    """The canary's median, its limit the larger of `CANARY_MIN_MOVE` and `CANARY_Z` standard errors of
    the difference of the two medians (σ of one canary from its IQR, 1.2533 σ / √n for a median)."""
    if not (base.canaries and new.canaries and base.canary_median_s and new.canary_median_s):
        return None
    errors = [1.2533 * (floor.canary_spread or 0.0) / 1.349 / math.sqrt(floor.canaries) for floor in (base, new)]
    limit = math.exp(max(CANARY_Z * math.hypot(*errors), math.log1p(CANARY_MIN_MOVE)))
    return Level("canary", "ms", base.canary_median_s * 1e3, new.canary_median_s * 1e3, limit, False)


def machine_change(base: pd.DataFrame, new: pd.DataFrame, floors: tuple[NoiseFloor, NoiseFloor]) -> MachineChange:
    """The machines of two results frames compared (``floors``: each frame's `qna_bench.noise.noise_floor`)."""
    fingerprint, differs, notes = [], [], []
    for column in FINGERPRINT_COLUMNS:
        b, n = _usual(base, column), _usual(new, column)
        if b is not None:
            fingerprint.append((column, b))
        if b is not None and n is not None and b != n:
            differs.append((column, b, n))
    levels = []
    canary = _canary(*floors)
    if canary is None:
        notes.append("no canary on both sides")
    else:
        levels.append(canary)
    methods = [_usual(frame, "probe_method") for frame in (base, new)]
    if None not in methods and len({_PROBE_RESULTS.sub("", m) for m in methods}) > 1:
        notes.append("the probes measured different workloads: not compared")
    else:
        for name, column, unit, scale in PROBES:
            b, n = _median(base, column), _median(new, column)
            if b is not None and n is not None:
                limit = 1 + PROBE_MIN_MOVE.get(name, BANDWIDTH_MIN_MOVE)
                levels.append(Level(name, unit, b * scale, n * scale, limit, True))
    return MachineChange(tuple(fingerprint), tuple(differs), tuple(levels), tuple(notes))


def compute_shares(frame: pd.DataFrame) -> dict[str, float]:
    """Each layer's median share of the compute roof over its ``ok`` points: the FLOP/s it achieved
    (`qna_bench.roofline.work_flops` per median second) over its run's compute probe."""
    needed = ("flops", "flops_analytic", "peak_flops_probe", "median_s")
    if frame.empty or any(column not in frame for column in needed):
        return {}
    rows = frame[frame["status"] == "ok"]
    share = work_flops(rows) / rows["median_s"].astype("Float64") / rows["peak_flops_probe"].astype("Float64")
    share = share.astype("float64")
    known = rows.assign(share=share)[share.notna() & (share > 0)]
    return {str(layer): float(values.median()) for layer, values in known.groupby("layer")["share"]}


def _explained(relative: float, share: float | None, others: float | None, slowdown: float, limit: float) -> bool:
    """Whether a move of ``relative`` against the peers follows from the machine: its direction is the one
    the layer's share of the compute roof (above or below its peers') gives a compute ``slowdown``, and
    it is no larger than that slowdown, widened by the move's own noise ``limit``."""
    if share is None or others is None or share == others or slowdown == 1.0 or relative == 1.0:
        return False
    expected = math.copysign(1.0, math.log(slowdown)) * math.copysign(1.0, share - others)
    return (math.copysign(1.0, math.log(relative)) == expected
            and abs(math.log(relative)) <= abs(math.log(slowdown)) + math.log(limit))


def _others(shares: dict[str, float], layer: str) -> float | None:
    """The median share of the compute roof of the layers other than ``layer``."""
    values = [v for name, v in shares.items() if name != layer]
    return statistics.median(values) if values else None


def excuse(points: Sequence[PointComparison], layers: Sequence[LayerChange], machine: MachineChange,
           shares: dict[str, float], point_limit: float) -> tuple[list[PointComparison], list[LayerChange]]:
    """The points and layers, with what the machine change explains marked ``excused``: a layer whose
    move its share of the compute roof explains (`_explained`), that layer's points whose move it explains
    within ``point_limit``, and points that became ``timeout`` on a slower machine."""
    if not machine.changed:
        return list(points), list(layers)
    slowdown = machine.compute_slowdown
    named: set[str] = set()
    judged = []
    for change in layers:
        layer = str(dict(change.group)["layer"])
        share, others = shares.get(layer), _others(shares, layer)
        if change.change != "same" and _explained(change.relative, share, others, slowdown, change.limit):
            named.add(layer)
            if change.regression:
                change = LayerChange(change.group, change.points, change.relative, change.limit, change.change,
                                     False, MACHINE_EXCUSE)
        judged.append(change)
    excused = []
    for point in points:
        layer = str(point.get("layer"))
        latency = point.latency
        why = ""
        if point.status_change is not None and point.status_change[1] == "timeout" and slowdown > 1:
            why = TIMEOUT_EXCUSE
        elif (layer in named and latency is not None and latency.relative is not None and latency.change == "worse"
              and _explained(latency.relative, shares.get(layer), _others(shares, layer), slowdown, point_limit)):
            why = MACHINE_EXCUSE
        excused.append(PointComparison(point.key, point.base, point.new, point.latency, point.memory,
                                       point.floor_sigma, why) if why and point.regression else point)
    return excused, judged


def explained_layers(layers: Sequence[LayerChange], machine: MachineChange, shares: dict[str, float]) -> list[str]:
    """One line per layer whose move against its peers the machine change explains (`_explained`): its
    move and its share of the compute roof against the other layers'."""
    lines = []
    for change in layers:
        layer = str(dict(change.group)["layer"])
        share, others = shares.get(layer), _others(shares, layer)
        if change.excused or (change.change != "same" and _explained(
                change.relative, share, others, machine.compute_slowdown, change.limit)):
            lines.append(f"{layer} ×{change.relative:.3f} vs peers ({share:.0%} of the compute roof; "
                         f"the other layers' median {others:.0%})" + (", not counted" if change.excused else ""))
    return lines
