"""Hydra multiruns: per-job parquets merged into the union, in-process and through submitit_local."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qna_bench import results

REPO = Path(__file__).resolve().parent.parent
SWEEP = ["-m", "layers=conv_dw,conv_dense", "windows=[3,5]", "modes=forward", "problem=tiny",
         "measure.min_run_time_s=0.01"]


def _multirun(sweep_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "run_bench.py"), *SWEEP, f"hydra.sweep.dir={sweep_dir}", *extra],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _job_rows(sweep_dir: Path) -> set[str]:
    keys: set[str] = set()
    for part in sweep_dir.rglob(results.RESULTS_FILE):
        if part != sweep_dir / results.RESULTS_FILE:
            keys |= set(results.read_results(part)["point_key"])
    return keys


def test_a_two_job_multirun_merges_to_exactly_the_union_and_a_rerun_measures_nothing_new(tmp_path):
    done = _multirun(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = results.read_results(tmp_path / results.RESULTS_FILE)
    assert len(merged) == 4 and merged["point_key"].is_unique
    assert set(merged["point_key"]) == _job_rows(tmp_path)
    assert set(zip(merged["layer"], merged["window"])) == {(a, k) for a in ("conv_dw", "conv_dense") for k in (3, 5)}
    assert (tmp_path / "latency.png").stat().st_size > 0
    again = _multirun(tmp_path, "plots=false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("2 of 2 points already") == 2
    assert results.read_results(tmp_path / results.RESULTS_FILE).equals(merged)


@pytest.mark.slow
def test_submitit_local_jobs_run_in_subprocesses_and_merge(tmp_path):
    done = _multirun(tmp_path, "hydra/launcher=local_processes", "plots=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / ".submitit").is_dir()
    merged = results.read_results(tmp_path / results.RESULTS_FILE)
    assert len(merged) == 4
    assert set(merged["point_key"]) == _job_rows(tmp_path)
