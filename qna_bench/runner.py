"""Runs sweep points: build → first call (on CPU: the memory pass) → FLOPs → latency → row. Failures become rows.

`plan_sweep` expands the config's lists into points, `sweep_errors` finds invalid ones before any
work, `run_point` measures one point and `run_sweep` appends each finished row to the parquet before
starting the next.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import itertools
import os
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from qna_bench import results
from qna_bench.budget import PointBudget, PointTimeout
from qna_bench.environment import Environment, utc_now
from qna_bench.measure.flops import count_flops
from qna_bench.measure.latency import LatencyStats, measure_latency
from qna_bench.measure.memory import MemoryStats, measure_peak_memory, untracked
from qna_bench.measure.params import count_parameters, parameter_bytes
from qna_bench.problem import Problem
from qna_bench.progress import Progress
from qna_bench.registry import LayerSpec, UnsupportedProblem
from qna_bench.worker import PointWorker, WorkerLost, WorkerSetup, hard_limit_s, layer_modules

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim
    _LIBC = None

# Statuses a resumed sweep does not measure again (an `error` is retried).
FINAL_STATUSES = ("ok", "unsupported", "oom", "timeout", "skipped")
# The first (warm-up, compiling) call may take this many point budgets, at least a minute.
FIRST_CALL_BUDGET_FACTOR = 3
# A layer that ran out of memory or time at one window will at every larger one (cost grows with k).
GROWING_FAILURES = ("oom", "timeout")


@dataclass(frozen=True)
class MeasureSettings:
    threads: int
    min_run_time_s: float = 0.5
    min_replicates: int = 5
    point_budget_s: float | None = 120.0
    memory: bool = True
    flops: bool = True
    skip_larger_after_failure: bool = True


@dataclass(frozen=True)
class SweepPoint:
    layer: LayerSpec
    problem: Problem

    @property
    def label(self) -> str:
        p = self.problem
        return f"{self.layer.name} k={p.window} {p.mode} {p.batch}x{p.height}x{p.width}x{p.channels}"


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
) -> list[SweepPoint]:
    """The product problems × layers × windows × modes, in that nesting order."""
    return [
        SweepPoint(layer, problem.replace(window=window, mode=mode))
        for problem, layer, window, mode in itertools.product(problems, layers, windows, modes)
    ]


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


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or "DefaultCPUAllocator" in text
    )


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:400] if lines else ''}".rstrip(": ")


def base_row(point: SweepPoint, env: Environment, settings: MeasureSettings, run_id: str) -> dict[str, Any]:
    """The row's identity: layer, problem and environment, before anything is measured."""
    layer = point.layer
    row = dict(
        run_id=run_id,
        timestamp=utc_now(),
        layer=layer.name,
        family=layer.family,
        implementation=layer.implementation,
        layout=layer.layout,
        uses_window=layer.uses_window,
        threads=settings.threads,
        load_avg=os.getloadavg()[0],
        **point.problem.as_dict(),
        **env.as_dict(),
    )
    row["point_key"] = results.point_key(row)
    return row


@dataclass
class PointStep:
    """The callable to measure and what it holds on to; a train step makes its upstream gradient from
    the output of its first call (untracked: it is an input, like ``x``)."""

    module: torch.nn.Module
    x: torch.Tensor
    problem: Problem
    grad_out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def __call__(self) -> None:
        if self.problem.mode == "forward":
            with torch.inference_mode():
                self.module(self.x)
            return
        self.x.grad = None
        for p in self.params:
            p.grad = None
        out = self.module(self.x)
        if self.grad_out is None:
            with untracked():
                self.grad_out = self.problem.make_output_grad(out)
        out.backward(self.grad_out)

    @property
    def base_bytes(self) -> int:
        """Bytes that exist before a call: input, upstream gradient, parameters."""
        grad_bytes = self.grad_out.nbytes if self.grad_out is not None else 0
        return self.x.nbytes + grad_bytes + parameter_bytes(self.module)


def _timed_call(step: PointStep, device: torch.device) -> float:
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _first_call(step: PointStep, device: torch.device, memory: bool) -> tuple[float, MemoryStats | None]:
    """Run the first (warm-up, compiling) call; its seconds, and on CPU its memory.

    On CPU the profiler's allocator events count the call's own allocations, not allocator state, so the
    first call doubles as the memory pass (one call fewer per point). On CUDA the memory pass comes after
    the warm-up, which owns the one-off workspaces and autotuning.
    """
    if not (memory and device.type == "cpu"):
        return _timed_call(step, device), None
    stats = measure_peak_memory(step, device, base_bytes=0)
    return stats.call_s, dataclasses.replace(stats, base_bytes=step.base_bytes)


