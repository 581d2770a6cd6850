"""QnA's windowed softmax as Triton kernels: `triton_qna_attention`, with `qna_attention`'s contract.

On CUDA the kernels compile; on CPU tensors they run in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before this module (or anything decorating Triton kernels) is
imported. The maths and numerics are in `triton_qna_kernels`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from qna_bench.qna.shapes import check_core_args, qna_output_size

try:
    import triton
    import triton.language as tl

    from qna_bench.qna import triton_kernels as kernels
except ImportError:  # a torch build without Triton: `triton_available` says False
    triton = tl = kernels = None


def triton_available(device: torch.device | str) -> bool:
    """Whether `triton_qna_attention` runs on ``device``.

    CUDA: Triton importable and a GPU present. CPU: only in Triton's interpreter, i.e. with
    ``TRITON_INTERPRET=1`` set now (read here) and already when this module was imported.
    """
    if kernels is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1" and kernels.INTERPRETED
    return False


def _check_args(scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> None:
    check_core_args(scores, values, rpe_bias, mixing, stride)
    if not triton_available(values.device):
        raise RuntimeError(
            f"device={values.device}: the Triton QnA kernels need CUDA with Triton, or CPU tensors with "
            "TRITON_INTERPRET=1 set before Triton kernels are imported"
        )


def _launch_args(scores: Tensor, values: Tensor, rpe_bias: Tensor, stride: int) -> dict[str, Any]:
    """The problem's sizes as the kernels take them."""
    batch, height, width, features = values.shape
    num_queries, heads, window, _ = rpe_bias.shape
    wide = torch.float64 in (scores.dtype, values.dtype, rpe_bias.dtype)
    return dict(
        H=height, W=width, OH=qna_output_size(height, window, stride), OW=qna_output_size(width, window, stride),
        HEADS=heads, D=features // heads, NQ=num_queries, K=window, STRIDE=stride,
        NQ_P=triton.next_power_of_2(num_queries), ACC=tl.float64 if wide else tl.float32,
    )


def _forward(scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """z (B, H', W', F) in the inputs' dtype; the windows' max and 1/den (2, B, H', W', Nq*h) in fp32/fp64."""
    a = _launch_args(scores, values, rpe_bias, stride)
    batch = values.shape[0]
    out_dtype = torch.promote_types(scores.dtype, values.dtype)
    acc_dtype = torch.float64 if a["ACC"] == tl.float64 else torch.float32
    z = values.new_empty(batch, a["OH"], a["OW"], values.shape[-1], dtype=out_dtype)
    stats = values.new_empty(2, batch, a["OH"], a["OW"], scores.shape[-1], dtype=acc_dtype)
    block_d = min(triton.next_power_of_2(a["D"]), 64)

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return triton.cdiv(a["OH"] * a["OW"], meta["BLOCK_P"]), batch * a["HEADS"], triton.cdiv(a["D"], block_d)

    kernels.qna_forward_kernel[grid](scores, values, rpe_bias, mixing, z, *stats, **a, BLOCK_D=block_d)
    return z, stats


def _backward(
    grad_z: Tensor, scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stats: Tensor, stride: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of scores, values, rpe_bias and query_mixing, each in its input's dtype."""
    a = _launch_args(scores, values, rpe_bias, stride)
    batch, height, width, _ = values.shape
    head_d = triton.next_power_of_2(a["D"])
    delta = torch.empty_like(stats[0])

    def out_grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(a["OH"] * a["OW"], meta["BLOCK_P"]), batch * a["HEADS"]

    kernels.qna_backward_delta_kernel[out_grid](
        scores, values, rpe_bias, mixing, grad_z, *stats, delta, **a, HEAD_D=head_d
    )

    # Pixels split by parity class (y, x mod stride); class (0, 0) is the largest.
    class_pixels = triton.cdiv(height, stride) * triton.cdiv(width, stride)

    def in_grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return triton.cdiv(class_pixels, meta["BLOCK_P"]), batch * a["HEADS"], stride * stride

    grad_scores = torch.empty_like(scores)
    grad_values = torch.empty_like(values)
    tiles = stride * stride * triton.cdiv(class_pixels, kernels.MIN_BLOCK_P)
    partials = stats.new_zeros(tiles, batch, 2, *rpe_bias.shape)
    kernels.qna_backward_kernel[in_grid](
        scores, values, rpe_bias, mixing, grad_z, *stats, delta, grad_scores, grad_values, partials,
        **a, HEAD_D=head_d,
    )
    grad_bias, grad_mixing = partials.sum((0, 1))
    return grad_scores, grad_values, grad_bias.to(rpe_bias.dtype), grad_mixing.to(mixing.dtype)


class _TritonQnA(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> Tensor:
        z, stats = _forward(scores, values, rpe_bias, mixing, stride)
        ctx.save_for_backward(scores, values, rpe_bias, mixing, stats)
        ctx.stride = stride
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor) -> tuple[Tensor | None, ...]:
        scores, values, rpe_bias, mixing, stats = ctx.saved_tensors
        grads = _backward(grad_z.contiguous(), scores, values, rpe_bias, mixing, stats, ctx.stride)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def triton_qna_attention(
    scores: Tensor, values: Tensor, rpe_bias: Tensor, query_mixing: Tensor, stride: int = 1
) -> Tensor:
    """QnA's windowed softmax by the Triton kernels; the contract of `qna_bench.qna.qna_attention`.

    ``scores`` (B, H, W, Nq*h) with channel ``n*h + head``, ``values`` (B, H, W, F) head-major,
    ``rpe_bias`` and ``query_mixing`` (Nq, h, k, k), k odd; returns ``z`` (B, H', W', F)
    ``= sum_n sum_j w_n(j) softmax_j(s_n(j) + b_n(j)) v_j`` over each zero-padded k x k window, padding
    outside the softmax, stride 1 or 2. Exact for any spread of the logits (a max and denominator per window);
    half types accumulate in fp32. Differentiable in all four tensors.
    """
    _check_args(scores, values, rpe_bias, query_mixing, stride)
    tensors = [t.contiguous() for t in (scores, values, rpe_bias, query_mixing)]
    return _TritonQnA.apply(*tensors, stride)
