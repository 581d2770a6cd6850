"""The CPU heap the measuring worker runs on.

glibc's malloc hands a block over 32 MiB (less before its threshold adapts) to the kernel on every free
and maps fresh pages for the next call, so a layer with large intermediates pays page faults in every
timed call, and their cost swings with the host (another tenant, memory compaction): fused Swin at k=13
(B=8, 56², fp32, 2 threads) read 69–100 ms from call to call in one process, and the QnA / fused-Swin
ratio's coefficient of variation within a process was 5–11 % (four processes, AMD EPYC, 2026-12-06).
With `CACHING`, as CUDA's caching allocator and the jemalloc or tcmalloc of PyTorch's CPU tuning guide
do, freed memory stays in the process for the next call: 2–8 %, the ratio's median about the same
(0.36–0.42 against 0.35–0.42). Between
points the worker still hands everything free back (`qna_bench.point.release_memory`), so one heavy
point does not inflate the next. `SYSTEM` leaves glibc's defaults. The setting is recorded in every row
(``measure_settings``).
"""

from __future__ import annotations

import ctypes

CACHING = "caching"
SYSTEM = "system"
CPU_HEAPS = (CACHING, SYSTEM)

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the heap's top is handed back only beyond this (the largest value mallopt takes).
_NEVER_TRIM_BYTES = 2**31 - 1


def configure_cpu_heap(heap: str) -> bool:
    """Set this process's glibc heap to ``heap`` (`CPU_HEAPS`); False where there is no glibc to set."""
    if heap not in CPU_HEAPS:
        raise ValueError(f"measure.cpu_heap={heap!r}: allowed values are {', '.join(CPU_HEAPS)}")
    if heap == SYSTEM:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # No block from mmap (a large one comes from the heap, and stays there when freed), no trimming.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES))
