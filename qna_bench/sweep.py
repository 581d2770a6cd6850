"""From a composed config to a results folder: validate everything first, then measure and plot.

Bad input is refused before any measurement with one line per problem and exit status 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from qna_bench import results
from qna_bench.compile_mode import COMPILE_MODES
from qna_bench.cores import busy_shares, idle_core_threads
from qna_bench.environment import read_environment
from qna_bench.heap import CPU_HEAPS
from qna_bench.measure.probes import PROBE_MODES
from qna_bench.problem import MODES, Problem
from qna_bench.qna import TUNES
from qna_bench.registry import LayerSpec, list_layers, resolve_layers
from qna_bench.runner import (
    MeasureSettings,
    SweepOutcome,
    SweepPoint,
    base_row,
    plan_sweep,
    point_is_valid,
    run_sweep,
    sweep_errors,
)
from qna_bench.summary import summary_table

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# The problem fields a config sets (window and mode come from their own lists).
PROBLEM_FIELDS = tuple(f.name for f in dataclasses.fields(Problem) if f.name not in ("window", "mode"))


class BadInput(Exception):
    """Input refused before any work; each entry of ``messages`` is one line naming field and allowed values."""

    def __init__(self, messages: Sequence[str]):
        super().__init__("\n".join(messages))
        self.messages = list(messages)


@dataclass(frozen=True)
class SweepPlan:
    points: list[SweepPoint]
    skipped_invalid: list[str]
    settings: MeasureSettings
    results_path: Path
    resume: bool
    memory_cap_bytes: int | None
    plots: bool


def _as_list(value: Any, field_name: str) -> list[Any]:
    if isinstance(value, (ListConfig, list, tuple)):
        items = list(value)
    elif value is None or isinstance(value, (DictConfig, dict)):
        raise BadInput([f"{field_name}={value!r}: must be a value or a list of values, e.g. {field_name}=[a,b]"])
    else:
        items = [value]
    if not items:
        raise BadInput([f"{field_name}=[]: the list is empty"])
    return items


def _positive_ints(value: Any, field_name: str) -> list[int]:
    items = _as_list(value, field_name)
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise BadInput([f"{field_name}={bad[0]!r}: must be a positive integer or a list of them, e.g. {field_name}=[3,5,7]"])
    return items


def _import_plugins(value: Any) -> None:
    modules = list(value) if isinstance(value, (ListConfig, list, tuple)) else [value]
    for module in modules:
        if not isinstance(module, str):
            raise BadInput([f"plugins={module!r}: must be an importable module name, e.g. plugins=[my_layers]"])
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise BadInput([f"plugins={module!r}: cannot import it ({exc})"]) from None


def _layer_specs(value: Any) -> list[LayerSpec]:
    names = _as_list(value, "layers")
    known = list_layers(kind=None)
    unknown = [n for n in names if n != "all" and (not isinstance(n, str) or n not in known)]
    if unknown:
        raise BadInput([f"layers={unknown[0]!r}: unknown layer; known layers are {', '.join(known)} (or all)"])
    return resolve_layers(names)


def _modes(value: Any) -> list[str]:
    modes = _as_list(value, "modes")
    for mode in modes:
        if mode not in MODES:
            raise BadInput([f"modes={mode!r}: allowed values are {', '.join(MODES)}"])
    return modes


def _compile_modes(value: Any) -> list[str]:
    modes = _as_list(value, "compile")
    for mode in modes:
        _choice(mode, "compile", COMPILE_MODES)
    return list(dict.fromkeys(modes))


def _problems(cfg: DictConfig) -> list[Problem]:
    base = OmegaConf.to_container(cfg.problem, resolve=True)
    overrides = OmegaConf.to_container(cfg.variants, resolve=True) or [{}]
    problems = []
    for override in overrides:
        if not isinstance(override, dict):
            raise BadInput([f"variants: each entry must be a mapping of problem fields, got {override!r}"])
        fields = {**base, **override}
        unknown = sorted(set(fields) - set(PROBLEM_FIELDS) - {"size"})
        if unknown:
            raise BadInput([f"variants: unknown problem field {unknown[0]!r}; fields are {', '.join(PROBLEM_FIELDS)}, size"])
        size = fields.pop("size", None)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise BadInput([f"problem.size={size!r}: must be a positive integer (sets height and width)"])
            fields["height"] = fields["width"] = size
        problems.append(Problem(**fields))
    return problems


def _number(value: Any, field_name: str, *, allow_zero: bool = False, allow_null: bool = False) -> float | None:
    if value is None and allow_null:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        allowed = "a positive number" + (" or 0" if allow_zero else "") + (" or null" if allow_null else "")
        raise BadInput([f"{field_name}={value!r}: must be {allowed}"])
    return value


def _choice(value: Any, field_name: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise BadInput([f"{field_name}={value!r}: allowed values are {', '.join(allowed)}"])
    return value


def _flag(value: Any, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise BadInput([f"{field_name}={value!r}: allowed values are true, false"])
    return value


def _settings(cfg: DictConfig) -> tuple[MeasureSettings, int | None]:
    measure = cfg.measure
    threads = _number(measure.threads, "measure.threads", allow_zero=True)
    if threads != int(threads):
        raise BadInput([f"measure.threads={threads!r}: must be 0 (all idle cores) or a positive integer"])
    budget = _number(measure.point_budget_s, "measure.point_budget_s", allow_null=True)
    min_replicates = _number(measure.min_replicates, "measure.min_replicates")
    if min_replicates != int(min_replicates):
        raise BadInput([f"measure.min_replicates={min_replicates!r}: must be a positive integer"])
    cap_gib = _number(measure.memory_cap_gib, "measure.memory_cap_gib", allow_zero=True)
    rounds = _number(measure.rounds, "measure.rounds")
    if rounds != int(rounds):
        raise BadInput([f"measure.rounds={rounds!r}: must be a positive integer"])
    threads, threads_note = (int(threads), "asked for") if threads else idle_core_threads(
        torch.get_num_threads(), busy_shares())
    settings = MeasureSettings(
        threads=threads,
        threads_note=threads_note,
        min_run_time_s=float(_number(measure.min_run_time_s, "measure.min_run_time_s")),
        min_replicates=int(min_replicates),
        point_budget_s=float(budget) if budget is not None else None,
        memory=_flag(measure.memory, "measure.memory"),
        flops=_flag(measure.flops, "measure.flops"),
        skip_larger_after_failure=_flag(measure.skip_larger_after_failure, "measure.skip_larger_after_failure"),
        rounds=int(rounds),
        profile_dir=results_dir(cfg) if _flag(measure.profile, "measure.profile") else None,
        cudnn_benchmark=_flag(measure.cudnn_benchmark, "measure.cudnn_benchmark"),
        probes=_choice(measure.probes, "measure.probes", PROBE_MODES),
        fresh_processes=_flag(measure.fresh_processes, "measure.fresh_processes"),
        canary=_flag(measure.canary, "measure.canary"),
        slow_canary_share=float(_number(measure.slow_canary_share, "measure.slow_canary_share")),
        cpu_heap=_choice(measure.cpu_heap, "measure.cpu_heap", CPU_HEAPS),
        tune=_choice(cfg.tune, "tune", TUNES),
    )
    return settings, int(cap_gib * 2**30) if cap_gib else None


def check_results_dir_argument(argv: Sequence[str]) -> None:
    """Refuse an uncreatable ``results_dir=`` override before Hydra tries to create it (exit 2)."""
    for arg in argv:
        if arg.startswith("results_dir="):
            folder = Path(arg.split("=", 1)[1])
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                print(f"error: results_dir={folder}: cannot create it ({exc.strerror})", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)


def results_dir(cfg: DictConfig) -> str:
    """Where this run or multirun job writes: Hydra's output folder, which ``results_dir`` sets."""
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.output_dir
    if OmegaConf.is_missing(cfg, "results_dir") or not isinstance(cfg.results_dir, str) or not cfg.results_dir:
        raise BadInput([f"results_dir={OmegaConf.to_container(cfg).get('results_dir')!r}: must be a folder path"])
    return cfg.results_dir