def run_point(point: SweepPoint, settings: MeasureSettings, env: Environment, run_id: str) -> dict[str, Any]:
    """Measure one point; whatever goes wrong becomes the row's status and reason."""
    layer, problem = point.layer, point.problem
    row = base_row(point, env, settings, run_id)
    started = time.perf_counter()
    reason = layer.unsupported_reason(problem)
    if reason is not None:
        return results.make_row(**row, status="unsupported", reason=reason, point_seconds=0.0)
    module = x = step = None
    try:
        # The first call compiles compiled layers (seconds to minutes): it gets a budget of its own.
        with PointBudget(first_call_budget_s(settings.point_budget_s)).alarm():
            torch.set_num_threads(settings.threads)
            module = layer.build(problem)
            row["params"] = count_parameters(module)
            if layer.analytic_flops is not None:
                row["flops_analytic"] = int(layer.analytic_flops(problem))
            x = problem.make_input(layer.layout)
            step = PointStep(module, x, problem)
            row["first_call_s"], memory = _first_call(step, problem.torch_device, settings.memory)
            row["base_bytes"] = step.base_bytes
            row["layer_flags"] = layer.layer_flags(module, problem)
        budget = PointBudget(settings.point_budget_s)
        with budget.alarm():
            # The seconds of one call, for the budget and the autorange: a call after the warm-up, or on
            # CPU the tracked first call (a slight overestimate of an eager layer's steady call).
            one_call_s = memory.call_s if memory is not None else None
            if settings.memory and memory is None:
                memory = measure_peak_memory(step, problem.torch_device, row["base_bytes"], (step.x, *step.params))
                one_call_s = memory.call_s
            if memory is not None:
                row.update(peak_bytes=memory.peak_bytes, memory_method=memory.method, memory_note=memory.note)
            if one_call_s is None:
                one_call_s = _timed_call(step, problem.torch_device)
            if settings.flops:
                budget.check(one_call_s, calls_left=3 + settings.min_replicates, extra_s=settings.min_run_time_s)
                flops = count_flops(step, layer.flop_formulas)
                row.update(flops=flops.flops, flops_method=flops.method)
                if flops.note:
                    row["reason"] = flops.note
            stats = measure_latency(
                step,
                threads=settings.threads,
                min_run_time_s=settings.min_run_time_s,
                min_replicates=settings.min_replicates,
                one_call_s=one_call_s,
                budget=budget if settings.point_budget_s is not None else None,
                label=point.label,
            )
        row.update(_latency_columns(stats), status="ok")
    except PointTimeout as exc:
        row.update(status="timeout", reason=str(exc))
        if exc.one_call_s is not None:
            row.update(_latency_columns(LatencyStats.from_times([exc.one_call_s])))
    except UnsupportedProblem as exc:
        row.update(status="unsupported", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a sweep outlives any layer's failure
        row.update(status="oom" if is_out_of_memory(exc) else "error", reason=_one_line(exc))
    finally:
        del module, x, step
        release_memory(problem.device)
    row["point_seconds"] = time.perf_counter() - started
    return results.make_row(**row)


def warm_up_process(point: SweepPoint, settings: MeasureSettings, calls: int = 3) -> None:
    """Run ``point``'s step a few times and record nothing: the process's first calls run slow
    (qna's first point measured ~2× its later self until any layer had run), whichever point is first."""
    if point.layer.unsupported_reason(point.problem) is not None:
        return
    try:
        with PointBudget(first_call_budget_s(settings.point_budget_s)).alarm():
            torch.set_num_threads(settings.threads)
            step = PointStep(point.layer.build(point.problem), point.problem.make_input(point.layer.layout), point.problem)
            for _ in range(calls):
                step()
    except Exception:  # noqa: BLE001 - the point itself will run again and report what went wrong
        pass
    finally:
        step = None
        release_memory(point.problem.device)


def first_call_budget_s(point_budget_s: float | None) -> float | None:
    return None if point_budget_s is None else max(FIRST_CALL_BUDGET_FACTOR * point_budget_s, 60.0)


def release_memory(device: str) -> None:
    """Free what a point left behind, so a heavy point does not slow the next (facts.md: up to 6×)."""
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


def _latency_columns(stats: LatencyStats) -> dict[str, Any]:
    return {**dataclasses.asdict(stats), "times_s": list(stats.times_s)}


def run_sweep(
    points: Sequence[SweepPoint],
    results_path: Path,
    settings: MeasureSettings,
    env: Environment,
    *,
    resume: bool = True,
    memory_cap_bytes: int | None = None,
    cap_memory: bool = False,
    stream: TextIO = sys.stderr,
) -> SweepOutcome:
    """Measure every point in a `PointWorker`, appending each row to ``results_path`` as soon as it is done.

    With ``resume``, points already in the file with a final status are skipped. Ctrl-C stops after
    the rows written so far, which stay on disk. ``memory_cap_bytes`` (None: 80% of what is free)
    caps the worker's memory when ``cap_memory``.
    """
    run_id = uuid.uuid4().hex[:12]
    done = results.measured_keys(results_path, FINAL_STATUSES) if resume else set()
    todo = [p for p in points if base_row(p, env, settings, run_id)["point_key"] not in done]
    skipped = len(points) - len(todo)
    if skipped:
        print(f"resume: {skipped} of {len(points)} points already in {results_path}; measuring {len(todo)}", file=stream)
    failed_at: dict[tuple[str, Problem], tuple[int, str]] = {}
    measured_once: dict[tuple[str, Problem], dict[str, Any]] = {}
    statuses: dict[str, int] = {}
    written = 0
    limit_s = hard_limit_s(settings.point_budget_s, first_call_budget_s(settings.point_budget_s))
    setup = WorkerSetup(layer_modules([p.layer for p in todo]), settings, env, memory_cap_bytes, cap_memory)
    with PointWorker(setup) as worker:
        try:
            if todo:
                worker.start()
                if worker.memory_cap is not None:
                    print(f"memory cap: {worker.memory_cap / 2**30:.1f} GiB above the measuring process's start "
                          "(points beyond it become oom rows)", file=stream)
            progress = Progress(len(todo), stream=stream)
            for point in todo:
                progress.start(point.label)
                group = (point.layer.name, point.problem.replace(window=0))
                failure = failed_at.get(group) if settings.skip_larger_after_failure and point.layer.uses_window else None
                if not point.layer.uses_window and group in measured_once:
                    row = _same_as(measured_once[group], point, env, settings, run_id)
                elif failure is not None and point.problem.window > failure[0]:
                    row = results.make_row(
                        **base_row(point, env, settings, run_id),
                        status="skipped",
                        reason=f"not run: {failure[1]} already at window {failure[0]} for this layer and problem",
                    )
                else:
                    started = time.perf_counter()
                    row = worker.run(point.layer.name, point.problem, run_id, limit_s)
                    if isinstance(row, WorkerLost):
                        row = _lost_row(row, point, env, settings, run_id, limit_s)
                        row["point_seconds"] = time.perf_counter() - started
                    measured_once[group] = row
                    if row["status"] in GROWING_FAILURES:
                        failed_at[group] = (point.problem.window, row["status"])
                results.append_rows(results_path, [row])
                written += 1
                statuses[row["status"]] = statuses.get(row["status"], 0) + 1
                progress.finish(_summary(row))
        except KeyboardInterrupt:
            print(f"\ninterrupted: {written} of {len(todo)} points written to {results_path}", file=stream)
            return SweepOutcome(written, skipped, True, statuses)
    return SweepOutcome(written, skipped, False, statuses)


def _lost_row(
    lost: WorkerLost, point: SweepPoint, env: Environment, settings: MeasureSettings, run_id: str, limit_s: float | None
) -> dict[str, Any]:
    """The row of a point whose worker was killed at the hard limit, or died."""
    if lost.killed:
        reason = (f"ran past the hard limit of {limit_s:g} s inside a native op that the budget's alarm cannot "
                  "interrupt; its worker process was killed")
        return results.make_row(**base_row(point, env, settings, run_id), status="timeout", reason=reason)
    reason = f"the measuring worker process died (exit code {lost.exitcode}); a fresh one runs the next point"
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
    memory = f"{peak / 2**20:.1f} MiB" if peak is not None else "memory n/a"
    return f"{row['median_s'] * 1e3:.2f} ms, {memory}"
