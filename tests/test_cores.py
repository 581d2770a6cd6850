"""Asked for all cores, a sweep measures on those that other work leaves idle."""

from __future__ import annotations

import json
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


def test_a_resumed_sweep_keeps_the_threads_its_rows_were_chosen_with(tmp_path):
    from qna_bench import results, sweep
    from qna_bench.point import MeasureSettings

    path = tmp_path / results.RESULTS_FILE
    recorded = [json.dumps({"threads": 1, "threads_note": "1 of 2: other work kept cpu0 99% busy at the start"})] * 3
    results.append_rows(path, [results.make_row(measure_settings=r, status="ok", layer=str(i)) for i, r in enumerate(recorded)])
    now = MeasureSettings(threads=2, threads_note="all cores (idle at the start)")
    resumed = sweep._resumed_threads(now, path)
    assert resumed.threads == 1 and "as the results being resumed were measured" in resumed.threads_note
    # Threads asked for by number are never overridden, and a new results file changes nothing.
    path.unlink()
    results.append_rows(path, [results.make_row(measure_settings=json.dumps({"threads": 1, "threads_note": "asked for"}),
                                                 status="ok", layer="0")])
    assert sweep._resumed_threads(now, path) == now
    assert sweep._resumed_threads(now, tmp_path / "none.parquet") == now
