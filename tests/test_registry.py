"""Every registered layer × both modes on a tiny problem: the right output, or an honest row."""

from __future__ import annotations

import math

import pytest
import torch

from qna_bench.environment import read_environment
from qna_bench.problem import Problem
from qna_bench.registry import get_layer, list_layers, register_layer
from qna_bench.runner import MeasureSettings, SweepPoint, run_point

TINY = Problem(batch=2, height=16, width=24, channels=16, heads=2, window=3)
SETTINGS = MeasureSettings(threads=1, min_run_time_s=0.01, point_budget_s=60.0)
ENV = read_environment("cpu")


def _output_shape(problem: Problem, layout: str) -> tuple[int, ...]:
    out_h, out_w = problem.output_hw
    if layout == "nhwc":
        return (problem.batch, out_h, out_w, problem.channels)
    return (problem.batch, problem.channels, out_h, out_w)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nchw_channels_last"])
def test_inputs_come_in_the_declared_layout_with_the_same_values(layout):
    x = TINY.make_input(layout)
    reference = TINY.make_input("nhwc")
    as_nhwc = x if layout == "nhwc" else x.permute(0, 2, 3, 1)
    assert torch.equal(as_nhwc, reference)
    if layout == "nchw":
        assert x.is_contiguous()
    if layout == "nchw_channels_last":
        assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", list_layers())
def test_forward_gives_the_problem_shape_and_finite_values(name):
    spec = get_layer(name)
    problem = TINY.replace(mode="forward")
    if spec.unsupported_reason(problem) is not None:
        pytest.skip(spec.unsupported_reason(problem))
    module = spec.build(problem)
    with torch.inference_mode():
        out = module(problem.make_input(spec.layout))
    assert tuple(out.shape) == _output_shape(problem, spec.layout)
    assert torch.isfinite(out).all()


# The capability gaps we know of: (layer, mode, device) → why. Every other layer × mode must be `ok`.
EXPECTED_GAPS = {
    ("na", "train", "cpu"): "FlexAttention does not support backward on CPU",
    ("na_flex", "train", "cpu"): "FlexAttention does not support backward on CPU",
    ("nat_tiny", "train", "cpu"): "FlexAttention does not support backward on CPU",
}


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("name", list_layers())
def test_every_layer_and_mode_gives_a_full_row_or_its_declared_gap(name, mode):
    spec = get_layer(name)
    problem = TINY.replace(mode=mode)
    assert not spec.input_errors(problem)
    row = run_point(SweepPoint(spec, problem), SETTINGS, ENV, run_id="test")
    assert row["layer"] == name and row["mode"] == mode and row["window"] == 3
    gap = EXPECTED_GAPS.get((name, mode, problem.device))
    if gap is not None:
        assert row["status"] == "unsupported" and gap in row["reason"], row["reason"]
        assert row["median_s"] is None and row["peak_bytes"] is None
        return
    assert row["status"] == "ok", row["reason"]
    assert row["median_s"] > 0 and row["n"] >= 1 and len(row["times_s"]) == row["n"]
    assert row["params"] > 0
    assert row["base_bytes"] >= problem.input_bytes()
    if row["memory_method"] == "unavailable":
        assert row["peak_bytes"] is None and row["memory_note"]
    else:
        assert row["peak_bytes"] > 0
    assert row["flops"] is None or row["flops"] >= 0
    if row["flops_analytic"] is not None and row["flops"]:
        assert math.isclose(row["flops"], row["flops_analytic"], rel_tol=0.02), (row["flops"], row["flops_analytic"])


def test_only_the_declared_gaps_are_unsupported_on_cpu():
    found = {
        (name, mode, "cpu")
        for name in list_layers(kind=None)
        for mode in ("forward", "train")
        if get_layer(name).unsupported_reason(TINY.replace(mode=mode)) is not None
    }
    assert found == set(EXPECTED_GAPS)


def test_roles_are_declared_and_the_exact_oracles_are_references():
    roles = {name: get_layer(name).role for name in list_layers(kind=None)}
    assert roles["qna"] == "subject"
    assert roles["qna_reference"] == roles["na_torch"] == "reference"
    assert {roles[n] for n in ("swin", "swin_fused", "na", "na_flex", "sasa", "halo", "global_attn")} == {"peer"}
    assert {roles[n] for n in ("conv_dw", "conv_dense", "convnext_mixer")} == {"baseline"}


def test_a_layer_without_a_known_role_is_refused_naming_the_allowed_values():
    with pytest.raises(ValueError, match="role='oracle'; allowed values are subject, peer, baseline, reference"):
        register_layer("never_registered", role="oracle", family="x", implementation="x")(lambda p: None)
    with pytest.raises(TypeError):
        register_layer("never_registered", family="x", implementation="x")(lambda p: None)
