"""The worker's CPU heap: with `caching`, a call's blocks of a few MiB come from the heap and stay in it
when freed, for the next call; glibc's defaults map them afresh and hand them back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qna_bench.heap import CPU_HEAPS, configure_cpu_heap

# In a fresh process: a 20 MiB tensor, allocated then freed; prints glibc's mallinfo2 after each:
# hblkhd (bytes in mmapped blocks) and fordblks (free bytes kept in the heap).
_SCRIPT = """
import ctypes, sys, torch
from qna_bench.heap import configure_cpu_heap
assert configure_cpu_heap(sys.argv[1])
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
block = torch.ones(5 * 2**20)
held = mallinfo2()
del block
freed = mallinfo2()
print(held.hblkhd, freed.fordblks)
"""

MIB = 2**20


def _heap_after_a_20_mib_block(heap: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, heap], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    mapped, kept = done.stdout.split()[-2:]
    return int(mapped), int(kept)


def test_a_caching_heap_serves_a_block_of_a_few_mib_from_the_heap_and_keeps_it_when_freed():
    mapped, kept = _heap_after_a_20_mib_block("caching")
    assert mapped < 20 * MIB and kept >= 20 * MIB
    mapped, kept = _heap_after_a_20_mib_block("system")  # glibc's first threshold is 128 KiB
    assert mapped >= 20 * MIB and kept < 20 * MIB


def test_an_unknown_heap_is_refused_naming_the_allowed_values():
    with pytest.raises(ValueError, match="measure.cpu_heap='jemalloc': allowed values are caching, system"):
        configure_cpu_heap("jemalloc")
    assert CPU_HEAPS == ("caching", "system")