def plan_from_config(cfg: DictConfig) -> SweepPlan:
    """Everything the sweep will do, checked; raises `BadInput` listing every problem found."""
    messages: list[str] = []

    def checked(parse, *args):
        try:
            return parse(*args)
        except BadInput as exc:
            messages.extend(exc.messages)
            return None

    checked(_import_plugins, cfg.plugins)
    layers = checked(_layer_specs, cfg.layers)
    windows = checked(_positive_ints, cfg.windows, "windows")
    modes = checked(_modes, cfg.modes)
    compile_modes = checked(_compile_modes, cfg.compile)
    as_shipped = checked(_flag, cfg.as_shipped, "as_shipped")
    problems = checked(_problems, cfg)
    settings_and_cap = checked(_settings, cfg)
    resume = checked(_flag, cfg.resume, "resume")
    skip_invalid = checked(_flag, cfg.skip_invalid, "skip_invalid")
    plots = checked(_flag, cfg.plots, "plots")
    if messages:
        raise BadInput(messages)
    settings, cap = settings_and_cap
    points = plan_sweep(layers, windows, modes, problems, compile_modes, as_shipped)
    errors = sweep_errors(points)
    skipped: list[str] = []
    if errors:
        if not skip_invalid:
            raise BadInput(errors)
        skipped = errors
        points = [p for p in points if point_is_valid(p)]
        if not points:
            raise BadInput([*errors, "skip_invalid=true: no valid point is left to run"])
    results_path = Path(results_dir(cfg)) / results.RESULTS_FILE
    try:
        results.check_writable(results_path)
    except results.ResultsFileError as exc:
        raise BadInput([str(exc)]) from None
    if not cfg.measure.threads:
        settings = _resumed_threads(settings, results_path)
    return SweepPlan(points, skipped, settings, results_path, resume, cap, plots)


