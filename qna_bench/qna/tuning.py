"""Choosing a plan per key, in the manner of cudnn.benchmark and Triton's autotune, through the project's
one tuner (`qna_bench.tuner`: each candidate proved equal to the default plan, warmed, pruned, then timed
in interleaved rounds, with the canary around it).

A plan that lost by over the tuner's prune factor at a smaller window of the same key, to a plan with
fewer passes whose work grows with the window, is not timed (`outgrown_plans`): it loses by more at a
larger window.

Two stages, each on the calls it decides: the plans (every plan of the key's mode, so train is decided on
whole forward-and-backward calls of the core), then the winner's projections in each form
(`qna_bench.qna.projection`), which run before and after the core whatever the plan. The key is the
device (name and instruction set), threads, torch version, the qna package's code version, dtype,
shape, the projections' input channels and bias, window, stride, mode and the candidate set.
``tune``: ``cached`` reads the cache and times only on a miss, ``always`` times again (and rewrites the
cache), ``off`` takes `default_plan` and times nothing. The cache lives in ``$QNA_BENCH_CACHE_DIR``
(default ``~/.cache/qna_bench``); a file that is corrupt or names another key or an unknown plan is
ignored and rewritten; a tuning whose canary ran slow is used but not written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qna_bench import tuner
from qna_bench.environment import device_name
from qna_bench.measure.canary import canary_floor_seconds
from qna_bench.qna.fused_cpu import compile_flags
from qna_bench.qna.plans import Plan, candidate_plans, default_plan, get_plan
from qna_bench.qna.projection import PROJECTIONS, Projection
from qna_bench.tuner import TUNES, Candidate, Timer, Tune, time_call

__all__ = ["TUNES", "Tune", "Timer", "time_call"]

PlanSource = tuner.FormSource
CACHE_SUBDIR = "qna-plans"

# ``call_with(plan, train)``: one call of the layer's core at the key's shape with ``plan``, forward only
# (``train=False``) or forward and backward; it returns the tensors a plan must reproduce (the output,
# and in train the gradients).
CallWith = Callable[[Plan, bool], Callable[[], Sequence[torch.Tensor]]]
# ``project_with(form, train)``: one call of the layer's two projections at the key's shape in ``form``,
# returning their outputs (and in train their gradients).
ProjectWith = Callable[[Projection, bool], Callable[[], Sequence[torch.Tensor]]]


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
    in_channels: int = 0
    bias: bool = False
    # How the fused CPU loops are compiled here (`fused_cpu.compile_flags`: QNA_BENCH_CXXFLAGS included): an
    # AVX2 build of them on an AVX-512 machine is another machine for the plans.
    kernel_build: str = ""
    # The plans and projection forms timed for this key: a new candidate tunes afresh.
    candidates: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape), "candidates": list(self.candidates)}


def plan_key(
    x: torch.Tensor, features: int, heads: int, num_queries: int, window: int, stride: int, train: bool,
    bias: bool = False,
) -> PlanKey:
    """The key of a call on ``x`` (B, H, W, C_in) of a QnA with ``features`` (F) split into ``heads``."""
    batch, height, width, in_channels = x.shape
    candidates = tuple(p.name for p in ordered_candidates(x.device, window, stride, train)) + PROJECTIONS
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
        in_channels=in_channels,
        bias=bias,
        kernel_build=compile_flags() if x.device.type == "cpu" else "",
        candidates=candidates,
    )


@dataclass(frozen=True)
class PlanChoice:
    """The plan a key runs, where it came from, and the seconds spent timing candidates for it."""

    plan: Plan
    train: bool
    source: PlanSource
    tune_seconds: float = 0.0
    timings_s: tuple[tuple[str, float], ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    # `Plan.spec` of ``plan``, made once here: a compiled call passes it to the core without tracing it
    spec: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", self.plan.spec())


def ordered_candidates(device: torch.device | str, window: int, stride: int, train: bool) -> list[Plan]:
    """`candidate_plans` of the call, the default plan (the reference every other must equal) first."""
    plans = candidate_plans(device, window, stride, train)
    default = default_plan(device, window, stride, train)
    return sorted(plans, key=lambda plan: plan.forms != default.forms)


def window_bound_passes(plan: Plan, train: bool) -> frozenset[str]:
    """The passes of ``plan`` (resolved for its call) whose work grows with the window's area: every pass
    but an FFT one (the FFT's cost follows the map, not the window)."""
    if plan.kernel != "convolutions":
        return frozenset(("kernel",))
    return frozenset(p for p in plan.passes_run(train) if getattr(plan, p) != "fft")


def outgrown_plans(key: PlanKey, device: torch.device, stride: int, train: bool) -> dict[str, str]:
    """The plans not worth timing for ``key``, with why: at the largest smaller window of the same key in
    the cache, each lost by over `tuner.PRUNE_FACTOR` to that tuning's winner, and it runs direct every
    pass the winner runs direct, and more (its time grows faster with the window than the winner's, so it
    loses by more here; between plans of the same growth oneDNN's dips at some windows could reverse a
    verdict, so none is judged); and those that tuning did not time either, for their reason. A fused
    kernel (Triton's) is never judged this way."""
    stage = "train" if train else "forward"
    for smaller in range(key.window - 2, 0, -2):
        plans = ordered_candidates(device, smaller, stride, train)
        there = dataclasses.replace(key, window=smaller, candidates=tuple(p.name for p in plans) + PROJECTIONS)
        entry = tuner.read_choice(CACHE_SUBDIR, there.as_dict())
        if entry is None:
            continue
        medians = {name.removeprefix(f"{stage} "): float(t) for name, t in entry.get("timings_s", {}).items()
                   if name.startswith(f"{stage} ")}
        by_name = {plan.name: plan for plan in plans}
        winner = by_name.get(entry.get("plan"))
        if winner is None or winner.name not in medians or winner.kernel != "convolutions":
            return {}
        bound = window_bound_passes(winner, train)
        outgrown = {str(name): str(why) for name, why in entry.get("skipped", {}).items() if name in by_name}
        outgrown.update({
            name: f"lost to {winner.name} by {t / medians[winner.name]:.1f}x at window {smaller}, and its cost "
                  f"grows faster with the window"
            for name, t in medians.items()
            if name in by_name and name != winner.name and by_name[name].kernel == "convolutions"
            and t > tuner.PRUNE_FACTOR * medians[winner.name] and bound < window_bound_passes(by_name[name], train)})
        return outgrown
    return {}


def read_cached(key: PlanKey, device: torch.device, train: bool, stride: int) -> PlanChoice | None:
    """The cached choice of ``key``, or None when there is none or the file is corrupt or foreign."""
    entry = tuner.read_choice(CACHE_SUBDIR, key.as_dict())
    try:
        projections = entry["projections"]
        if projections not in PROJECTIONS:
            return None
        plan = dataclasses.replace(get_plan(entry["plan"], device).resolved(stride, train), projections=projections)
        timings = tuple((str(k), float(v)) for k, v in entry.get("timings_s", {}).items())
    except (KeyError, TypeError, ValueError):
        return None
    return PlanChoice(plan, train, "cache", timings_s=timings)


def write_cached(key: PlanKey, choice: PlanChoice, keep: bool = True) -> None:
    tuner.write_choice(CACHE_SUBDIR, key.as_dict(), {
        "plan": choice.plan.name, "projections": choice.plan.projections, "timings_s": dict(choice.timings_s),
        "refused": dict(choice.refused), "skipped": dict(choice.skipped), "tune_s": choice.tune_seconds}, keep)


def tune_plan(
    key: PlanKey, device: torch.device, stride: int, train: bool, call_with: CallWith, timer: Timer,
    project_with: ProjectWith | None = None, canary: tuner.Canary | None = None,
) -> tuple[PlanChoice, bool]:
    """Tune the plans, then the winner's projections (with ``project_with``); the choice, and whether its
    canary allows keeping it."""
    dtype = getattr(torch, key.dtype)
    usual = tuner.usual_canary(key.device, key.threads)
    plans = ordered_candidates(device, key.window, stride, train)
    stage = "train" if train else "forward"
    by_name = {plan.name: plan for plan in plans}
    tuned = tuner.tune([Candidate(plan.name, call_with(plan, train), {"plan": plan.name}) for plan in plans],
                       dtype, timer=timer, canary=canary, usual_canary_s=usual,
                       skip=outgrown_plans(key, device, stride, train))
    winner = by_name[tuned.winner]
    timings = [(f"{stage} {name}", t) for name, t in tuned.medians_s]
    refused = list(tuned.refused)
    seconds, keep = tuned.seconds, tuned.keep
    outcomes = [tuned]
    if project_with is not None:
        forms = tuner.tune([Candidate(form, project_with(form, train), {"gemm": form}) for form in PROJECTIONS],
                           dtype, timer=timer, canary=canary, usual_canary_s=usual)
        winner = dataclasses.replace(winner, projections=forms.winner)
        timings += [(f"projections {name}", t) for name, t in forms.medians_s]
        refused += [(f"projections {name}", why) for name, why in forms.refused]
        seconds, keep = seconds + forms.seconds, keep and forms.keep
        outcomes.append(forms)
    for outcome in outcomes:
        tuner.note_canary(key.device, key.threads, outcome)
    timed = bool(timings) and (len(plans) > 1 or project_with is not None)
    choice = PlanChoice(winner, train, "tuned", seconds if timed else 0.0, tuple(timings), tuple(refused),
                        tuned.skipped)
    return choice, keep


def choose_plan(
    key: PlanKey,
    device: torch.device,
    stride: int,
    train: bool,
    tune: str,
    call_with: CallWith,
    timer: Timer = time_call,
    project_with: ProjectWith | None = None,
    canary: tuner.Canary | None = None,
) -> PlanChoice:
    """The plan for ``key`` under the ``tune`` setting; times candidates with ``call_with`` (and the
    projections with ``project_with``) on a miss. ``canary``: None times the canary on ``device``."""
    if tune not in TUNES:
        raise ValueError(f"tune={tune!r}: QnA's tune is one of {', '.join(TUNES)}")
    if tune == "off":
        return PlanChoice(default_plan(device, key.window, stride, train), train, "default")
    if tune == "cached":
        cached = read_cached(key, device, train, stride)
        if cached is not None:
            return cached
    if canary is None:
        canary = functools.partial(canary_floor_seconds, device)
    choice, keep = tune_plan(key, device, stride, train, call_with, timer, project_with, canary)
    write_cached(key, choice, keep)
    return choice
