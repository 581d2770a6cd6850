"""The per-point time budget: one huge point must not stall a sweep.

`time_limits` derives the three limits of a point from ``measure.point_budget_s``. `PointBudget` projects the remaining passes from a measured call and stops the point before it would
overrun; `PointBudget.alarm` interrupts a single call that overruns anyway (between ops, since a
running kernel cannot be interrupted).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

# The first (warm-up, compiling) call may take this many point budgets, at least a minute.
FIRST_CALL_BUDGET_FACTOR = 3
FIRST_CALL_MIN_S = 60.0
# Past the first call's and the measurement's budgets, how long a point may still take before its
# worker is killed (the budgets' alarms end well-behaved points long before).
HARD_LIMIT_GRACE_S = 30.0


@dataclass(frozen=True)
class TimeLimits:
    """Seconds a point may take: its first call, the measurement after it, and in all before its worker is
    killed. None: no limit."""

    first_call_s: float | None
    point_s: float | None
    hard_kill_s: float | None


def time_limits(point_budget_s: float | None) -> TimeLimits:
    """The three limits of a point, all from the one setting ``measure.point_budget_s``."""
    if point_budget_s is None:
        return TimeLimits(None, None, None)
    first_call_s = max(FIRST_CALL_BUDGET_FACTOR * point_budget_s, FIRST_CALL_MIN_S)
    return TimeLimits(first_call_s, point_budget_s, first_call_s + point_budget_s + HARD_LIMIT_GRACE_S)


class PointTimeout(Exception):
    """A point exceeded, or would exceed, its time budget; ``one_call_s`` is a measured call, if any."""

    def __init__(self, message: str, one_call_s: float | None = None):
        super().__init__(message)
        self.one_call_s = one_call_s


class PointBudget:
    def __init__(self, seconds: float | None, clock=time.perf_counter):
        self.seconds = seconds
        self._clock = clock
        self._start = clock()

    def remaining_s(self) -> float | None:
        return None if self.seconds is None else self.seconds - (self._clock() - self._start)

    def check(self, one_call_s: float, calls_left: float, extra_s: float = 0.0) -> None:
        """Raise `PointTimeout` if ``calls_left`` more calls of ``one_call_s`` (plus ``extra_s``) will not fit."""
        remaining = self.remaining_s()
        if remaining is None:
            return
        needed = one_call_s * calls_left + extra_s
        if needed > remaining:
            raise PointTimeout(
                f"one call takes {one_call_s:.3g} s; the rest of the measurement needs about {needed:.3g} s, "
                f"more than is left of the per-point budget of {self.seconds:g} s",
                one_call_s,
            )

    @contextlib.contextmanager
    def alarm(self) -> Iterator[None]:
        """Raise `PointTimeout` inside the block once the budget is spent (main thread, POSIX only)."""
        remaining = self.remaining_s()
        usable = remaining is not None and hasattr(signal, "setitimer")
        if not usable or threading.current_thread() is not threading.main_thread():
            yield
            return
        if remaining <= 0:
            raise PointTimeout(f"the per-point budget of {self.seconds:g} s is spent")

        def expire(signum, frame):
            raise PointTimeout(f"a single call ran past the per-point budget of {self.seconds:g} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, remaining)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
