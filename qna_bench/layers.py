"""Registry entries for the subject of the benchmark: QnA in its fast and its reference form."""

from __future__ import annotations

from torch import nn

from qna_bench.problem import Problem
from qna_bench.qna import STRIDES, QnA
from qna_bench.registry import register_layer

NUM_QUERIES = 2  # the released models' default


def qna_flops(problem: Problem, num_queries: int = NUM_QUERIES) -> int:
    """2 × multiply-adds of QnA's projections and windowed sums (element-wise work not counted).

    Train mode counts the usual 3× forward (backward = input and weight gradients of every product).
    """
    b, c, heads = problem.batch, problem.channels, problem.heads
    out_h, out_w = problem.output_hw
    pixels, out_pixels = b * problem.height * problem.width, b * out_h * out_w
    macs = (
        c * heads * (c // heads) * num_queries  # folded key·query weights W_k q̂
        + pixels * c * num_queries * heads  # scores x·(W_k q̂)
        + pixels * c * c  # value projection
        + out_pixels * num_queries * (c + heads) * problem.window**2  # numerator and denominator windows
        + out_pixels * c * c  # output projection
    )
    return 2 * macs * (3 if problem.mode == "train" else 1)


def _constraints(problem: Problem) -> list[str]:
    if problem.stride not in STRIDES:
        return [f"problem.stride={problem.stride}: QnA supports stride {' or '.join(map(str, STRIDES))}"]
    return []


def _unsupported(problem: Problem) -> str | None:
    if problem.dilation != 1:
        return "QnA has no dilated form (its windows are dense k×k)"
    return None


def _build(problem: Problem, impl: str) -> nn.Module:
    return QnA(
        problem.channels, problem.channels, problem.heads, problem.window, problem.stride, NUM_QUERIES, impl=impl
    )


def _flags(module: nn.Module, problem: Problem) -> dict:
    return {"impl": module.impl, "num_queries": module.num_queries, "normalize_queries": module.normalize_queries}


_QNA = dict(
    family="qna",
    cost_grows_with_window=True,
    layout="nhwc",
    odd_window=True,
    constraints=_constraints,
    unsupported=_unsupported,
    flags=_flags,
    analytic_flops=qna_flops,
)


@register_layer(
    "qna",
    role="subject",
    implementation="qna_bench.qna.QnA impl=fast: two depthwise convolutions, custom backward",
    description="QnA, fast form (the layer under test), 2 learned queries",
    **_QNA,
)
def build_qna(problem: Problem) -> nn.Module:
    return _build(problem, "fast")


@register_layer(
    "qna_reference",
    role="reference",
    implementation="qna_bench.qna.QnA impl=reference: unfolded k×k windows, autograd",
    description="QnA, naive reference form (unfolded windows), same parameters as qna",
    **_QNA,
)
def build_qna_reference(problem: Problem) -> nn.Module:
    return _build(problem, "reference")
