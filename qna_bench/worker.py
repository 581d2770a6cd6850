"""Points run in a worker process that the sweep can kill.

The per-point budget's alarm interrupts Python between ops, not a native op: oneDNN's dense 15×15
convolution backward on a 112×112 map ran for over five minutes in one call. The sweep waits for each
point up to a hard limit, then kills the worker, records a ``timeout`` row and starts a fresh worker for
the next point. A worker that dies (a crash, the kernel's OOM killer) becomes an ``error`` row the same
way. The worker holds the memory cap, sets its CPU heap (`qna_bench.heap`), warms up on its first point
and freezes its start-up objects.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from qna_bench.compile_mode import EAGER
from qna_bench.environment import Environment
from qna_bench.heap import configure_cpu_heap
from qna_bench.memcap import address_space_cap
from qna_bench.point import MeasureSettings, SweepPoint, run_points, warm_up_process, warm_up_tools
from qna_bench.problem import Problem
from qna_bench.registry import get_layer

_PR_SET_PDEATHSIG = 1
# How long a worker whose pipe closed may take to be reaped before its exit code is read.
REAP_TIMEOUT_S = 30.0
# How long an idle worker gets to exit on its own at the end of a sweep before it is killed.
EXIT_GRACE_S = 30.0


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs before its first point: the modules that register the sweep's layers,
    the measurement settings, the environment recorded in rows and the memory cap."""

    layer_modules: tuple[str, ...]
    settings: MeasureSettings
    env: Environment
    memory_cap_bytes: int | None
    cap_memory: bool


@dataclass(frozen=True)
class WorkerLost:
    """The point did not come back: ``killed`` at the hard limit, or the worker died (``exitcode``).
    ``layer_index``: the layer of a group being prepared when it happened (None: while timing them)."""

    killed: bool
    exitcode: int | None
    layer_index: int | None = None

    def describe(self) -> str:
        """``exit code 3``, ``signal SIGKILL`` or ``exit code unknown``."""
        return describe_exit(self.exitcode)


# What a worker sends as each layer of a group is prepared: the sweep then gives the next one its own
# hard limit, and knows which layer was in flight if the worker is lost.
PREPARED = "prepared"
# What a new worker sends after its warm-up (the first group's first layer, run a few times): the
# warm-up has a hard limit of its own, not a share of that layer's preparation.
WARMED_UP = "warmed up"


def describe_exit(exitcode: int | None) -> str:
    """A process's end as multiprocessing reports it: a negative exit code is the signal that ended it."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class PointWorker:
    """One worker process at a time; started on first use and again after a kill or a crash."""

    def __init__(self, setup: WorkerSetup, serve: Callable[[Connection, WorkerSetup], None] | None = None):
        """``serve``: the worker's main function (tests give a stand-in); by default, measuring points."""
        self.setup = setup
        self._serve = serve or _serve
        self.memory_cap: int | None = None
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._busy = False

    def start(self) -> None:
        parent_end, child_end = self._context.Pipe()
        self._process = self._context.Process(target=self._serve, args=(child_end, self.setup), daemon=True)
        self._process.start()
        child_end.close()
        self._conn = parent_end
        message = self._receive(timeout_s=None)
        if isinstance(message, WorkerLost):
            raise RuntimeError(f"the measuring worker process failed to start ({message.describe()})")
        self.memory_cap = message

    @property
    def pid(self) -> int | None:
        """The running worker process's id (None when none runs)."""
        return self._process.pid if self._process is not None else None

    def run(
        self, layer_name: str, problem: Problem, run_id: str, timeout_s: float | None, *, first_round: bool = True,
        compile_mode: str = EAGER,
    ) -> dict[str, Any] | WorkerLost:
        """The point's row, or `WorkerLost` (the worker is then gone; the next call starts another)."""
        rows = self.run_together([(layer_name, compile_mode)], problem, run_id, timeout_s, first_round=first_round)
        return dataclasses.replace(rows, layer_index=None) if isinstance(rows, WorkerLost) else rows[0]

    def run_together(
        self, layers: Sequence[tuple[str, ...]], problem: Problem, run_id: str, timeout_s: float | None, *,
        first_round: bool = True,
    ) -> list[dict[str, Any]] | WorkerLost:
        """The rows of ``layers`` ((layer name, compile mode[, tuning]) tuples) on one problem, timed in alternating
        blocks (`qna_bench.point.run_points`), or `WorkerLost`. ``timeout_s`` is the hard limit of one
        layer: a new worker's warm-up gets it, each layer's preparation gets it, and their timing together
        gets it once per layer."""
        if self._process is None:
            self.start()
        self._conn.send((tuple(layers), problem, run_id, first_round))
        self._busy = True
        prepared = 0
        while True:
            limit = timeout_s if timeout_s is None or prepared < len(layers) else timeout_s * len(layers)
            message = self._receive(limit)
            if isinstance(message, WorkerLost):
                if prepared < len(layers):
                    message = dataclasses.replace(message, layer_index=prepared)
                break
            if message == WARMED_UP:
                continue
            if message != PREPARED:
                break
            prepared += 1
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
        # The pipe closes as the process exits, a moment before it is reaped: wait for its exit code.
        self._process.join(timeout=REAP_TIMEOUT_S)
        exitcode = self._process.exitcode
        self.close()
        return WorkerLost(killed=False, exitcode=exitcode)

    def close(self) -> None:
        if self._process is None:
            return
        if self._process.pid is not None and not self._busy and self._conn is not None:
            # An idle worker ends on its own when its pipe closes, releasing what it holds (a killed one
            # leaves any named semaphore it registered to the resource tracker, which warns about it).
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


def _die_with_parent() -> None:
    """Linux: end this worker when the sweep process ends, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _thread_lock_for_progress_bars() -> None:
    """tqdm guards its bars with a multiprocessing lock, a named semaphore that a spawned process registers
    with the sweep's resource tracker; torch.compile's progress bar creates it (inductor's
    ``AsyncCompile.wait``). A worker killed at its hard limit never unregisters it, and the tracker warns
    of a "leaked semaphore" when the sweep ends. A worker's bars are its own, so a thread lock will do."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _serve(conn: Connection, setup: WorkerSetup) -> None:
    _die_with_parent()
    _thread_lock_for_progress_bars()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's to handle: it kills this process
    # Before any point's clock starts: cold imports took seconds of a point's hard limit.
    for module in setup.layer_modules:
        importlib.import_module(module)
    warm_up_tools()
    torch.backends.cudnn.benchmark = setup.settings.cudnn_benchmark
    configure_cpu_heap(setup.settings.cpu_heap)
    with address_space_cap(setup.memory_cap_bytes, enabled=setup.cap_memory) as cap:
        gc.freeze()  # the start-up heap, no longer rescanned by each point's collections
        conn.send(cap)
        warmed_up = False
        while True:
            try:
                layers, problem, run_id, first_round = conn.recv()
            except EOFError:
                return
            points = [SweepPoint(get_layer(name), problem, *form) for name, *form in layers]
            if not warmed_up:  # with the eager form: compiling is the point's own first call
                warm_up_process(points[0], setup.settings)
                warmed_up = True
                conn.send(WARMED_UP)
            rows = run_points(points, setup.settings, setup.env, run_id, first_round=first_round,
                              on_prepared=lambda: conn.send(PREPARED))
            conn.send(rows)


def layer_modules(layers: Sequence[Any]) -> tuple[str, ...]:
    """The modules whose import registers these layers (built-ins and plugins alike)."""
    return tuple(sorted({layer.factory.__module__ for layer in layers}))
