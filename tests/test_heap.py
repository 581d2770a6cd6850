"""The worker's CPU heap: with `caching`, memory a call frees stays in the process for the next call."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qna_bench.heap import CPU_HEAPS, configure_cpu_heap

# Allocates, touches and frees a 96 MiB tensor twice; prints the minor page faults of the second time.
_SCRIPT = """
import resource, sys, torch
from qna_bench.heap import configure_cpu_heap
assert configure_cpu_heap(sys.argv[1])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    before = faults()
    block = torch.ones(24 * 2**20)
    del block
print(faults() - before)
"""


def _second_call_faults(heap: str) -> int:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, heap], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_a_caching_heap_maps_a_large_block_once_and_the_system_heap_every_time():
    # 96 MiB is 24,576 pages of 4 KiB, or 48 transparent huge pages; the caching heap reuses them.
    caching, system = _second_call_faults("caching"), _second_call_faults("system")
    assert system >= 48 and caching < system / 4, (caching, system)


def test_an_unknown_heap_is_refused_naming_the_allowed_values():
    with pytest.raises(ValueError, match="measure.cpu_heap='jemalloc': allowed values are caching, system"):
        configure_cpu_heap("jemalloc")
    assert CPU_HEAPS == ("caching", "system")
