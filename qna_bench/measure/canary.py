"""The canary: one fixed small matrix product, timed in the measuring process right before and right
after each round of a point. The work never changes, so a canary that runs slower than the run's usual
canary says the machine was slower while that round ran (other tenants, a frequency drop), whatever the
layer; the sweep runs such a round again (`qna_bench.runner`) and the report states the canary's spread
as the run's noise floor (`qna_bench.analysis.noise_floor`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from qna_bench.labels import CANARY_SIZE

CANARY_CALLS = 7
FLOOR_CALLS = 15
# Canaries needed before one counts as slow: the run's median is meaningless before.
MIN_CANARIES = 5

_OPERANDS: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _operands(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = str(device)
    if key not in _OPERANDS:
        # Normal tensors even when first asked for under inference mode (a tuner inside a layer's call):
        # inference tensors could not be written by a canary outside it.
        with torch.inference_mode(False):
            generator = torch.Generator().manual_seed(0)
            a, b = (torch.randn(CANARY_SIZE, CANARY_SIZE, generator=generator).to(device) for _ in range(2))
            _OPERANDS[key] = (a, b, torch.empty_like(a))
    return _OPERANDS[key]


def _canary_times(device: torch.device | str, calls: int) -> list[float]:
    """The seconds of ``calls`` canary products on ``device`` (synchronised on CUDA), after one untimed call."""
    device = torch.device(device)
    a, b, out = _operands(device)
    times = []
    for index in range(calls + 1):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:
            times.append(time.perf_counter() - start)
    return times


def canary_seconds(device: torch.device | str = "cpu", calls: int = CANARY_CALLS) -> float:
    """The median seconds of ``calls`` canary products on ``device``, after one untimed call; at the
    caller's thread count."""
    return statistics.median(_canary_times(device, calls))


def canary_floor_seconds(device: torch.device | str = "cpu", calls: int = FLOOR_CALLS) -> float:
    """The fastest of ``calls`` canary products: what the cores give right now, for a tuner's check
    (`qna_bench.tuner`). One idle process on a 2-core VM measured medians of 7 from 0.58 to 1.15 ms; the
    fastest of 15 moves only while other work holds a core."""
    return min(_canary_times(device, calls))


def is_slow(canary_s: float, run_canaries_s: Sequence[float], share: float) -> bool:
    """Whether a round's canary ran more than ``share`` slower than the median of the run's canaries
    (those measured so far, at least `MIN_CANARIES` of them)."""
    if len(run_canaries_s) < MIN_CANARIES:
        return False
    return canary_s > (1.0 + share) * statistics.median(run_canaries_s)
