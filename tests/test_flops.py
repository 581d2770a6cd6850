"""FlopCounterMode totals against every layer's closed-form count: close enough to place a point on the roofline."""

from __future__ import annotations

import pytest
import torch

from qna_bench.measure.flops import count_flops
from qna_bench.problem import Problem
from qna_bench.registry import get_layer, list_layers
from qna_bench.runner import MeasureSettings, PointStep


@pytest.mark.parametrize("name", ["conv_dense", "conv_dw"])
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("window,stride", [(3, 1), (5, 2)])
def test_counter_matches_analytic_convolution_flops(tiny_problem, name, mode, window, stride):
    spec = get_layer(name)
    problem = tiny_problem.replace(window=window, stride=stride, mode=mode)
    module = spec.build(problem)
    x = problem.make_input(spec.layout)
    step = PointStep(module, x, problem)
    step()  # the first call, as in a sweep (a train step makes its upstream gradient there)
    assert count_flops(step).flops == spec.analytic_flops(problem)


# A point's place on the roofline moves with its FLOP count: 2% keeps it where it belongs.
FLOP_TOLERANCE = 0.02
COUNTED_PROBLEM = Problem(batch=2, height=16, width=24, channels=16, heads=2, window=5)


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("name", list_layers())
def test_closed_form_flops_agree_with_the_counter_within_two_percent(name, mode):
    spec = get_layer(name)
    problem = COUNTED_PROBLEM.replace(mode=mode)
    if spec.unsupported_reason(problem) is not None:
        pytest.skip(spec.unsupported_reason(problem))
    step = PointStep(spec.build(problem), problem.make_input(spec.layout), problem)
    if spec.prepare is not None:  # as a sweep does: QnA chooses its plan, which the closed form counts
        spec.prepare(step.module, step.x, problem, MeasureSettings(threads=torch.get_num_threads()))
    step()
    counted = count_flops(step, spec.flop_formulas).flops
    if counted is None:
        pytest.skip(f"{name}: FlopCounterMode cannot see inside this layer")
    assert spec.closed_form_flops(problem, step.module) == pytest.approx(counted, rel=FLOP_TOLERANCE)


def test_a_layer_formula_counts_an_op_the_counter_does_not_know():
    def flops_of_add(*args, **kwargs) -> int:
        return 7

    result = count_flops(lambda: torch.ones(3) + torch.ones(3), {torch.ops.aten.add: flops_of_add})
    assert result.flops == 7
    assert result.method == "flop_counter+layer_formulas"


def test_a_layer_that_dynamo_cannot_trace_under_the_counter_gets_no_flops_and_a_note() -> None:
    from torch._dynamo.exc import Unsupported

    def untraceable() -> None:
        raise Unsupported("Attempted to call function marked as skipped")

    result = count_flops(untraceable)
    assert result.flops is None and result.method == "unavailable"
    assert "Unsupported: Attempted to call function marked as skipped" in result.note
