"""Numbers that reproduce: rounds in fresh worker processes, the canary and its slow rounds, the noise
floor, and the ratios whose spread crosses a verdict line."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest

from qna_bench import analysis as A
from qna_bench import compare, noise, report, results, runner
from qna_bench.environment import read_environment
from qna_bench.measure.canary import MIN_CANARIES, canary_seconds, is_slow
from qna_bench.point import MeasureSettings, SweepPoint
from qna_bench.problem import Problem
from qna_bench.registry import get_layer
from tests.test_report import synthetic_row


def test_the_canary_times_a_fixed_product_and_counts_slow_only_against_an_established_median():
    assert 0 < canary_seconds("cpu", calls=2) < 1.0
    usual = [1.0e-3] * MIN_CANARIES
    assert is_slow(1.5e-3, usual, share=0.3) and not is_slow(1.2e-3, usual, share=0.3)
    assert not is_slow(1.0, usual[:-1], share=0.3)  # too few canaries to call anything slow


@pytest.mark.parametrize("fresh", [True, False])
def test_each_round_runs_in_its_own_worker_process_and_records_its_canary(tmp_path, fresh):
    points = runner.plan_sweep([get_layer("conv_dw")], [3], ["forward"],
                               [Problem(batch=1, height=8, width=8, channels=4, heads=1)])
    settings = MeasureSettings(threads=1, min_run_time_s=0.005, min_replicates=3, memory=False, flops=False,
                               rounds=3, probes="off", fresh_processes=fresh)
    path = tmp_path / "results.parquet"
    outcome = runner.run_sweep(points, path, settings, read_environment("cpu"), stream=io.StringIO())
    assert outcome.statuses == {"ok": 1}
    (row,) = results.read_results(path).to_dict("records")
    assert row["rounds"] == 3 and row["processes"] == (3 if fresh else 1)
    assert len(row["canary_s"]) == 3 and all(c > 0 for c in row["canary_s"]) and row["slow_rounds"] == 0


class _StandInWorker:
    """Returns rows whose canary is the next of ``canaries``; counts the calls."""

    pid = 4242

    def __init__(self, canaries):
        self.canaries, self.calls = list(canaries), 0

    def run_together(self, layers, problem, run_id, limit_s, first_round=True):
        self.calls += 1
        canary = self.canaries.pop(0)
        return [{"status": "ok", "canary_s": [canary], "times_s": [1.0], "point_seconds": 0.1} for _ in layers]


@pytest.mark.parametrize("canaries, calls, flagged", [
    ([1.0e-3], 1, 0),  # usual: measured once
    ([3.0e-3, 1.0e-3], 2, 0),  # slow, then usual on the re-run: the re-run's row
    ([3.0e-3, 3.1e-3], 2, 1),  # slow twice: flagged
])
def test_a_round_whose_canary_ran_slow_is_measured_again_then_flagged(canaries, calls, flagged):
    worker, run_canaries, stream = _StandInWorker(canaries), [1.0e-3] * MIN_CANARIES, io.StringIO()
    points = [SweepPoint(get_layer(name), Problem()) for name in ("conv_dw", "swin")]
    measured = runner._measure_round(worker, points, True, run_canaries, None, MeasureSettings(threads=1), "r", None,
                                     stream)
    assert worker.calls == calls and len(measured) == 2
    for row, pid in measured:  # the layers of a point share their round, its canary and its verdict
        assert row["slow_rounds"] == flagged and pid == 4242 and row["canary_s"] == [canaries[-1]]
    assert len(run_canaries) == MIN_CANARIES + calls
    assert ("slow round" in stream.getvalue()) == (calls > 1)


def test_the_noise_floor_states_the_canary_spread_and_each_layers_spread_between_processes():
    rows = pd.DataFrame([
        dict(layer="qna", status="ok", canary_s=[1.0, 1.0, 1.0], processes=3, round_medians_s=[1.0, 1.1, 1.05],
             slow_rounds=0),
        dict(layer="qna", status="ok", canary_s=[1.0, 2.0, 1.0], processes=3, round_medians_s=[2.0, 2.0, 2.4],
             slow_rounds=1),
        dict(layer="swin", status="ok", canary_s=None, processes=1, round_medians_s=[1.0, 1.5], slow_rounds=0),
        dict(layer="swin", status="error", canary_s=[9.0], processes=3, round_medians_s=[1.0, 9.0], slow_rounds=0),
    ])
    floor = noise.noise_floor(rows)
    assert floor.canaries == 6 and floor.canary_median_s == 1.0 and floor.canary_worst == pytest.approx(1.0)
    assert floor.slow_rounds == 1
    assert list(floor.layers["layer"]) == ["qna"]  # swin's rounds came from one process
    qna = floor.layers.iloc[0]
    assert qna["median_spread"] == pytest.approx(0.15) and qna["max_spread"] == pytest.approx(0.2)
    assert floor.layer_sigma("qna") == pytest.approx(
        (math.log1p(0.1) / 1.693 + math.log1p(0.2) / 1.693) / 2) and floor.layer_sigma("swin") == 0.0
    assert "qna 15.0%" in floor.summary()
    empty = noise.noise_floor(pd.DataFrame([dict(layer="qna", status="ok")]))
    assert empty.canaries == 0 and empty.layers.empty and "no canary" in empty.summary()


@pytest.mark.parametrize("low, high, line", [(0.9, 1.2, 1.0), (4.5, 5.5, 5.0), (9.0, 11.0, 10.0), (1.1, 4.9, None),
                                             (1.0, 1.3, None)])
def test_a_spread_crosses_a_verdict_line_only_when_it_reaches_past_it(low, high, line):
    assert A.crossed_line(low, high) == line


def test_the_report_marks_a_ratio_whose_rounds_disagree_on_who_is_faster_and_states_the_floor():
    def row(layer, k, rounds):
        return synthetic_row(layer, k, "forward", sorted(rounds)[1], 1000, round_medians_s=rounds, rounds=3,
                             processes=3, canary_s=[1e-3, 1.1e-3, 1e-3], slow_rounds=0)

    rows = [row("qna", 3, [1.0, 1.0, 1.0]), row("swin", 3, [0.9, 1.1, 1.2]),  # 0.9–1.2: crosses 1×
            row("qna", 5, [1.0, 1.0, 1.0]), row("swin", 5, [2.0, 2.1, 2.2])]
    text = report.render(A.analyse(results.rows_to_table(rows).to_pandas(types_mapper=results._PANDAS_TYPES.get)))
    assert "### Noise floor" in text and "Canary" in text and "| swin | 2 | 3 |" in text
    assert "crosses 1×" in text and "swin forward k=3" in text
    assert "swin forward k=5" not in text


def _run_with_floor(seed, spread, scale=1.0):
    """qna, swin_fused and conv_dw at 3 windows × both modes, 3 rounds in 3 processes, each round of
    each point off by up to ±``spread`` (the noise between processes), qna ``scale`` times slower."""
    import random

    rng = random.Random(seed)
    rows = []
    for window in (3, 7, 13):
        for mode in ("forward", "train"):
            for layer, ms in (("qna", 2.0), ("swin_fused", 3.0), ("conv_dw", 0.5)):
                factor = scale if layer == "qna" else 1.0
                medians = [ms * window * factor * rng.uniform(1 - spread, 1 + spread) / 1e3 for _ in range(3)]
                rows.append(synthetic_row(layer, window, mode, sorted(medians)[1], 1000, round_medians_s=medians,
                                          rounds=3, processes=3, canary_s=[1e-3] * 3, slow_rounds=0))
    return results.rows_to_table(rows).to_pandas()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compare_holds_changes_within_the_floor_back_and_flags_a_layer_slowed_1_3x(seed):
    thresholds = compare.Thresholds(fail_over=0.05)
    same = compare.compare_results(_run_with_floor(seed, 0.08), _run_with_floor(seed + 10, 0.08), thresholds)
    assert all(p.floor_sigma > 0 for p in same)
    assert not any(p.regression for p in same)
    assert not any(c.regression for c in compare.layer_changes(same, thresholds))
    slowed = compare.compare_results(_run_with_floor(seed, 0.08), _run_with_floor(seed + 10, 0.08, scale=1.3),
                                     thresholds)
    regressed = {dict(c.group)["layer"] for c in compare.layer_changes(slowed, thresholds) if c.regression}
    assert regressed == {"qna"}
