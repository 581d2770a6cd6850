"""Points run in a worker process that the sweep can kill.

The per-point budget's alarm interrupts Python between ops, not a native op: oneDNN's dense 15×15
convolution backward on a 112×112 map ran for over five minutes in one call. The sweep waits for each
point up to a hard limit, then kills the worker, records a ``timeout`` row and starts a fresh worker for
the next point. A worker that dies (a crash, the kernel's OOM killer) becomes an ``error`` row the same
way. The worker holds the memory cap, warms up on its first point and freezes its start-up heap.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import multiprocessing
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from qna_bench.environment import Environment
from qna_bench.memcap import address_space_cap
from qna_bench.problem import Problem
from qna_bench.registry import get_layer

# Past the first call's and the measurement's budgets, how long a point may still take before its
# worker is killed (the budgets' alarms end well-behaved points long before).
HARD_LIMIT_GRACE_S = 30.0
# How long an idle worker gets to exit on its own at the end of a sweep before it is killed.
EXIT_GRACE_S = 30.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs before its first point: the modules that register the sweep's layers,
    the measurement settings, the environment recorded in rows and the memory cap."""

    layer_modules: tuple[str, ...]
    settings: Any  # runner.MeasureSettings
    env: Environment
    memory_cap_bytes: int | None
    cap_memory: bool


@dataclass(frozen=True)
class WorkerLost:
    """The point did not come back: ``killed`` at the hard limit, or the worker died (``exitcode``)."""

    killed: bool
    exitcode: int | None


class PointWorker:
    """One worker process at a time; started on first use and again after a kill or a crash."""

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.memory_cap: int | None = None
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._busy = False

    def start(self) -> None:
        parent_end, child_end = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child_end, self.setup), daemon=True)
        self._process.start()
        child_end.close()
        self._conn = parent_end
        message = self._receive(timeout_s=None)
        if isinstance(message, WorkerLost):
            raise RuntimeError(f"the measuring worker process failed to start (exit code {message.exitcode})")
        self.memory_cap = message

    def run(self, layer_name: str, problem: Problem, run_id: str, timeout_s: float | None) -> dict[str, Any] | WorkerLost:
        """The point's row, or `WorkerLost` (the worker is then gone; the next call starts another)."""
        if self._process is None:
            self.start()
        self._conn.send((layer_name, problem, run_id))
        self._busy = True
        message = self._receive(timeout_s)
        self._busy = False
        return message

    def _receive(self, timeout_s: float | None) -> Any:
        try:
            if self._conn.poll(timeout_s):
                return self._conn.recv()
        except (EOFError, ConnectionResetError):
            pass
        else:
            self.close()
            return WorkerLost(killed=True, exitcode=None)
        exitcode = self._process.exitcode
        self.close()
        return WorkerLost(killed=False, exitcode=exitcode)

    def close(self) -> None:
        if self._process is None:
            return
        if self._process.pid is not None and not self._busy and self._conn is not None:
            # An idle worker ends on its own when its pipe closes, releasing what it holds: killed, it
            # would leave the semaphore of torch's tqdm lock to the resource tracker, which warns about it.
            self._conn.close()
            self._conn = None
            self._process.join(timeout=EXIT_GRACE_S)
        if self._process.pid is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None
        self._busy = False

    def __enter__(self) -> PointWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def hard_limit_s(point_budget_s: float | None, first_call_budget_s: float | None) -> float | None:
    if point_budget_s is None or first_call_budget_s is None:
        return None
    return first_call_budget_s + point_budget_s + HARD_LIMIT_GRACE_S


def _die_with_parent() -> None:
    """Linux: end this worker when the sweep process ends, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _serve(conn: Connection, setup: WorkerSetup) -> None:
    from qna_bench.runner import SweepPoint, run_point, warm_up_process

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's to handle: it kills this process
    for module in setup.layer_modules:
        importlib.import_module(module)
    with address_space_cap(setup.memory_cap_bytes, enabled=setup.cap_memory) as cap:
        gc.freeze()  # the start-up heap, no longer rescanned by each point's collections
        conn.send(cap)
        warmed_up = False
        while True:
            try:
                layer_name, problem, run_id = conn.recv()
            except EOFError:
                return
            point = SweepPoint(get_layer(layer_name), problem)
            if not warmed_up:
                warm_up_process(point, setup.settings)
                warmed_up = True
            conn.send(run_point(point, setup.settings, setup.env, run_id))


def layer_modules(layers: Sequence[Any]) -> tuple[str, ...]:
    """The modules whose import registers these layers (built-ins and plugins alike)."""
    return tuple(sorted({layer.factory.__module__ for layer in layers}))
