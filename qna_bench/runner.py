"""The sweep loop: which points run, in what order, and how their rows reach the parquet.

`plan_sweep` expands the config's lists into points, problem → window → mode → layer → compile mode,
so the layers of one point, and a layer's eager and compiled forms, run together; `plan_rounds`
repeats that set ``measure.rounds`` times with the layer order rotated each round; `sweep_errors` finds
invalid points before any work. `run_sweep` sends the layers of each point to a worker process, which
times them in alternating blocks (`qna_bench.point.run_points`), and writes each row as it comes back,
replacing it as further rounds add to it.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qna_bench import disk_cache, results, rounds, tuner
from qna_bench.budget import time_limits
from qna_bench.compile_mode import EAGER
from qna_bench.environment import Environment
from qna_bench.identity import is_current, point_identity
from qna_bench.labels import SHIPPED, TUNED
from qna_bench.measure.canary import is_slow
from qna_bench.measure.probes import MachineProbes, machine_probes
from qna_bench.point import (
    MeasureSettings,
    PointStep,
    SweepPoint,
    base_row,
    is_out_of_memory,
    run_point,
    warm_up_process,
)
from qna_bench.problem import Problem
from qna_bench.progress import Progress
from qna_bench.registry import LayerSpec
from qna_bench.text import mebibytes, milliseconds
from qna_bench.worker import PointWorker, WorkerLost, WorkerSetup, layer_modules

# Callers import the point's measurement from here as well.
__all__ = [
    "MeasureSettings", "PointStep", "SweepPoint", "SweepOutcome", "base_row", "is_out_of_memory", "plan_rounds",
    "plan_sweep", "point_is_valid", "run_point", "run_sweep", "sweep_errors", "warm_up_process",
]

# Statuses a resumed sweep does not measure again (an `error` is retried), when the row is current.
FINAL_STATUSES = ("ok", "unsupported", "oom", "timeout", "skipped")
# A layer whose cost grows with the window and ran out of memory or time at one window will at every
# larger one.
GROWING_FAILURES = ("oom", "timeout")


@dataclass(frozen=True)
class SweepOutcome:
    rows_written: int
    skipped: int
    interrupted: bool
    statuses: dict[str, int] = field(default_factory=dict)


def plan_sweep(
    layers: Sequence[LayerSpec],
    windows: Sequence[int],
    modes: Sequence[str],
    problems: Sequence[Problem],
    compile_modes: Sequence[str] = (EAGER,),
    as_shipped: bool = False,
) -> list[SweepPoint]:
    """The product problems × windows × modes × layers × compile modes, in that nesting order, each
    layer in its tuned form and, with ``as_shipped``, a layer that has forms to choose also as built:
    the layers of one problem, window and mode, every form of a layer among them, are timed together,
    so the two sides of a ratio share the seconds they ran in."""
    return [
        SweepPoint(layer, problem.replace(window=window, mode=mode), compile_mode, tuning)
        for problem, window, mode, layer, compile_mode in itertools.product(problems, windows, modes, layers,
                                                                            compile_modes)
        for tuning in ((TUNED, SHIPPED) if as_shipped and layer.forms else (TUNED,))
    ]


def plan_rounds(points: Sequence[SweepPoint], count: int) -> list[tuple[int, SweepPoint]]:
    """(round, point) in the order they run: the whole set ``count`` times, each run of points with the
    same problem in its planned order, its layers rotated by the round (round 1 starts at its second
    layer); a layer's forms stay together, in their planned order."""
    planned = []
    for _, group in itertools.groupby(points, key=lambda p: p.problem):
        layers = [list(forms) for _, forms in itertools.groupby(group, key=lambda p: p.layer.name)]
        planned.append(layers)
    return [(r, point) for r in range(count) for layers in planned
            for forms in rounds.rotated(layers, r) for point in forms]


def sweep_errors(points: Iterable[SweepPoint]) -> list[str]:
    """Every distinct reason a point of the sweep is bad input, in first-seen order."""
    seen: dict[str, None] = {}
    for point in points:
        errors = point.problem.errors() or point.layer.input_errors(point.problem)
        for message in errors:
            seen.setdefault(message, None)
    return list(seen)


def point_is_valid(point: SweepPoint) -> bool:
    return not point.problem.errors() and not point.layer.input_errors(point.problem)


def _rounds_left(row: dict[str, Any] | None, count: int) -> int:
    if row is None:
        return count
    return max(0, count - (row["rounds"] or 0)) if row["status"] == "ok" else 0


