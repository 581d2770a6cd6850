"""Measures the layers of one sweep point: each is built → prepared (a layer's own choices, such as
QnA's plan) → compiled (a compiled form) → first call (on CPU, eager: the memory pass) → FLOPs; then all
are timed in alternating blocks → a row each.

The worker process runs `run_points`; whatever goes wrong becomes the row's status and reason. The
sweep loop (`qna_bench.runner`) decides which points run and in what order.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qna_bench import compile_mode as forms
from qna_bench import results
from qna_bench.budget import PointBudget, PointTimeout, time_limits
from qna_bench.environment import Environment, utc_now
from qna_bench.forms import GEMM, form_columns, prepare_forms
from qna_bench.heap import trim_cpu_heap
from qna_bench.identity import point_identity
from qna_bench.labels import SHIPPED, TUNED
from qna_bench.measure.canary import canary_seconds
from qna_bench.measure.flops import count_flops
from qna_bench.measure.latency import LatencyStats, measure_interleaved
from qna_bench.measure.memory import MemoryStats, measure_peak_memory, untracked
from qna_bench.measure.params import count_parameters, parameter_bytes
from qna_bench.measure.profile import write_profile
from qna_bench.problem import Problem
from qna_bench.registry import LayerSpec, UnsupportedProblem
from qna_bench.rounds import geometric_mean


@dataclass(frozen=True)
class MeasureSettings:
    threads: int
    # Why these threads (`qna_bench.cores`): asked for, or the cores idle at the start.
    threads_note: str = ""
    min_run_time_s: float = 0.5
    min_replicates: int = 5
    point_budget_s: float | None = 120.0
    memory: bool = True
    flops: bool = True
    skip_larger_after_failure: bool = True
    # Times the sweep measures every point, the layers of a point timed together, their order rotated.
    rounds: int = 1
    # measure.profile=true: the results folder, under whose profiles/ each point writes its per-op profile.
    profile_dir: str | None = None
    # CUDA: cuDNN picks each convolution's algorithm by timing them on the first call.
    cudnn_benchmark: bool = True
    # The machine probes: `cached` (from the disk cache when fresh), `fresh` (measured now) or `off`.
    probes: str = "cached"
    # tune: how every layer chooses its form (QnA its plan, a peer its GEMM library): cached, always or
    # off; see `qna_bench.tuner`.
    tune: str = "cached"
    # Each round in fresh worker processes: a ratio's spread over rounds then covers the noise between
    # processes, which a single process's rounds cannot see.
    fresh_processes: bool = True
    # The canary (`qna_bench.measure.canary`) before and after each round; a round whose canary ran over
    # ``slow_canary_share`` slower than the run's median canary is measured again once, then flagged.
    canary: bool = True
    slow_canary_share: float = 0.3
    # The worker's CPU heap (`qna_bench.heap`): `caching` keeps a call's blocks up to 32 MiB for the next
    # call, `system` leaves glibc's defaults (whose moving thresholds decide that per process).
    cpu_heap: str = "caching"


@dataclass(frozen=True)
class SweepPoint:
    layer: LayerSpec
    problem: Problem
    # eager, or the torch.compile mode of the layer's compiled form (`qna_bench.compile_mode`)
    compile_mode: str = forms.EAGER
    # tuned: the layer in the form its tuner chose; shipped: as built (`qna_bench.forms`)
    tuning: str = TUNED

    @property
    def label(self) -> str:
        p = self.problem
        form = ", ".join(f for f in (forms.form_label(self.compile_mode), self.tuning if self.tuning == SHIPPED else "") if f)
        return f"{self.layer.name}{f'[{form}]' if form else ''} k={p.window} {p.mode} {p.batch}x{p.height}x{p.width}x{p.channels}"


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
    """The row's identity: layer, problem, environment and settings, before anything is measured."""
    layer = point.layer
    row = dict(
        run_id=run_id,
        timestamp=utc_now(),
        family=layer.family,
        role=layer.role,
        implementation=layer.implementation,
        layout=layer.layout,
        uses_window=layer.uses_window,
        load_avg=os.getloadavg()[0],
        **point_identity(layer, point.problem, env, settings, point.compile_mode, point.tuning),
    )
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


