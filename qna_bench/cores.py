"""The cores a sweep measures on, when it is asked for all of them (``measure.threads=0``): those that
other work leaves idle, sampled from ``/proc/stat`` before any work starts.

An OpenMP region ends when its slowest thread does, so a torch thread that shares its core with another
busy process stalls every region for whole scheduler slices, by an amount that depends on how the slices
fall: with 2 threads on 2 cores beside one busy loop, back-to-back runs of the same command moved a
QnA / fused-Swin ratio by up to 41% (AMD EPYC, 2026-12-06). The sweep then measures on the idle cores,
prints why and records it in every row (``measure_settings``: ``threads``, ``threads_note``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# A CPU busier than this over the sample, with our process asleep, is taken by other work.
BUSY_SHARE = 0.5
SAMPLE_S = 0.2


def _cpu_times(stat_path: str) -> dict[int, tuple[int, int]]:
    """Per logical CPU: (idle jiffies, incl. iowait; all jiffies), from /proc/stat."""
    times = {}
    for line in Path(stat_path).read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times


def busy_shares(interval_s: float = SAMPLE_S, stat_path: str = "/proc/stat", sleep=time.sleep) -> dict[int, float] | None:
    """Per logical CPU this process may run on, the share of ``interval_s`` it spent busy (this process
    sleeps meanwhile); None where /proc/stat cannot be read."""
    try:
        before = _cpu_times(stat_path)
        sleep(interval_s)
        after = _cpu_times(stat_path)
    except (OSError, ValueError, IndexError):
        return None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(after)
    shares = {}
    for cpu in sorted(set(before) & set(after) & set(allowed)):
        idle = after[cpu][0] - before[cpu][0]
        total = after[cpu][1] - before[cpu][1]
        if total > 0:
            shares[cpu] = min(1.0, max(0.0, 1.0 - idle / total))
    return shares or None


def idle_core_threads(all_threads: int, shares: dict[int, float] | None) -> tuple[int, str]:
    """The threads to measure with when asked for all ``all_threads``, and why: one per idle CPU, at most
    ``all_threads``, at least one."""
    if shares is None:
        return all_threads, "all cores (their load could not be read)"
    busy = {cpu: share for cpu, share in shares.items() if share >= BUSY_SHARE}
    threads = max(1, min(all_threads, len(shares) - len(busy)))
    if threads == all_threads:
        return threads, "all cores (idle at the start)"
    listed = ", ".join(f"cpu{cpu} {share:.0%}" for cpu, share in busy.items())
    return threads, f"{threads} of {all_threads}: other work kept {listed} busy at the start"
