"""Choosing a plan per key, in the manner of cudnn.benchmark and Triton's autotune: on the first call
of a key the candidate plans (`candidate_plans`) are timed at the call's real shape, the fastest wins,
and the choice is kept in a JSON cache on disk (one file per key, written atomically).

The winning plan's projections are then timed in each form (`qna_bench.qna.projection`), on the same
key. The key is the device (name and instruction set), threads, torch version, the qna package's code
version, dtype, shape, window, stride and mode. ``tune``: ``cached`` reads the cache and times only on
a miss, ``always`` times again (and rewrites the cache), ``off`` takes `default_plan` and times nothing.
The cache lives in ``$QNA_BENCH_CACHE_DIR`` (default ``~/.cache/qna_bench``); a file that is corrupt
or names another key or an unknown plan is ignored and rewritten.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from qna_bench import disk_cache
from qna_bench.environment import device_name
from qna_bench.qna.plans import Plan, candidate_plans, default_plan, get_plan
from qna_bench.qna.projection import PROJECTIONS, Projection

Tune = Literal["cached", "always", "off"]
TUNES: tuple[str, ...] = get_args(Tune)
PlanSource = Literal["tuned", "cache", "default", "forced"]
CACHE_SUBDIR = "qna-plans"
# Timing, in two stages: the forward passes' forms by forward calls (cheap), then, in train mode, the
# backward's among the plans that share the forward's winning forms, by forward and backward calls.
# Each stage: one warm call, one timed call per candidate, one more for those within this factor of
# the best; the best single call wins. A QnA(128, 128, 4) forward at B=8, 56x56 on a 2-core CPU takes
# 0.05-0.15 s and a train step 0.15-0.4 s: a key costs 0.5 s (forward) to 2 s (train) once per
# machine, then the cache.
RECHECK_FACTOR = 1.15

# One call of a candidate in seconds: ``timer(plan, call)``. Tests stub it.
Timer = Callable[[Plan, Callable[[], None]], float]
# ``call_with(plan, train)``: one call of the layer at the key's shape with ``plan``, forward only
# (``train=False``) or forward and backward.
CallWith = Callable[[Plan, bool], Callable[[], None]]
# ``project_with(form, train)``: one call of the layer's two projections at the key's shape in ``form``.
ProjectWith = Callable[[Projection, bool], Callable[[], None]]


def time_call(plan: Plan, call: Callable[[], None]) -> float:
    """Seconds of one ``call`` (synchronised on CUDA)."""
    start = time.perf_counter()
    call()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


@functools.cache
def code_version() -> str:
    """A hash of every source file of the qna package: a new version of the code tunes afresh."""
    digest = hashlib.sha1()
    for path in sorted(p for p in Path(__file__).parent.iterdir() if p.suffix in (".py", ".cpp", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def device_key(device: torch.device) -> str:
    """The device's name with its instruction set (CPU) or compute capability (CUDA)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda: {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return device_name(device.type)


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan's speed depends on; a new value is timed afresh."""

    device: str
    threads: int
    torch_version: str
    code_version: str
    dtype: str
    shape: tuple[int, ...]  # B, H, W, F, Nq, h
    window: int
    stride: int
    mode: str  # forward or train

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}

    def file_name(self) -> str:
        return hashlib.sha1(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:20] + ".json"


def plan_key(
    x: torch.Tensor, features: int, heads: int, num_queries: int, window: int, stride: int, train: bool
) -> PlanKey:
    """The key of a call on ``x`` (B, H, W, C_in) of a QnA with ``features`` (F) split into ``heads``."""
    batch, height, width, _ = x.shape
    return PlanKey(
        device=device_key(x.device),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        code_version=code_version(),
        dtype=str(x.dtype).removeprefix("torch."),
        shape=(batch, height, width, features, num_queries, heads),
        window=window,
        stride=stride,
        mode="train" if train else "forward",
    )


@dataclass(frozen=True)
class PlanChoice:
    """The plan a key runs, where it came from, and the seconds spent timing candidates for it."""

    plan: Plan
    train: bool
    source: PlanSource
    tune_seconds: float = 0.0
    timings_s: tuple[tuple[str, float], ...] = ()
    # `Plan.spec` of ``plan``, made once here: a compiled call passes it to the core without tracing it
    spec: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", self.plan.spec())