def _first_call(
    step: PointStep, device: torch.device, memory: bool, compiles: bool
) -> tuple[float, MemoryStats | None]:
    """Run the first (warm-up) call; its seconds, and on CPU its memory.

    On CPU the profiler's allocator events count the call's own allocations, not allocator state, so the
    first call of an eager layer doubles as the memory pass (one call fewer per point). On CUDA, and for
    layers that compile on their first call, the memory pass comes after the warm-up, which owns the
    one-off workspaces, autotuning and compilation.
    """
    if not (memory and device.type == "cpu") or compiles:
        return _timed_call(step, device), None
    stats = measure_peak_memory(step, device, base_bytes=0)
    return stats.call_s, dataclasses.replace(stats, base_bytes=step.base_bytes)


@dataclass
class PreparedPoint:
    """A point built, warmed up and counted, ready to time: its row so far, its step and a call's seconds
    (sizes its blocks)."""

    point: SweepPoint
    row: dict[str, Any]
    step: PointStep
    one_call_s: float
    started: float
    first_round: bool


def prepare_point(
    point: SweepPoint, settings: MeasureSettings, env: Environment, run_id: str, *, first_round: bool = True
) -> PreparedPoint | dict[str, Any]:
    """Everything of a point before its timed calls: build → prepare → compile → first call (the memory
    pass on CPU) → FLOPs. The `PreparedPoint`, or the final row of a point that cannot be timed.

    A later round (``first_round=False``) skips memory and FLOPs: they do not change from round to round.
    A compiled form compiles afresh in its first call, a warm-up like a layer that `compiles`; a failure
    of the compiler makes the row `unsupported`.
    """
    layer, problem, mode = point.layer, point.problem, point.compile_mode
    compiled = forms.is_compiled(mode)
    row = base_row(point, env, settings, run_id)
    started = time.perf_counter()
    reason = layer.unsupported_reason(problem) or forms.unsupported_reason(mode, problem.device)
    if reason is not None:
        return results.make_row(**row, status="unsupported", reason=reason, point_seconds=0.0)
    track_memory, count = settings.memory and first_round, settings.flops and first_round
    limits = time_limits(settings.point_budget_s)
    module = x = step = None
    try:
        # The first call compiles compiled layers (seconds to minutes): it gets a budget of its own.
        with PointBudget(limits.first_call_s).alarm():
            torch.set_num_threads(settings.threads)
            module = layer.build(problem)
            row["params"] = count_parameters(module)
            x = problem.make_input(layer.layout)
            # Before the first call, no choosing inside a measurement: the layer's own choices (QnA's plan),
            # then its GEMM form; a shipped point runs the layer as built.
            tune = "off" if point.tuning == SHIPPED else settings.tune
            if layer.prepare is not None:
                layer.prepare(module, x, problem, dataclasses.replace(settings, tune=tune))
            if GEMM in layer.forms:
                prepare_forms(module, x, problem, row["code_version"], tune)
            row.update(form_columns(module))
            if layer.analytic_flops is not None:
                row["flops_analytic"] = layer.closed_form_flops(problem, module)
            if layer.analytic_bytes is not None:
                row["bytes_analytic"] = layer.closed_form_bytes(problem, module)
            if compiled:
                forms.start_fresh()
            step = PointStep(forms.compile_module(module, mode), x, problem)
            try:
                row["first_call_s"], memory = _first_call(step, problem.torch_device, track_memory,
                                                          layer.compiles or compiled)
            except Exception as exc:
                if compiled and forms.is_compile_failure(exc):
                    # The compiler wraps what interrupted it: a budget's alarm or a failed allocation stays
                    # a timeout or an oom.
                    root = forms.root_cause(exc)
                    if isinstance(root, PointTimeout) or is_out_of_memory(root):
                        raise root from None
                    why = _one_line(exc) + (f" ({_one_line(root)})" if root is not exc else "")
                    raise UnsupportedProblem(forms.failure_reason(mode, why)) from exc
                raise
            row["base_bytes"] = step.base_bytes
            row["layer_flags"] = layer.layer_flags(module, problem)
            if compiled:
                row["layer_flags"]["graph_breaks"] = forms.graph_breaks()
        budget = PointBudget(limits.point_s)
        with budget.alarm():
            # The seconds of one call, for the budget and the blocks: a call after the warm-up, or on
            # CPU the tracked first call (a slight overestimate of an eager layer's steady call).
            one_call_s = memory.call_s if memory is not None else None
            if track_memory and memory is None:
                memory = measure_peak_memory(step, problem.torch_device, row["base_bytes"], (step.x, *step.params))
                one_call_s = memory.call_s
            if memory is not None:
                row.update(peak_bytes=memory.peak_bytes, memory_method=memory.method, memory_note=memory.note)
            if one_call_s is None:
                one_call_s = _timed_call(step, problem.torch_device)
            if count:
                budget.check(one_call_s, calls_left=3 + settings.min_replicates, extra_s=settings.min_run_time_s)
                # Counted on the eager module: the same work, and no compile inside the counter's mode.
                flops = count_flops(dataclasses.replace(step, module=module) if compiled else step,
                                    layer.flop_formulas)
                row.update(flops=flops.flops, flops_method=flops.method)
                if flops.note:
                    row["reason"] = flops.note
            budget.check(one_call_s, calls_left=settings.min_replicates,
                         extra_s=max(0.0, settings.min_run_time_s - settings.min_replicates * one_call_s))
        return PreparedPoint(point, row, step, one_call_s, started, first_round)
    except Exception as exc:  # noqa: BLE001 - a sweep outlives any layer's failure
        row.update(_failure_columns(exc))
        row["point_seconds"] = time.perf_counter() - started
        return results.make_row(**row)
    finally:
        del module, x, step
        release_memory(problem.device)