def run_sweep(
    points: Sequence[SweepPoint],
    results_path: Path,
    settings: MeasureSettings,
    env: Environment,
    *,
    resume: bool = True,
    memory_cap_bytes: int | None = None,
    cap_memory: bool = False,
    stream: TextIO | None = None,
) -> SweepOutcome:
    """Measure every point ``settings.rounds`` times in a `PointWorker`, in `plan_rounds` order.

    A point's row is written after its first round and replaced after each further one, so Ctrl-C or a
    kill loses at most the round in flight. With ``resume``, a point whose row in the file is current
    (`qna_bench.identity.is_current`) with a final status is not measured again, and a current ``ok`` row
    with fewer rounds than asked for gets the rounds it lacks.
    """
    with disk_cache.run_cache() as store:  # every round of the sweep runs the forms its first round chose
        started = time.perf_counter()
        outcome = _run_sweep(points, results_path, settings, env, resume=resume, memory_cap_bytes=memory_cap_bytes,
                             cap_memory=cap_memory, stream=stream)
        keys, seconds = tuner.tuned_in(store)
        if keys:
            wall = time.perf_counter() - started
            print(f"tuning: {keys} keys chose their forms in {seconds:.1f} s, {seconds / wall:.1%} of the sweep's "
                  f"{wall:.0f} s", file=stream or sys.stderr)
        return outcome


def _run_sweep(
    points: Sequence[SweepPoint], results_path: Path, settings: MeasureSettings, env: Environment, *,
    resume: bool, memory_cap_bytes: int | None, cap_memory: bool, stream: TextIO | None,
) -> SweepOutcome:
    stream = stream or sys.stderr  # looked up per call: a caller may have redirected it
    run_id = uuid.uuid4().hex[:12]
    count = settings.rounds
    keys = [point_identity(p.layer, p.problem, env, settings, p.compile_mode, p.tuning) for p in points]
    key_of = {id(p): identity["point_key"] for p, identity in zip(points, keys)}
    rows: dict[str, dict[str, Any]] = {}
    if resume:
        on_disk = results.rows_by_key(results_path, FINAL_STATUSES)
        for identity in keys:
            row = on_disk.get(identity["point_key"])
            if row is not None and is_current(row, identity):
                rows[identity["point_key"]] = row
    left = {key_of[id(p)]: _rounds_left(rows.get(key_of[id(p)]), count) for p in points}
    todo = sum(1 for n in left.values() if n)
    skipped = len(points) - todo
    if skipped:
        print(f"resume: {skipped} of {len(points)} points already in {results_path}; measuring {todo}", file=stream)
    failed_at: dict[tuple[str, str, Problem], tuple[int, str]] = {}
    measured_once: dict[tuple[str, str, Problem, int], str] = {}
    written: dict[str, str] = {}
    limits = time_limits(settings.point_budget_s)
    setup = WorkerSetup(layer_modules([p.layer for p in points if left[key_of[id(p)]]]), settings, env,
                        memory_cap_bytes, cap_memory)
    probes = _probes(points, left, key_of, settings, memory_cap_bytes, stream)
    run_canaries: list[float] = []  # every round's canary so far: their median is the run's usual canary
    last_pid: dict[str, int | None] = {}  # the worker process of each point's latest round
    worker_round = 0
    with PointWorker(setup) as worker:
        try:
            if todo:
                worker.start()
                if worker.memory_cap is not None:
                    print(f"memory cap: {worker.memory_cap / 2**30:.1f} GiB above the measuring process's start "
                          "(points beyond it become oom rows)", file=stream)
            progress = Progress(sum(left.values()), stream=stream)
            for round_index, group in itertools.groupby(plan_rounds(points, count),
                                                        key=lambda planned: (planned[0], planned[1].problem)):
                round_index = round_index[0]
                to_measure: list[SweepPoint] = []
                for _, point in group:
                    key = key_of[id(point)]
                    row = rows.get(key)
                    if row is not None and (row["status"] != "ok" or row["rounds"] > round_index):
                        continue
                    failed = failed_at.get(_layer_group(point))
                    if not point.layer.uses_window and (*_layer_group(point), round_index) in measured_once:
                        row = _same_as(rows[measured_once[(*_layer_group(point), round_index)]], point, env, settings,
                                       run_id)
                    elif row is None and failed is not None and point.problem.window > failed[0]:
                        row = results.make_row(
                            **base_row(point, env, settings, run_id),
                            status="skipped",
                            reason=f"not run: {failed[1]} already at window {failed[0]} for this layer and problem",
                        )
                    else:
                        to_measure.append(point)
                        continue
                    _write(row, point, rows, key_of, written, results_path, progress, round_index, count)
                if not to_measure:
                    continue
                if settings.fresh_processes and round_index != worker_round:
                    worker.close()  # round r of every point in worker r: its own process
                    worker_round = round_index
                progress.start(_group_label(to_measure, round_index, count))
                first_round = any(key_of[id(p)] not in rows for p in to_measure)  # memory and FLOPs to measure
                measured_rows = _measure_round(worker, to_measure, first_round, run_canaries, env, settings, run_id,
                                               limits.hard_kill_s, stream)
                for point, (measured, pid) in zip(to_measure, measured_rows):
                    key = key_of[id(point)]
                    measured.update(probes[(point.problem.device, point.problem.dtype)].columns())
                    measured["processes"] = 1 if measured["status"] == "ok" else None
                    row = rows.get(key)
                    if row is not None:
                        row = _with_round(row, measured, round_index, run_id, new_process=pid != last_pid.get(key))
                    else:
                        row = measured
                    last_pid[key] = pid
                    measured_once[(*_layer_group(point), round_index)] = key
                    if (row["status"] in GROWING_FAILURES and settings.skip_larger_after_failure
                            and point.layer.cost_grows_with_window):
                        failed_at[_layer_group(point)] = (point.problem.window, row["status"])
                    _write(row, point, rows, key_of, written, results_path, progress, round_index, count)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(written)} of {todo} points written to {results_path}", file=stream)
            return SweepOutcome(len(written), skipped, True, _count(written))
    return SweepOutcome(len(written), skipped, False, _count(written))


