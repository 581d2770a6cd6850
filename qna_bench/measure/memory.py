"""Peak memory of one call, in a pass of its own (no warm-up loop inside it).

CUDA: the caching allocator's statistics. CPU: torch keeps none, so `LiveStorageTracker`, a
`TorchDispatchMode`, adds each storage an op newly allocates when it appears and subtracts it when the
storage is freed; views and in-place results share their input's storage and are not counted again.
It counts storages, not allocator state, so on CPU the pass can be the point's first call; inputs made
during the call (a train step's upstream gradient) are made under `untracked`.
"""

from __future__ import annotations

import contextlib
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA_ALLOCATOR = "cuda_allocator"
CPU_LIVE_STORAGES = "cpu_live_storages"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class MemoryStats:
    """``peak_bytes``: the most the call held above what existed before it (None when unavailable).
    ``base_bytes``: inputs and parameters, which exist before the call."""

    peak_bytes: int | None
    base_bytes: int
    method: str
    note: str = ""
    # Wall time of the measured call itself (with the tracker's small overhead on CPU).
    call_s: float | None = None


class LiveStorageTracker(TorchDispatchMode):
    """Tracks bytes of live storages allocated by ops run under it; ``peak_bytes`` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _untracked_depth:
            return out
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._track(tensor.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, input_storages: set[int]) -> None:
        pointer = storage.data_ptr()
        if pointer == 0 or pointer in self._live or pointer in input_storages:
            return
        nbytes = storage.nbytes()
        self._live[pointer] = nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, pointer)

    def _release(self, pointer: int) -> None:
        self.live_bytes -= self._live.pop(pointer, 0)


_untracked_depth = 0


@contextlib.contextmanager
def untracked() -> Iterator[None]:
    """Storages allocated inside are not counted by any `LiveStorageTracker` (inputs made mid-call)."""
    global _untracked_depth
    _untracked_depth += 1
    try:
        yield
    finally:
        _untracked_depth -= 1


def measure_peak_memory(fn: Callable[[], object], device: torch.device, base_bytes: int) -> MemoryStats:
    """Run ``fn`` once and report its peak memory above the starting point."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        call_s = time.perf_counter() - began
        peak = torch.cuda.max_memory_allocated(device) - start
        return MemoryStats(peak, base_bytes, CUDA_ALLOCATOR, call_s=call_s)
    tracker = LiveStorageTracker()
    try:
        began = time.perf_counter()
        with tracker:
            fn()
        call_s = time.perf_counter() - began
    except NotImplementedError as exc:
        if "HigherOrderOperator" not in str(exc) and "no rule registered" not in str(exc):
            raise
        return MemoryStats(None, base_bytes, UNAVAILABLE, f"the CPU storage tracker cannot see inside: {_one_line(exc)}")
    return MemoryStats(tracker.peak_bytes, base_bytes, CPU_LIVE_STORAGES, call_s=call_s)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
