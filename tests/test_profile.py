"""measure.profile: each point's per-op breakdown, written next to the parquet and named by its row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qna_bench.environment import read_environment
from qna_bench.measure.profile import OpTime, profile_ops, render_profile
from qna_bench.problem import Problem
from qna_bench.registry import get_layer
from qna_bench.runner import MeasureSettings, SweepPoint, run_point

PROBLEM = Problem(batch=1, height=16, width=16, channels=16, heads=2, window=5)


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_a_profiled_point_writes_its_top_ops_next_to_the_parquet(tmp_path, mode):
    settings = MeasureSettings(threads=1, min_run_time_s=0.01, point_budget_s=60.0, profile_dir=str(tmp_path))
    row = run_point(SweepPoint(get_layer("conv_dw"), PROBLEM.replace(mode=mode)), settings, read_environment("cpu"), "t")
    assert row["status"] == "ok", row["reason"]
    path = tmp_path / row["profile_file"]
    assert path.parent == tmp_path / "profiles" and row["point_key"] in path.name
    text = path.read_text()
    assert "| op | self ms | share | GFLOP | calls |" in text
    assert "convolution" in text
    if mode == "train":
        assert "backward" in text


def test_the_profile_attributes_flops_and_shares_to_each_op():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    ops = profile_ops(lambda: torch.mm(a, b), torch.device("cpu"), calls=2)
    matmul = next(op for op in ops if op.name == "aten::mm")
    assert matmul.flops == 2 * 256**3 and matmul.calls == 1
    assert sum(op.share for op in ops) == pytest.approx(1.0)
    assert ops == sorted(ops, key=lambda op: op.self_s, reverse=True)


def test_ops_beyond_the_top_are_summed_into_one_line():
    ops = [OpTime(f"op{i}", 0.001 * (5 - i), 0.2, 10**9, 1) for i in range(5)]
    text = render_profile(ops, "title", top=3)
    assert "`op2`" in text and "`op3`" not in text
    assert "| 2 other ops | 3.000 | 40.0% | 2.000 | 2 |" in text


def test_an_unprofiled_point_names_no_profile(tmp_path):
    settings = MeasureSettings(threads=1, min_run_time_s=0.01, point_budget_s=60.0)
    row = run_point(SweepPoint(get_layer("conv_dw"), PROBLEM), settings, read_environment("cpu"), "t")
    assert row["profile_file"] is None and not list(Path(tmp_path).iterdir())