def _failure_columns(exc: BaseException) -> dict[str, str]:
    """The status and reason of a point that raised ``exc``."""
    if isinstance(exc, PointTimeout):  # the latency statistics stay empty: one cold call is not a median
        return dict(status="timeout", reason=str(exc))
    if isinstance(exc, UnsupportedProblem):
        return dict(status="unsupported", reason=str(exc))
    return dict(status="oom" if is_out_of_memory(exc) else "error", reason=_one_line(exc))


def run_points(
    points: Sequence[SweepPoint], settings: MeasureSettings, env: Environment, run_id: str, *,
    first_round: bool = True, on_prepared: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure the layers of one point together, a row each, in ``points``' order: each is prepared
    (`prepare_point`; ``on_prepared`` is called after each), then all are timed in alternating blocks
    (`measure_interleaved`) between one canary before and one after, so each ratio's two sides share
    the seconds they ran in."""
    rows: dict[int, dict[str, Any]] = {}
    prepared: list[tuple[int, PreparedPoint]] = []
    for index, point in enumerate(points):
        outcome = prepare_point(point, settings, env, run_id, first_round=first_round)
        if on_prepared is not None:
            on_prepared()
        if isinstance(outcome, PreparedPoint):
            prepared.append((index, outcome))
        else:
            rows[index] = outcome
    if prepared:
        ready = [p for _, p in prepared]
        device = ready[0].point.problem.torch_device
        # Each point's timing fits its own budget (checked as it was prepared, before the next point's
        # preparation ran on its clock): together they get one budget each.
        point_s = time_limits(settings.point_budget_s).point_s
        budget = PointBudget(None if point_s is None else point_s * len(ready))
        try:
            with budget.alarm():
                canary_before = canary_seconds(device) if settings.canary else None
                stats = measure_interleaved(
                    [p.step for p in ready], threads=settings.threads, one_call_s=[p.one_call_s for p in ready],
                    min_run_time_s=settings.min_run_time_s, min_replicates=settings.min_replicates,
                    budget=budget, labels=[p.point.label for p in ready])
                # The slower of the two: a slow spell at either end shows.
                canary = max(canary_before, canary_seconds(device)) if canary_before is not None else None
            for (index, point), point_stats in zip(prepared, stats):
                rows[index] = _finished_row(point, point_stats, canary, settings)
        except Exception as exc:  # noqa: BLE001 - a sweep outlives any layer's failure
            for index, point in prepared:
                rows[index] = results.make_row(**point.row, **_failure_columns(exc),
                                               point_seconds=time.perf_counter() - point.started)
        finally:
            del ready, prepared
            release_memory(points[0].problem.device)
    return [rows[index] for index in range(len(points))]


def _finished_row(
    prepared: PreparedPoint, stats: LatencyStats, canary_s: float | None, settings: MeasureSettings
) -> dict[str, Any]:
    row = {**prepared.row, **_latency_columns(stats), "status": "ok"}
    if canary_s is not None:
        row["canary_s"] = [canary_s]
    if forms.is_compiled(prepared.point.compile_mode):
        row["compile_s"] = max(0.0, row["first_call_s"] - stats.median_s)
    if settings.profile_dir is not None and prepared.first_round:  # after the timed calls: no profiler overhead in them
        row["profile_file"] = write_profile(prepared.step, prepared.point.problem.torch_device, row,
                                            settings.profile_dir)
    row["point_seconds"] = time.perf_counter() - prepared.started
    return results.make_row(**row)


def run_point(
    point: SweepPoint, settings: MeasureSettings, env: Environment, run_id: str, *, first_round: bool = True
) -> dict[str, Any]:
    """Measure one point (`run_points` of one); whatever goes wrong becomes the row's status and reason."""
    return run_points([point], settings, env, run_id, first_round=first_round)[0]


def warm_up_tools() -> None:
    """Use the memory profiler and the FLOP counter once, on nothing: their first use imports parts of
    torch (the profiler imports inductor, over a second) that would otherwise land in a point's first
    call and its clock."""
    measure_peak_memory(lambda: None, torch.device("cpu"), base_bytes=0)
    count_flops(lambda: None)


def warm_up_process(point: SweepPoint, settings: MeasureSettings, calls: int = 3) -> None:
    """Run ``point``'s step a few times and record nothing: the process's first calls run slow
    (qna's first point measured ~2× its later self until any layer had run), whichever point is first."""
    if point.layer.unsupported_reason(point.problem) is not None:
        return
    step = None
    try:
        with PointBudget(time_limits(settings.point_budget_s).first_call_s).alarm():
            torch.set_num_threads(settings.threads)
            step = PointStep(point.layer.build(point.problem), point.problem.make_input(point.layer.layout), point.problem)
            if point.layer.prepare is not None:
                point.layer.prepare(step.module, step.x, point.problem, settings)
            for _ in range(calls):
                step()
    except Exception:  # noqa: BLE001 - the point itself will run again and report what went wrong
        pass
    finally:
        step = None
        release_memory(point.problem.device)


def release_memory(device: str) -> None:
    """Free what a point left behind, so a heavy point does not slow the next (facts.md: up to 6×)."""
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    else:
        trim_cpu_heap()


def _latency_columns(stats: LatencyStats) -> dict[str, Any]:
    columns = {**dataclasses.asdict(stats), "times_s": list(stats.times_s)}
    return {**columns, "round_medians_s": [stats.median_s], "round_geomeans_s": [geometric_mean(stats.times_s)],
            "rounds": 1}