def _resumed_threads(settings: MeasureSettings, results_path: Path) -> MeasureSettings:
    """``settings`` with the threads the results in ``results_path`` were measured on, where those were chosen
    by the load too (``measure.threads=0``): a resumed sweep keeps its points, and one re-measured with
    ``resume=false`` replaces them, whatever the load now."""
    if not results_path.exists():
        return settings
    recorded = results.read_results(results_path)["measure_settings"].dropna()
    chosen = [json.loads(r) for r in recorded]
    chosen = [c["threads"] for c in chosen if c.get("threads_note", "asked for") != "asked for"]
    if not chosen:
        return settings
    threads = max(set(chosen), key=chosen.count)
    return dataclasses.replace(settings, threads=threads,
                               threads_note=f"as the results being resumed were measured ({settings.threads_note} now)")


def plan_keys(plan: SweepPlan, env) -> set[str]:
    """The point keys of this plan's points (its rows in a results file that may hold others too)."""
    return {base_row(p, env, plan.settings, run_id="")["point_key"] for p in plan.points}


def execute(plan: SweepPlan) -> SweepOutcome:
    for message in plan.skipped_invalid:
        print(f"skipped (skip_invalid=true): {message}", file=sys.stderr)
    env = read_environment(plan.points[0].problem.device)
    print(f"threads: {plan.settings.threads} ({plan.settings.threads_note})", file=sys.stderr)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 1 + 0.5 * cores:
        print(
            f"warning: system load {load:.1f} on {cores} cores: other work competes for the cores being timed "
            "(each row records load_avg)",
            file=sys.stderr,
        )
    uses_cpu = any(p.problem.device == "cpu" for p in plan.points)
    outcome = run_sweep(plan.points, plan.results_path, plan.settings, env, resume=plan.resume,
                        memory_cap_bytes=plan.memory_cap_bytes, cap_memory=uses_cpu)
    print(f"results: {plan.results_path} ({outcome.rows_written} rows written; {outcome.statuses})", file=sys.stderr)
    if plan.results_path.exists():
        frame = results.read_results(plan.results_path)
        print(summary_table(frame[frame["point_key"].isin(plan_keys(plan, env))]))
    if plan.plots and plan.results_path.exists():
        from qna_bench.report import write_report

        report = write_report(plan.results_path)
        print(f"report and figures: {report} and {', '.join(sorted(p.name for p in report.parent.glob('*.png')))}",
              file=sys.stderr)
    return outcome


def run_from_config(cfg: DictConfig) -> SweepOutcome:
    """The CLI's whole job; exits 2 on bad input and 130 when interrupted."""
    try:
        plan = plan_from_config(cfg)
    except BadInput as exc:
        for message in exc.messages:
            print(f"error: {message}", file=sys.stderr)
        if len(exc.messages) > 1:
            print(f"{len(exc.messages)} problems; nothing was measured", file=sys.stderr)
        sys.stdout.flush()
        sys.exit(EXIT_BAD_INPUT)
    outcome = execute(plan)
    if outcome.interrupted:
        sys.exit(EXIT_INTERRUPTED)
    return outcome

