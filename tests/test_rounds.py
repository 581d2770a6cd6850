"""Rounds: the planned order of a sweep, round medians and the spread of a ratio. Nothing is measured."""

from __future__ import annotations

import pytest

from qna_bench.problem import Problem
from qna_bench.registry import get_layer
from qna_bench.rounds import add_round, geometric_mean, latency_summary, ratio_spread, rotated, round_times
from qna_bench.runner import plan_rounds, plan_sweep


def _labels(planned):
    return [(r, p.layer.name, p.problem.window, p.problem.mode) for r, p in planned]


def test_a_3_layer_2_window_sweep_runs_the_layers_of_a_point_back_to_back_and_rotates_them_each_round():
    layers = [get_layer(name) for name in ("qna", "conv_dw", "conv_dense")]
    points = plan_sweep(layers, [3, 5], ["forward"], [Problem()])
    planned = _labels(plan_rounds(points, 3))
    expected = []
    for r, order in enumerate([("qna", "conv_dw", "conv_dense"), ("conv_dw", "conv_dense", "qna"),
                               ("conv_dense", "qna", "conv_dw")]):
        expected += [(r, name, window, "forward") for window in (3, 5) for name in order]
    assert planned == expected


def test_the_plan_nests_problem_window_mode_then_layer():
    layers = [get_layer(name) for name in ("qna", "conv_dw")]
    points = plan_sweep(layers, [3, 5], ["forward", "train"], [Problem(batch=1), Problem(batch=2)])
    assert [(p.problem.batch, p.problem.window, p.problem.mode, p.layer.name) for p in points[:5]] == [
        (1, 3, "forward", "qna"), (1, 3, "forward", "conv_dw"), (1, 3, "train", "qna"), (1, 3, "train", "conv_dw"),
        (1, 5, "forward", "qna"),
    ]
    assert rotated([], 2) == [] and rotated([1, 2, 3], 4) == [2, 3, 1]


def test_a_2x_slowdown_in_one_round_shows_whole_in_the_spread_and_by_its_share_in_the_ratio():
    """The ratio is the geometric mean over rounds: one round of five at 2× moves it by 2^(1/5). Rounds
    whose canary ran slow are measured again before they get here (`measure.slow_canary_share`)."""
    qna = [1.0, 1.0, 1.0, 1.0, 1.0]
    peer = [3.0, 3.0, 6.0, 3.0, 3.0]  # round 3 of the peer ran twice as slow
    center, low, high = ratio_spread(qna, peer)
    assert center == pytest.approx(3.0 * 2 ** (1 / 5)) and (low, high) == (3.0, 6.0)


def test_the_ratio_of_round_geometric_means_is_the_geometric_mean_of_the_block_ratios():
    """Two layers timed in the same passes, a block each per pass: the ratio of their rounds' geometric
    means equals the geometric mean of the ratios of the blocks timed side by side."""
    qna_blocks = [[1.0, 1.3, 0.9], [1.1, 1.0, 1.2]]
    peer_blocks = [[3.1, 2.8, 3.6], [2.9, 3.3, 3.0]]
    qna = add_round(latency_summary(qna_blocks[0], [1.0], [geometric_mean(qna_blocks[0])]), qna_blocks[1])
    peer = add_round(latency_summary(peer_blocks[0], [3.1], [geometric_mean(peer_blocks[0])]), peer_blocks[1])
    block_ratios = [p / q for ps, qs in zip(peer_blocks, qna_blocks) for p, q in zip(ps, qs)]
    center, _, _ = ratio_spread(round_times(qna), round_times(peer))
    assert center == pytest.approx(geometric_mean(block_ratios))
    assert round_times({"round_medians_s": [2.0]}) == [2.0]  # files from before the geometric means
    assert round_times({"round_medians_s": None}) == []


def test_a_slow_round_that_hit_both_sides_of_a_pair_cancels_in_the_ratio():
    assert ratio_spread([1.0, 2.0, 1.0], [3.0, 6.0, 3.0]) == pytest.approx((3.0, 3.0, 3.0))
    with pytest.raises(ValueError, match="at least one round"):
        ratio_spread([], [1.0])


def test_the_headline_median_is_the_median_of_the_round_medians_and_the_quartiles_pool_every_replicate():
    row = latency_summary([1.0, 1.2, 1.1], [1.1], [geometric_mean([1.0, 1.2, 1.1])])
    row = add_round(row, [2.0, 2.2, 2.1])
    row = add_round(row, [1.0, 1.0, 1.0])
    assert row["round_medians_s"] == [1.1, 2.1, 1.0] and row["rounds"] == 3
    assert row["median_s"] == 1.1 and row["n"] == 9 and row["min_s"] == 1.0
    assert row["q75_s"] == 2.0
