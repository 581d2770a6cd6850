"""Peak memory of one call, in a pass of its own (no warm-up loop inside it).

CUDA: the caching allocator's statistics, read from the state every layer starts from (gradients of the
input and parameters cleared, peak statistic reset), so a train step's gradients count in its peak.
CPU: torch keeps no statistics, but its CPU allocator reports every allocation and free, with address
and size, to `torch.profiler` (``profile_memory=True``), including those made inside kernels (oneDNN's
weight reorders and scratchpads, attention backward buffers) and inside compiled code (flex attention).
The peak is the running sum's maximum over the call, counting only blocks the call itself allocated.
Memory that does not come from torch's allocator (a library's own ``malloc``, Python objects) is not
seen. It counts allocations, not allocator state, so on CPU the pass can be the point's first call;
inputs made during the call (a train step's upstream gradient) are made under `untracked`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

CUDA_ALLOCATOR = "cuda_allocator"
CPU_ALLOCATOR_EVENTS = "cpu_allocator_events"

# The name of the profiler range whose allocations a CPU peak leaves out (see `untracked`).
UNTRACKED_RANGE = "qna_bench.untracked"

# Kineto prints start/stop lines to stderr for every profiling session unless its log level is above
# all of its levels; it reads this once, at its first use.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


@dataclass(frozen=True)
class MemoryStats:
    """``peak_bytes``: the most the call held above what existed before it.
    ``base_bytes``: inputs and parameters, which exist before the call."""

    peak_bytes: int
    base_bytes: int
    method: str
    note: str = ""
    # Wall time of the measured call itself (with the profiler's overhead on CPU).
    call_s: float | None = None


@dataclass(frozen=True)
class Allocation:
    """One allocator event: ``nbytes`` > 0 allocates the block at ``address``, < 0 frees it."""

    time_ns: int
    address: int
    nbytes: int


@contextlib.contextmanager
def untracked() -> Iterator[None]:
    """Allocations made inside do not count in a CPU peak (inputs made mid-call), nor their frees."""
    with record_function(UNTRACKED_RANGE):
        yield


def running_peak(allocations: Iterable[Allocation]) -> int:
    """The most bytes held at once by blocks allocated in this trace; a free of a block allocated before
    it (or under `untracked`) does not lower the count."""
    live: dict[int, int] = {}
    held = peak = 0
    for event in sorted(allocations, key=lambda a: (a.time_ns, a.nbytes)):
        if event.nbytes > 0:
            held += event.nbytes - live.get(event.address, 0)
            live[event.address] = event.nbytes
            peak = max(peak, held)
        elif event.address in live:
            held -= live.pop(event.address)
    return peak


def cpu_allocations(prof: profile) -> list[Allocation]:
    """The CPU allocator's events of a finished ``profile(profile_memory=True)``, leaving out those
    inside an `untracked` range. Reads the profiler's private event tree (pinned by tests/test_memory.py)."""
    found: list[Allocation] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.name == UNTRACKED_RANGE:
            continue
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                found.append(Allocation(event.start_time_ns, fields.ptr, fields.alloc_size))
    return found


def cpu_peak(fn: Callable[[], object]) -> tuple[int, float]:
    """Run ``fn`` once under the profiler; its CPU allocation peak in bytes and its seconds."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        began = time.perf_counter()
        fn()
        call_s = time.perf_counter() - began
    return running_peak(cpu_allocations(prof)), call_s


def measure_peak_memory(
    fn: Callable[[], object],
    device: torch.device,
    base_bytes: int,
    grad_leaves: Iterable[torch.Tensor] = (),
) -> MemoryStats:
    """Run ``fn`` once and report its peak memory above the starting point.

    ``grad_leaves`` (a train step's input and parameters) have their ``.grad`` cleared before the
    starting level is read: a warm-up call's gradients would otherwise count in the start and be freed
    inside the call, hiding the gradients the call makes from its peak.
    """
    for leaf in grad_leaves:
        leaf.grad = None
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
    peak, call_s = cpu_peak(fn)
    return MemoryStats(peak, base_bytes, CPU_ALLOCATOR_EVENTS, call_s=call_s)
