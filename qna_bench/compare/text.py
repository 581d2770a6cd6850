"""`compare`'s output as text: the table of points, the layers' changes, the summary line and the rule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import pandas as pd

from qna_bench.compare.judge import LAYER_Z, MIN_NOISE_POINTS, POINT_Z, BetweenRuns, Comparison
from qna_bench.compare.machine import TIMEOUT_EXCUSE, MachineChange, explained_layers
from qna_bench.compare.points import (
    METRICS,
    LayerChange,
    MetricComparison,
    Outcome,
    PointComparison,
    Thresholds,
    _layer_label,
    shape_summary,
)
from qna_bench.text import MIB

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
    for unit, size in (("GiB", 2**30), ("MiB", MIB), ("KiB", 2**10)):
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
    cells.append("REGRESSION" if point.regression else f"not counted: {point.excused}" if point.excused else "")
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
                     _LATENCY_LABELS[c.change], "REGRESSION" if c.regression else
                     f"not counted: {c.excused}" if c.excused else ""])
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
    points_excused, layers_excused = sum(bool(p.excused) for p in points), sum(bool(c.excused) for c in layers)
    if points_excused or layers_excused:
        line += (f"; not counted, as the machine changed: {points_excused} point{'s' if points_excused != 1 else ''}, "
                 f"{layers_excused} layer{'s' if layers_excused != 1 else ''}")
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


def _level(level) -> str:
    slower = level.slowdown
    move = "×1.000" if slower == 1 else f"×{slower:.3f} slower" if slower > 1 else f"×{1 / slower:.3f} faster"
    verdict = "beyond" if level.moved else "within"
    return f"{level.name} {level.base:.4g} → {level.new:.4g} {level.unit} ({move}, {verdict} ×{level.limit:.2f})"


def format_machine(machine: MachineChange) -> str:
    """The machine of both runs: its fingerprint and levels, and whether it changed."""
    fingerprint = ", ".join(f"{column} {value}" for column, value in machine.fingerprint) or "no fingerprint"
    head = f"machine: {'CHANGED' if machine.changed else 'the same'} ({fingerprint})"
    lines = [head]
    lines += [f"  {column}: {b} → {n}" for column, b, n in machine.differs]
    lines += [f"  {_level(level)}" for level in machine.levels]
    lines += [f"  {note}" for note in machine.notes]
    return "\n".join(lines)


def format_excused(comparison: Comparison) -> list[str]:
    """Where the machine changed: the layers its compute slowdown explains and the points not counted."""
    machine = comparison.machine
    if not machine.changed:
        return []
    points, layers = comparison.excused
    lines = [f"the machine's compute time changed ×{machine.compute_slowdown:.3f}; layers whose share of the "
             "compute roof explains their move against their peers:"]
    lines += [f"  {line}" for line in explained_layers(comparison.layers, machine, comparison.shares)] or ["  none"]
    timeouts = sum(p.excused == TIMEOUT_EXCUSE for p in points)
    if timeouts:
        lines.append(f"points that crossed the time budget on the slower machine, not counted: {timeouts}")
    return lines


def format_warning(comparison: Comparison) -> str | None:
    """One line, when the machine changed."""
    if not comparison.machine.changed:
        return None
    points, layers = comparison.excused
    return (f"compare: warning: BASE and NEW ran on different machines (compute ×{comparison.machine.compute_slowdown:.3f}); "
            f"{len(layers)} layer(s) and {len(points)} point(s) not counted as regressions; "
            "re-run BASE on this machine to judge them")
