"""Asked for all cores, a sweep measures on those that other work leaves idle."""

from __future__ import annotations

import os

import pytest

from qna_bench.cores import busy_shares, idle_core_threads

_HEADER = "cpu  1 2 3 4 5 6 7 8 0 0\n"


def _stat(cpus: dict[int, tuple[int, int]]) -> str:
    """A /proc/stat with, per CPU, (busy jiffies in user, idle jiffies)."""
    lines = [f"cpu{cpu} {busy} 0 0 {idle} 0 0 0 0 0 0" for cpu, (busy, idle) in cpus.items()]
    return _HEADER + "\n".join(lines) + "\nintr 1 2 3\n"


def test_a_cpu_kept_busy_by_other_work_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    stat = tmp_path / "stat"
    stat.write_text(_stat({0: (100, 100), 1: (100, 100)}))
    # Over the sample cpu0 stays idle and cpu1 runs another process 97% of the time.
    shares = busy_shares(stat_path=str(stat), sleep=lambda s: stat.write_text(_stat({0: (101, 199), 1: (197, 103)})))
    assert shares == pytest.approx({0: 0.01, 1: 0.97})
    assert idle_core_threads(2, shares) == (1, "1 of 2: other work kept cpu1 97% busy at the start")


def test_idle_cores_measure_with_all_threads_and_an_unreadable_stat_changes_nothing(tmp_path):
    assert idle_core_threads(2, {0: 0.02, 1: 0.1}) == (2, "all cores (idle at the start)")
    assert idle_core_threads(2, {0: 0.9, 1: 0.95})[0] == 1  # never fewer than one
    assert busy_shares(stat_path=str(tmp_path / "missing"), sleep=lambda s: None) is None
    assert idle_core_threads(2, None) == (2, "all cores (their load could not be read)")
