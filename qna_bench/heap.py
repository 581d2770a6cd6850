"""The CPU heap the measuring worker runs on.

glibc's malloc maps a block above its mmap threshold afresh for each allocation and unmaps it on free,
and hands the free top of its heap back to the kernel past a trim threshold. Both thresholds move with
the frees a process has made, so whether a call's intermediates of a few MiB come back from the heap or
are faulted in page by page is a state of the process: QnA's forward at k=3 (B=8, 56², C=128, fp32, 2
threads) ran 15 ms in some worker processes and 25 ms in others, and 26–28 ms in six fresh processes of
its own, where its 12–13 MiB blocks were faulted in on every call (AMD EPYC, 2026-12-06). With `CACHING`
the thresholds are fixed: blocks up to 32 MiB (glibc's largest mmap threshold) come from the heap and
stay there when freed, as CUDA's caching allocator and the jemalloc or tcmalloc of PyTorch's CPU tuning
guide keep them; the same forward then ran 14.5–15 ms in every process. Larger blocks are still mapped
per allocation. Between points the worker hands everything free back (`qna_bench.point.release_memory`),
so one heavy point does not inflate the next. `SYSTEM` leaves glibc's defaults. The setting is recorded
in every row (``measure_settings``).
"""

from __future__ import annotations

import ctypes

CACHING = "caching"
SYSTEM = "system"
CPU_HEAPS = (CACHING, SYSTEM)

# mallopt(3) parameters and values.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_MMAP_THRESHOLD = 32 << 20  # HEAP_MAX_SIZE / 2 on 64-bit glibc
_NEVER_TRIM_BYTES = 2**31 - 1

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no heap to set or trim
    _LIBC = None


def configure_cpu_heap(heap: str) -> bool:
    """Set this process's glibc heap to ``heap`` (`CPU_HEAPS`); False where there is no glibc to set."""
    if heap not in CPU_HEAPS:
        raise ValueError(f"measure.cpu_heap={heap!r}: allowed values are {', '.join(CPU_HEAPS)}")
    if heap == SYSTEM:
        return True
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)) and bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES))


def trim_cpu_heap() -> None:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim``; nothing elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