def cache_dir() -> Path:
    """Where chosen plans are kept: `CACHE_SUBDIR` of the project's disk cache (``$QNA_BENCH_CACHE_DIR``)."""
    return disk_cache.cache_dir() / CACHE_SUBDIR


def read_cached(key: PlanKey, device: torch.device, train: bool, stride: int) -> Plan | None:
    """The cached plan of ``key``, or None when there is none or the file is corrupt or foreign."""
    path = cache_dir() / key.file_name()
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != key.as_dict():
            return None
        projections = entry.get("projections", "linear")
        if projections not in PROJECTIONS:
            return None
        return dataclasses.replace(get_plan(entry["plan"], device).resolved(stride, train), projections=projections)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(key: PlanKey, choice: PlanChoice) -> None:
    """Keep ``choice`` for ``key``: written to a temporary file and renamed over the old one."""
    entry = {"key": key.as_dict(), "plan": choice.plan.name, "projections": choice.plan.projections,
             "timings_s": dict(choice.timings_s)}
    disk_cache.write_json_atomic(cache_dir() / key.file_name(), entry)


def time_plans(candidates: list[Plan], calls: list[Callable[[], None]], timer: Timer) -> list[float]:
    """The best time of each candidate's ``call`` (one warm call, then `RECHECK_FACTOR`)."""
    timer(candidates[0], calls[0])  # warm: the first call of a shape pays for allocations
    best = [timer(plan, call) for plan, call in zip(candidates, calls)]
    fastest = min(best)
    for i, (plan, call) in enumerate(zip(candidates, calls)):
        if best[i] <= RECHECK_FACTOR * fastest:
            best[i] = min(best[i], timer(plan, call))
    return best


def tune_plan(
    device: torch.device, window: int, stride: int, train: bool, call_with: CallWith, timer: Timer,
    project_with: ProjectWith | None = None,
) -> PlanChoice:
    """Time the candidates of a call in two stages (see `RECHECK_FACTOR`), then the winner's projections
    in each form (with ``project_with``), and return the fastest."""
    started = time.perf_counter()
    timings: list[tuple[str, float]] = []
    forward = candidate_plans(device, window, stride, train=False)
    winner = forward[0]
    if len(forward) > 1:
        best = time_plans(forward, [call_with(plan, False) for plan in forward], timer)
        winner = forward[best.index(min(best))]
        timings += [(f"forward {plan.name}", t) for plan, t in zip(forward, best)]
    if train:
        shared = [p for p in candidate_plans(device, window, stride, train=True)
                  if p.resolved(stride, False).forms == winner.forms]
        winner = shared[0]
        if len(shared) > 1:
            best = time_plans(shared, [call_with(plan, True) for plan in shared], timer)
            winner = shared[best.index(min(best))]
            timings += [(f"train {plan.name}", t) for plan, t in zip(shared, best)]
    if project_with is not None:
        variants = [dataclasses.replace(winner, projections=form) for form in PROJECTIONS]
        best = time_plans(variants, [project_with(form, train) for form in PROJECTIONS], timer)
        winner = variants[best.index(min(best))]
        timings += [(f"projections {form}", t) for form, t in zip(PROJECTIONS, best)]
    seconds = time.perf_counter() - started if timings else 0.0
    return PlanChoice(winner, train, "tuned", seconds, tuple(timings))


def choose_plan(
    key: PlanKey,
    device: torch.device,
    stride: int,
    train: bool,
    tune: str,
    call_with: CallWith,
    timer: Timer = time_call,
    project_with: ProjectWith | None = None,
) -> PlanChoice:
    """The plan for ``key`` under the ``tune`` setting; times candidates with ``call_with`` (and the
    projections with ``project_with``) on a miss."""
    if tune not in TUNES:
        raise ValueError(f"tune={tune!r}: QnA's tune is one of {', '.join(TUNES)}")
    if tune == "off":
        return PlanChoice(default_plan(device, key.window, stride, train), train, "default")
    if tune == "cached":
        cached = read_cached(key, device, train, stride)
        if cached is not None:
            return PlanChoice(cached, train, "cache")
    choice = tune_plan(device, key.window, stride, train, call_with, timer, project_with)
    write_cached(key, choice)
    return choice