def _layer_group(point: SweepPoint) -> tuple[str, str, Problem]:
    """A layer's form on a problem at any window: what a failure at one window says about the larger."""
    return point.layer.name, point.compile_mode, point.tuning, point.problem.replace(window=0)


def _group_label(points: Sequence[SweepPoint], round_index: int, count: int) -> str:
    problem = points[0].problem
    names = ", ".join(p.label.split(" ", 1)[0] for p in points)
    label = f"k={problem.window} {problem.mode} {problem.batch}x{problem.height}x{problem.width}x{problem.channels}: {names}"
    return label if count == 1 else f"{label} round {round_index + 1}/{count}"


def _write(
    row: dict[str, Any], point: SweepPoint, rows: dict[str, dict[str, Any]], key_of: dict[int, str],
    written: dict[str, str], results_path: Path, progress: Progress, round_index: int, count: int,
) -> None:
    """Keep ``row`` as ``point``'s latest, append it to the results file and report it."""
    key = key_of[id(point)]
    rows[key] = row
    results.append_rows(results_path, [row])
    written[key] = row["status"]
    progress.finish(_summary(row), label=point.label if count == 1 else f"{point.label} round {round_index + 1}/{count}")
    if row["status"] != "ok":  # no further rounds of a point that did not measure
        progress.total -= count - 1 - round_index


def _measure_round(
    worker: PointWorker, points: Sequence[SweepPoint], first_round: bool, run_canaries: list[float],
    env: Environment, settings: MeasureSettings, run_id: str, limit_s: float | None, stream: TextIO,
) -> list[tuple[dict[str, Any], int | None]]:
    """One round of ``points`` (the layers of one problem) in ``worker``, timed together: each one's row
    and the worker's pid. A round whose canary ran slow (`qna_bench.measure.canary.is_slow`) is measured
    once more; if its canary is slow again the rows count it in ``slow_rounds``. Each canary joins
    ``run_canaries``. A worker lost at the hard limit or to a crash says nothing of which layer did it:
    each layer is then measured alone, so only that one's row records it."""
    measured: list[dict[str, Any]] = []
    pid = None
    for attempt in range(2):
        started = time.perf_counter()
        outcome = worker.run_together([(p.layer.name, p.compile_mode, p.tuning) for p in points], points[0].problem, run_id,
                                      limit_s, first_round=first_round)
        pid = worker.pid
        if isinstance(outcome, WorkerLost):
            return _after_lost_worker(outcome, worker, points, first_round, run_canaries, env, settings, run_id,
                                      limit_s, stream, time.perf_counter() - started)
        measured = outcome
        canary = next(((r.get("canary_s") or [None])[-1] for r in measured if r.get("canary_s")), None)
        if canary is None:
            break
        slow = is_slow(canary, run_canaries, settings.slow_canary_share)
        usual = statistics.median(run_canaries) if run_canaries else canary
        run_canaries.append(canary)
        for row in measured:
            if row.get("canary_s"):
                row["slow_rounds"] = int(slow)
        if not slow:
            break
        again = "measuring it again" if attempt == 0 else "flagged in its rows"
        print(f"slow round: {_group_label(points, 0, 1)}: canary {canary * 1e3:.2f} ms against the run's "
              f"{milliseconds(usual)}; {again}", file=stream)
    return [(row, pid) for row in measured]


