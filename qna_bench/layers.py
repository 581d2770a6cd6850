"""Registry entries for the subject of the benchmark: QnA in its fast and its reference form."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qna_bench.measure.traffic import traffic_bytes
from qna_bench.problem import Problem
from qna_bench.qna import STRIDES, Plan, QnA, convolution_window, default_plan, fft_lengths
from qna_bench.registry import register_layer

NUM_QUERIES = 2  # the released models' default


def real_fft_flops(maps: int, points: int) -> int:
    """FLOPs of ``maps`` real FFTs (forward or inverse) of ``points`` points each: the usual
    2.5 N log2 N, half of a complex FFT's 5 N log2 N."""
    return round(maps * 2.5 * points * math.log2(points)) if points > 1 else 0


def _fft_r2c_flops(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    points = math.prod(x_shape[d] for d in dim)
    return real_fft_flops(math.prod(x_shape) // points, points)


def _fft_c2r_flops(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    points = math.prod(out_shape[d] for d in dim)
    return real_fft_flops(math.prod(out_shape) // points, points)


def _fused_window_flops(den_kernel_shape, z_shape) -> int:
    """2 x the multiply-adds of one sweep of the fused loops over every window: numerators and
    denominators, all k^2 taps counted (as the convolution counter counts a zero-padded convolution)."""
    batch, out_h, out_w, features = z_shape
    queries, heads, window, _ = den_kernel_shape
    return 2 * batch * out_h * out_w * queries * (features + heads) * window**2


def _fused_forward_flops(exp_shape, packed_shape, den_kernel_shape, *args, out_shape=None, **kwargs) -> int:
    return _fused_window_flops(den_kernel_shape, out_shape[0])


def _fused_backward_flops(grad_z_shape, exp_shape, packed_shape, den_shape, z_shape, shares_shape, den_kernel_shape,
                          num_kernel_shape, stride, kernel_grads, *args, **kwargs) -> int:
    """Two sweeps' worth: the input gradients of the numerators and denominators and (with
    ``kernel_grads``) the kernels' gradients (the numerators are not recomputed: the forward kept them)."""
    return (2 if kernel_grads else 1) * _fused_window_flops(den_kernel_shape, grad_z_shape)


# FlopCounterMode has no rule for the FFTs of QnA's kernel gradient (it would count them as zero), nor
# for the fused CPU loops, a foreign call it cannot see into.
QNA_FLOP_FORMULAS = {
    torch.ops.aten._fft_r2c: _fft_r2c_flops,
    torch.ops.aten._fft_c2r: _fft_c2r_flops,
    torch.ops.qna_bench.fused_cpu_forward: _fused_forward_flops,
    torch.ops.qna_bench.fused_cpu_backward: _fused_backward_flops,
}


def _resolved(problem: Problem, plan: Plan | None) -> Plan:
    """``plan`` (or the machine-independent `default_plan`) as a call of this problem runs it."""
    train = problem.mode == "train"
    if plan is None:
        return default_plan(problem.device, problem.window, problem.stride, train)
    return plan.resolved(problem.stride, train)


def qna_flops(problem: Problem, num_queries: int = NUM_QUERIES, plan: Plan | None = None) -> int:
    """2 × multiply-adds of QnA's projections and direct windowed sums, plus the real FFTs of the passes
    ``plan`` runs as FFTs (None: `default_plan`); element-wise work (the spectra's products included)
    is not counted.

    Counts what the fast form runs with that plan, as `FlopCounterMode` with `QNA_FLOP_FORMULAS` counts
    it, on data that the FFT resolves (`FFT_RESOLVED_RATIO`; random inputs do): direct convolutions at
    `convolution_window` (the zero taps of a padded kernel included). The fused loops count as direct
    windowed sums; their backward as two sweeps (`_fused_backward_flops`). Numerators on the FFT path: per
    query, forward a real FFT and an inverse of each of the B·F products E·V plus one FFT of each head's
    kernel; backward four per product (E·V, the output gradient, and two inverses) plus each head's
    kernel spectrum again and the inverse of its batch-summed kernel-gradient spectrum. Direct path in
    train mode: every product's input and kernel gradients, plus the numerators recomputed. Kernel
    gradients on the FFT path (``plan.kernel_grads``): per query, real FFTs of the B·(F+h) products and
    output gradients and the inverses of the F+h batch-summed spectra.
    """
    plan = _resolved(problem, plan)
    b, c, heads, k = problem.batch, problem.channels, problem.heads, problem.window
    conv_k = convolution_window(k, problem.stride, plan.convolutions)  # the kernel gradients stay at k
    out_h, out_w = problem.output_hw
    pixels, out_pixels = b * problem.height * problem.width, b * out_h * out_w
    linear = (
        c * heads * (c // heads) * num_queries  # folded key·query weights W_k q̂
        + pixels * c * num_queries * heads  # scores x·(W_k q̂)
        + pixels * c * c  # value projection
        + out_pixels * c * c  # output projection
    )
    numerators, denominators = (out_pixels * num_queries * ch * conv_k**2 for ch in (c, heads))
    points = math.prod(fft_lengths(problem.height, problem.width, k))
    fft_numerators = plan.numerators == "fft"
    flops = 2 * (linear + denominators)
    flops += real_fft_flops(num_queries * (2 * b * c + heads), points) if fft_numerators else 2 * numerators
    if problem.mode != "train":
        return flops
    if plan.numerator_grads == "fused":  # input and kernel gradients, denominators included
        return flops + 2 * (2 * linear + 2 * (numerators + denominators))
    # input and weight gradients of the linears; the denominators' input gradient
    flops += 2 * (2 * linear + denominators)
    fft_weight_grad = plan.kernel_grads == "fft"
    if plan.numerator_grads == "fft":
        flops += real_fft_flops(num_queries * (4 * b * c + 2 * heads), points)
        kernel_grad_channels = heads  # the numerators' kernel gradients came with their spectra
    else:
        flops += 2 * 2 * numerators  # recomputed, input gradient
        kernel_grad_channels = c + heads
    if fft_weight_grad:
        return flops + real_fft_flops(num_queries * kernel_grad_channels * (2 * b + 1), points)
    return flops + 2 * out_pixels * num_queries * kernel_grad_channels * k**2


def qna_reference_flops(problem: Problem, num_queries: int = NUM_QUERIES) -> int:
    """2 × multiply-adds of the reference form: the same projections as the fast form, and one product
    of the mixed attention weights with the unfolded values per output pixel, channel and tap (the
    softmax and the query mixing are element-wise, not counted). Train mode: 3× (input and weight
    gradients of every product)."""
    b, c, heads = problem.batch, problem.channels, problem.heads
    out_h, out_w = problem.output_hw
    pixels, out_pixels = b * problem.height * problem.width, b * out_h * out_w
    macs = (
        c * heads * (c // heads) * num_queries
        + pixels * c * num_queries * heads
        + pixels * c * c
        + out_pixels * c * c
        + out_pixels * c * problem.window**2
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


def _prepare(module: nn.Module, x: torch.Tensor, problem: Problem, settings: Any) -> None:
    """The fast form chooses its plan under ``tune`` (``settings.tune``) before the first call."""
    module.tune = settings.tune
    if module.impl == "fast":
        module.choose_plan(x, train=problem.mode == "train")


def _flags(module: nn.Module, problem: Problem) -> dict:
    """The form and its queries; for the fast form its plan (`QnA.plan_flags`): ``plan``, ``plan_name``,
    ``plan_source``, ``tune_seconds``, ``plan_fell_back``."""
    return {
        "impl": module.impl,
        "num_queries": module.num_queries,
        "normalize_queries": module.normalize_queries,
        **({"tune": module.tune, **module.plan_flags()} if module.impl == "fast" else {}),
    }


def _cost_args(module: nn.Module) -> dict[str, Any]:
    """The closed forms count the plan the fast form chose."""
    choice = getattr(module, "plan_choice", None)
    return {"plan": choice.plan} if module.impl == "fast" and choice is not None else {}


def _qna_reads(problem: Problem, num_queries: int) -> dict[str, int]:
    """The input read and the parameters: key weights, queries, value and output projections (no
    biases), relative-position biases and query mixing weights."""
    c, heads = problem.channels, problem.heads
    return dict(
        inputs=problem.batch * problem.height * problem.width * c,
        params=c * c + num_queries * c + 2 * c * c + 2 * num_queries * heads * problem.window**2,
    )


def qna_bytes(problem: Problem, num_queries: int = NUM_QUERIES, plan: Plan | None = None) -> int:
    """Bytes the fast form moves: values and scores packed (B, H, W, C + Nq·h), exp(scores), the
    denominator (B, H', W', Nq·h), per query the weighted values (B, H, W, C) and the numerator
    (B, H', W', C), and z (B, H', W', C) written and read back; the output written.

    The same for every CPU ``plan``: an FFT pass keeps its spectra in chunks sized for the cache
    (``Plan.fft_chunk_bytes``) and moves the same tensors as the direct one."""
    c, heads = problem.channels, problem.heads
    out_h, out_w = problem.output_hw
    pixels, out_pixels = problem.batch * problem.height * problem.width, problem.batch * out_h * out_w
    return traffic_bytes(
        problem,
        **_qna_reads(problem, num_queries),
        outputs=out_pixels * c,
        intermediates=(
            pixels * (c + num_queries * heads),
            pixels * num_queries * heads,
            out_pixels * num_queries * heads,
            num_queries * (pixels + out_pixels) * c,
            out_pixels * c,
        ),
    )


def qna_reference_bytes(problem: Problem, num_queries: int = NUM_QUERIES) -> int:
    """Bytes the reference form moves: scores (B, H, W, Nq·h) and values (B, H, W, C); the unfolded
    scores, logits and probabilities (B, Nq·h, k², L) each; the mixed weights (B, h, k², L); the
    unfolded values (B, C, k², L); z; the output written."""
    c, heads = problem.channels, problem.heads
    out_h, out_w = problem.output_hw
    pixels, out_pixels = problem.batch * problem.height * problem.width, problem.batch * out_h * out_w
    taps = problem.window**2
    return traffic_bytes(
        problem,
        **_qna_reads(problem, num_queries),
        outputs=out_pixels * c,
        intermediates=(
            pixels * num_queries * heads,
            pixels * c,
            3 * out_pixels * num_queries * heads * taps,
            out_pixels * heads * taps,
            out_pixels * c * taps,
            out_pixels * c,
        ),
    )


_QNA = dict(
    family="qna",
    cost_grows_with_window=True,
    layout="nhwc",
    odd_window=True,
    constraints=_constraints,
    unsupported=_unsupported,
    flags=_flags,
    flop_formulas=QNA_FLOP_FORMULAS,
    cost_args=_cost_args,
)


@register_layer(
    "qna",
    role="subject",
    implementation="qna_bench.qna.QnA impl=fast: two depthwise convolutions, custom backward",
    description="QnA, fast form (the layer under test), 2 learned queries",
    analytic_flops=qna_flops,
    analytic_bytes=qna_bytes,
    prepare=_prepare,
    forms=("plan", "gemm"),
    **_QNA,
)
def build_qna(problem: Problem) -> nn.Module:
    return _build(problem, "fast")


@register_layer(
    "qna_reference",
    role="reference",
    implementation="qna_bench.qna.QnA impl=reference: unfolded k×k windows, autograd",
    description="QnA, naive reference form (unfolded windows), same parameters as qna",
    analytic_flops=qna_reference_flops,
    analytic_bytes=qna_reference_bytes,
    prepare=_prepare,
    **_QNA,
)
def build_qna_reference(problem: Problem) -> nn.Module:
    return _build(problem, "reference")
