"""`compare` across machines: a re-run of the committed AVX-512 window_sweep on a slower host of the same
kind is named as a machine change and passes; a layer slowed on the same machine still fails.

The re-runs are built here from the committed parquet; nothing is measured.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qna_bench import compare, results
from qna_bench.compare.machine import compute_shares, machine_change
from qna_bench.noise import noise_floor

REPO = Path(__file__).resolve().parent.parent
WINDOW_SWEEP = REPO / "results" / "cpu-2core-amd-epyc-avx512_2026-12-07" / "window_sweep_as_shipped" / results.RESULTS_FILE
TIME_COLUMNS = ("median_s", "q25_s", "q75_s", "min_s", "mean_s")
ROUND_COLUMNS = ("times_s", "round_medians_s", "round_geomeans_s")


@pytest.fixture(scope="module")
def committed() -> pd.DataFrame:
    return results.read_results(WINDOW_SWEEP)


def _scaled(frame: pd.DataFrame, factors) -> pd.DataFrame:
    """``frame`` with every time of row i multiplied by ``factors[i]``."""
    out = frame.copy()
    for column in TIME_COLUMNS:
        out[column] = out[column] * factors
    for column in ROUND_COLUMNS:
        out[column] = [None if v is None else [t * f for t in v] for v, f in zip(out[column], factors)]
    return out


def _slower_host(frame: pd.DataFrame, canary: float = 1.10, probe: float = 0.94, timeouts: int = 3,
                 seed: int = 0) -> pd.DataFrame:
    """The run as a host of the same kind with a slower core re-runs it: the canary ``canary`` times
    slower, the compute probe at ``probe`` of its rate, each layer's times slowed by how compute-bound it
    is (its median share of the compute roof, from 10% (not at all) to QnA's (the canary's whole
    slowdown)) and a per-run jitter of ±2% per point; the slowest ``timeouts`` points over the budget."""
    shares = compute_shares(frame)
    bound = {layer: min(1.0, max(0.0, (s - 0.1) / (shares["qna"] - 0.1))) for layer, s in shares.items()}
    rng = random.Random(seed)
    out = _scaled(frame, np.array([canary ** bound.get(layer, 0.0) * rng.uniform(0.98, 1.02)
                                   for layer in frame["layer"]]))
    out["canary_s"] = [None if v is None else [t * canary for t in v] for v in frame["canary_s"]]
    out["peak_flops_probe"] = frame["peak_flops_probe"] * probe
    slowest = out[out["status"] == "ok"].sort_values("median_s").index[-timeouts:]
    for column in (*TIME_COLUMNS, *ROUND_COLUMNS):
        out[column] = out[column].astype(object)
        out.loc[slowest, column] = None
    out.loc[slowest, "status"] = "timeout"
    out.loc[slowest, "reason"] = "one call takes 1.41 s; more than is left of the per-point budget of 5 s"
    return out


def _layer_slowed(frame: pd.DataFrame, layer: str, factor: float) -> pd.DataFrame:
    return _scaled(frame, np.where(frame["layer"] == layer, factor, 1.0))


def _main(tmp_path, capsys, new: pd.DataFrame) -> tuple[int, str, str]:
    path = tmp_path / "new.parquet"
    pq.write_table(pa.Table.from_pandas(new, preserve_index=False), path)
    code = compare.main([str(WINDOW_SWEEP), str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _layer_line(out: str, layer: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith(f"{layer} ") and x.split()[1].isdigit()
               and len(x.split()) > 3 and x.split()[2].endswith("×")]
    return line


def test_a_slower_host_of_the_same_kind_is_named_and_its_moves_do_not_fail(tmp_path, capsys, committed):
    code, out, err = _main(tmp_path, capsys, _slower_host(committed))
    assert code == compare.EXIT_OK, out[-3000:]
    head = out.splitlines()[2]
    assert head.startswith("machine: CHANGED") and "cpu: AMD EPYC (AVX512)" in head
    assert "canary 0.5363 → 0.5901 ms (×1.100 slower, beyond ×1.05)" in out
    assert "compute probe 515.4 → 484.5 GFLOP/s (×1.064 slower, beyond ×1.05)" in out
    explained = out.split("layers whose share of the compute roof explains their move")[1].split("significant:")[0]
    assert "qna ×1.0" in explained and "of the compute roof; the other layers' median" in explained
    assert "not counted: machine change" in _layer_line(out, "qna")
    assert "points that crossed the time budget on the slower machine, not counted: 3" in out
    assert out.count("ok → timeout") == 3 and "REGRESSION" not in out
    (warning,) = err.splitlines()
    assert warning.startswith("compare: warning: BASE and NEW ran on different machines")


def test_the_moves_on_the_slower_host_would_fail_if_the_machine_were_not_read(committed):
    comparison = compare.compare_runs(committed, _slower_host(committed), compare.Thresholds())
    points, layers = comparison.excused
    assert "qna" in {dict(c.group)["layer"] for c in layers}
    assert {p.excused for p in points} == {"crossed the time budget on the slower machine"} and len(points) == 3
    assert not comparison.regressed


def test_a_layer_1_3x_slower_on_the_same_machine_is_flagged(tmp_path, capsys, committed):
    code, out, err = _main(tmp_path, capsys, _layer_slowed(committed, "qna", 1.3))
    assert code == compare.EXIT_REGRESSION
    assert out.splitlines()[2].startswith("machine: the same")
    assert _layer_line(out, "qna").endswith("REGRESSION")
    assert err == ""


def test_a_layer_1_3x_slower_on_a_slower_host_is_still_flagged(tmp_path, capsys, committed):
    code, out, _ = _main(tmp_path, capsys, _layer_slowed(_slower_host(committed), "qna", 1.3))
    assert code == compare.EXIT_REGRESSION
    assert out.splitlines()[2].startswith("machine: CHANGED")
    assert _layer_line(out, "qna").endswith("REGRESSION")


def test_the_fingerprint_reads_the_cpu_and_its_caches_not_the_hostname(committed):
    floors = noise_floor(committed), noise_floor(committed)
    assert not machine_change(committed, committed.assign(hostname="elsewhere"), floors).changed
    other = machine_change(committed, committed.assign(device_name="cpu: AMD EPYC (AVX2)"), floors)
    assert other.changed and other.differs == (("device_name", "cpu: AMD EPYC (AVX512)", "cpu: AMD EPYC (AVX2)"),)
    smaller = machine_change(committed, committed.assign(llc_bytes_probe=16 * 2**20), floors)
    assert smaller.changed and smaller.differs[0][0] == "llc_bytes_probe"