def _after_lost_worker(
    lost: WorkerLost, worker: PointWorker, points: Sequence[SweepPoint], first_round: bool,
    run_canaries: list[float], env: Environment, settings: MeasureSettings, run_id: str, limit_s: float | None,
    stream: TextIO, seconds: float,
) -> list[tuple[dict[str, Any], int | None]]:
    """The rows of a round whose worker was lost: the layer in flight records it, and its peers are measured
    again in a fresh worker (together, or each alone when the loss came while timing them all)."""
    culprit = lost.layer_index if lost.layer_index is not None else (0 if len(points) == 1 else None)
    how = "killed at the hard limit" if lost.killed else lost.describe()
    if culprit is None:
        print(f"worker lost ({how}) while timing {len(points)} layers together: measuring each alone", file=stream)
        return [pair for p in points for pair in _measure_round(
            worker, [p], first_round, run_canaries, env, settings, run_id, limit_s, stream)]
    row = _lost_row(lost, points[culprit], env, settings, run_id, limit_s)
    row["point_seconds"] = seconds
    rest = [p for index, p in enumerate(points) if index != culprit]
    measured = _measure_round(worker, rest, first_round, run_canaries, env, settings, run_id, limit_s,
                              stream) if rest else []
    return [*measured[:culprit], (row, None), *measured[culprit:]]


def _probes(
    points: Sequence[SweepPoint], left: dict[str, int], key_of: dict[int, str], settings: MeasureSettings,
    memory_cap_bytes: int | None, stream: TextIO,
) -> dict[tuple[str, str], MachineProbes]:
    """The machine probes of every device and dtype the sweep measures, once, in this process (cached
    on disk across runs): the worker processes, started again after every kill, never probe."""
    wanted = sorted({(p.problem.device, p.problem.dtype) for p in points if left[key_of[id(p)]]})
    probes = {}
    for device, dtype in wanted:
        probes[(device, dtype)] = machine_probes(device, dtype, settings.threads, settings.probes,
                                                 cap_bytes=memory_cap_bytes, stream=stream)
    return probes


def _count(statuses: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def _with_round(
    row: dict[str, Any], measured: dict[str, Any], round_index: int, run_id: str, *, new_process: bool
) -> dict[str, Any]:
    """``row`` with round ``round_index``'s measurement added (``new_process``: it ran in another worker
    process than the row's latest round); a round that failed leaves the earlier rounds and says so in the
    reason."""
    values = {**row, "run_id": run_id, "point_seconds": (row["point_seconds"] or 0.0) + measured["point_seconds"]}
    if measured["status"] == "ok":
        values.update(rounds.add_round(row, measured["times_s"]))
        values["processes"] = (row.get("processes") or 1) + int(new_process)
        values["canary_s"] = [*(row.get("canary_s") or []), *(measured.get("canary_s") or [])] or None
        values["slow_rounds"] = (row.get("slow_rounds") or 0) + (measured.get("slow_rounds") or 0)
        if measured.get("form") != row.get("form"):  # the run's own store makes this rare: say so where it happens
            note = f"round {round_index + 1} ran the form {measured.get('form')}"
            values["reason"] = f"{row['reason']}; {note}" if row["reason"] else note
    else:
        note = f"round {round_index + 1}: {measured['status']}: {measured['reason']}"
        values["reason"] = f"{row['reason']}; {note}" if row["reason"] else note
    return results.make_row(**values)


def _lost_row(
    lost: WorkerLost, point: SweepPoint, env: Environment, settings: MeasureSettings, run_id: str, limit_s: float | None
) -> dict[str, Any]:
    """The row of a point whose worker was killed at the hard limit, or died."""
    if lost.killed:
        reason = (f"ran past the hard limit of {limit_s:g} s inside a native op that the budget's alarm cannot "
                  "interrupt; its worker process was killed")
        return results.make_row(**base_row(point, env, settings, run_id), status="timeout", reason=reason)
    reason = f"the measuring worker process died ({lost.describe()}); a fresh one runs the next point"
    return results.make_row(**base_row(point, env, settings, run_id), status="error", reason=reason)


def _same_as(source: dict[str, Any], point: SweepPoint, env: Environment, settings: MeasureSettings, run_id: str) -> dict[str, Any]:
    """The row of a layer that ignores the window, at another window: the one measurement, not a new one."""
    note = f"the layer ignores the window: measured once, at window {source['window']}"
    reason = f"{note}; {source['reason']}" if source["reason"] else note
    values = {**source, **base_row(point, env, settings, run_id), "reason": reason, "point_seconds": 0.0}
    return results.make_row(**values)


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    peak = row["peak_bytes"]
    memory = mebibytes(peak) if peak is not None else "memory n/a"
    return f"{milliseconds(row['median_s'])}, {memory}"
