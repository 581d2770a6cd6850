"""The fast form's entry points: an autograd function over `qna_bench.qna.core`'s forward and backward
(run eagerly, so FlopCounterMode and the profiler see every op in it), the same pair as custom ops for
torch.compile, `run_plan` and `qna_attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from qna_bench.qna.core import _fast_core, _fast_core_backward, shares_kept, work_dtype
from qna_bench.qna.plans import Plan, default_plan, get_plan, plan_from_spec
from qna_bench.qna.shapes import check_core_args, qna_output_size
from qna_bench.qna.tuning import PlanChoice


def _save_for_backward(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    packed, rpe_bias, mixing, stride, plan = inputs
    z, exp_scores, den, underflow, fell_back, shares = output
    if plan_from_spec(plan).numerator_grads != "fused":
        z = shares  # only the fused backward reads z: an empty stand-in keeps nothing alive
    ctx.save_for_backward(packed, rpe_bias, mixing, exp_scores, den, underflow, fell_back, z, shares)
    ctx.stride, ctx.plan = stride, plan


def _grads(ctx: Any, grad_z: Tensor | None, backward: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor | None, ...]:
    if grad_z is None:  # z took no part in the loss (only the other outputs, which have no gradient)
        return (None,) * 5
    kernel_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    g_packed, g_rpe, g_mixing = backward(grad_z, *ctx.saved_tensors, ctx.stride, ctx.plan, kernel_grads)
    return (g_packed, g_rpe, g_mixing, None, None) if kernel_grads else (g_packed, None, None, None, None)


class _FastCore(torch.autograd.Function):
    """The fast form with its hand-written backward, run eagerly (FlopCounterMode and the profiler see
    every op in it). Saves only exp(s - m) (B, H, W, Nq*h), the packed input (for the values) and the
    denominators (B, H', W', Nq*h)."""

    @staticmethod
    def forward(ctx: Any, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int, plan: str) -> tuple[Tensor, ...]:
        output = _fast_core(packed, rpe_bias, mixing, stride, plan)
        _save_for_backward(ctx, (packed, rpe_bias, mixing, stride, plan), output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the outputs kept for the backward only
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        return _grads(ctx, grad_z, _fast_core_backward)


def _laid_out(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Outputs as the fake kernels lay them out: a compiled graph reads them by those strides."""
    return tuple(t.contiguous() for t in outputs)


# The same two functions as custom ops, for torch.compile: opaque to its trace, which then holds no
# data-dependent branch (the FFT guard, the underflowed windows) and no graph break.
_fast_core_op = torch.library.custom_op(
    "qna_bench::fast_core", lambda *args: _laid_out(_fast_core(*args)), mutates_args=(),
    schema="(Tensor packed, Tensor rpe_bias, Tensor mixing, int stride, str plan) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_fast_core_backward_op = torch.library.custom_op(
    "qna_bench::fast_core_backward", lambda *args: _laid_out(_fast_core_backward(*args)), mutates_args=(),
    schema="(Tensor grad_z, Tensor packed, Tensor rpe_bias, Tensor mixing, Tensor exp_scores, Tensor den, "
    "Tensor underflow, Tensor fell_back, Tensor z, Tensor shares, int stride, str plan, bool kernel_grads) "
    "-> (Tensor, Tensor, Tensor)",
)


@_fast_core_op.register_fake
def _fast_core_fake(
    packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int, plan: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_queries, heads, window, _ = rpe_bias.shape
    batch, height, width, channels = packed.shape
    out_h, out_w = qna_output_size(height, window, stride), qna_output_size(width, window, stride)
    work, features = work_dtype(packed.dtype), channels - num_queries * heads
    shares = shares_kept(plan_from_spec(plan), num_queries, packed.dtype)
    return (
        packed.new_empty(batch, out_h, out_w, features),
        packed.new_empty(batch, height, width, num_queries, heads, dtype=work),
        packed.new_empty(batch, out_h, out_w, num_queries, heads, dtype=work),
        packed.new_empty(batch, out_h, out_w, dtype=torch.bool),
        packed.new_empty((), dtype=torch.bool),
        packed.new_empty(batch, out_h, out_w, shares, features, dtype=work),
    )


@_fast_core_backward_op.register_fake
def _fast_core_backward_fake(
    grad_z: Tensor, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, exp_scores: Tensor, den: Tensor,
    underflow: Tensor, fell_back: Tensor, z: Tensor, shares: Tensor, stride: int, plan: str, kernel_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if not kernel_grads:
        return torch.empty_like(packed), rpe_bias.new_empty(0), mixing.new_empty(0)
    return torch.empty_like(packed), torch.empty_like(rpe_bias), torch.empty_like(mixing)


_fast_core_op.register_autograd(
    lambda ctx, grad_z, *_: _grads(ctx, grad_z, _fast_core_backward_op), setup_context=_save_for_backward
)


def wants_grad(*tensors: Tensor) -> bool:
    """Whether a call on these tensors records a backward (train mode, as the plans see it)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def run_plan(packed: Tensor, rpe_bias: Tensor, query_mixing: Tensor, stride: int, choice: PlanChoice) -> tuple[Tensor, Tensor | bool]:
    """The fast form of a chosen, resolved plan on packed values and scores; z (B, H', W', F) and
    whether the plan's FFT passes fell back (a 0-dim bool tensor, or False where the plan has none).
    Nothing here depends on the data in Python: torch.compile traces it whole."""
    if choice.plan.kernel == "triton":
        from qna_bench.qna.triton_core import triton_qna_attention

        features = packed.shape[-1] - rpe_bias.shape[0] * rpe_bias.shape[1]
        z = triton_qna_attention(packed[..., features:], packed[..., :features], rpe_bias, query_mixing, stride)
        return z.to(packed.dtype), False  # exact everywhere: each window's own running max
    core = _fast_core_op if torch.compiler.is_compiling() else _FastCore.apply
    z, _, _, _, fell_back, _ = core(packed, rpe_bias, query_mixing, stride, choice.spec)
    return z, fell_back


def qna_attention_packed(
    packed: Tensor, rpe_bias: Tensor, query_mixing: Tensor, stride: int, plan: Plan
) -> tuple[Tensor, bool]:
    """`qna_attention` on values and scores packed as (B, H, W, F + Nq*h), values first, with ``plan``;
    also returns whether the plan's FFT passes fell back to direct ones on these data (`fft_resolves`)."""
    train = wants_grad(packed, rpe_bias, query_mixing)
    z, fell_back = run_plan(packed, rpe_bias, query_mixing, stride, PlanChoice(plan.resolved(stride, train), train, "forced"))
    return z, bool(fell_back)


def qna_attention(
    scores: Tensor,
    values: Tensor,
    rpe_bias: Tensor,
    query_mixing: Tensor,
    stride: int = 1,
    plan: str | None = None,
) -> Tensor:
    """The fast form of QnA's windowed softmax, without the projections.

    ``scores`` (B, H, W, Nq*h) are the logits ``x . (W_k q_n)`` (channel ``n*h + head``), ``values``
    (B, H, W, F) head-major, ``rpe_bias`` and ``query_mixing`` (Nq, h, k, k). Returns
    ``z`` (B, H', W', F) ``= sum_n sum_j w_n(j) softmax_j(s_n(j) + b_n(j)) v_j`` over each zero-padded
    k x k window (padding outside the softmax), ``H' = qna_output_size(H, k, stride)``.

    ``plan`` names the form of each pass (`available_plans`); None: `default_plan` (the module `QnA`
    tunes its plan instead). Exact for any logits and any plan: one max per image keeps exp finite, and
    the windows whose logits all lie so far below it that their denominator underflows
    (`UNDERFLOW_DENOMINATOR`) are recomputed with their own max (`recompute_windows`). Half types run
    the core in fp32 and return their own dtype.
    """
    check_core_args(scores, values, rpe_bias, query_mixing, stride)
    train = wants_grad(scores, values, rpe_bias, query_mixing)
    window = rpe_bias.shape[-1]
    chosen = default_plan(values.device, window, stride, train) if plan is None else get_plan(plan, values.device)
    packed = torch.cat([values, scores], dim=-1)
    return qna_attention_packed(packed, rpe_bias, query_mixing, stride, chosen)[0]
