"""QnA's windowed softmax as Triton kernels: `triton_qna_attention`, with `qna_attention`'s contract.

On CUDA the kernels compile; on CPU tensors they run in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before this module (or anything decorating Triton kernels) is
imported. The maths and numerics are in `triton_qna_kernels`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
    wide = _accumulator(scores, values, rpe_bias) == torch.float64
    return dict(
        B=batch, H=height, W=width, OH=qna_output_size(height, window, stride),
        OW=qna_output_size(width, window, stride), HEADS=heads, D=features // heads, NQ=num_queries, K=window,
        STRIDE=stride, NQ_P=triton.next_power_of_2(num_queries), ACC=tl.float64 if wide else tl.float32,
    )


def _accumulator(scores: Tensor, values: Tensor, rpe_bias: Tensor) -> torch.dtype:
    """The dtype of the saved statistics: fp64 if any input is, else fp32."""
    return torch.float64 if torch.float64 in (scores.dtype, values.dtype, rpe_bias.dtype) else torch.float32


def grid(batch: int, pixels: int, heads: int, second: int = 1) -> Callable[[dict[str, Any]], tuple[int, int]]:
    """A launch grid: axis 0 the heads times the tiles of the batch's ``pixels`` per image, flattened
    (CUDA allows 2^31 - 1 there), axis 1 ``second`` (the blocks of d, or the stride^2 parity classes):
    no axis that CUDA caps at 65 535 grows with the batch or the heads."""
    return lambda meta: (heads * kernels.tiles(batch, pixels, meta["BLOCK_P"]), second)


def _forward(scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """z (B, H', W', F) in the inputs' dtype; the windows' max and 1/den (2, B, H', W', Nq*h) in fp32/fp64."""
    a = _launch_args(scores, values, rpe_bias, stride)
    batch = values.shape[0]
    out_dtype = torch.promote_types(scores.dtype, values.dtype)
    z = values.new_empty(batch, a["OH"], a["OW"], values.shape[-1], dtype=out_dtype)
    stats = values.new_empty(2, batch, a["OH"], a["OW"], scores.shape[-1], dtype=_accumulator(scores, values, rpe_bias))
    block_d = min(triton.next_power_of_2(a["D"]), 64)
    launch = grid(batch, a["OH"] * a["OW"], a["HEADS"], triton.cdiv(a["D"], block_d))
    kernels.qna_forward_kernel[launch](scores, values, rpe_bias, mixing, z, *stats, **a, BLOCK_D=block_d)
    return z, stats


def _backward(
    grad_z: Tensor, scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stats: Tensor, stride: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of scores, values, rpe_bias and query_mixing, each in its input's dtype."""
    a = _launch_args(scores, values, rpe_bias, stride)
    batch, height, width, _ = values.shape
    head_d = triton.next_power_of_2(a["D"])
    delta = torch.empty_like(stats[0])
    kernels.qna_backward_delta_kernel[grid(batch, a["OH"] * a["OW"], a["HEADS"])](
        scores, values, rpe_bias, mixing, grad_z, *stats, delta, **a, HEAD_D=head_d
    )
    grad_scores = torch.empty_like(scores)
    grad_values = torch.empty_like(values)
    # Sized (and zeroed) for the tile that runs by the kernel's config pre-hook, `kernels._size_partials`.
    partials = stats.new_empty(0, 2, *rpe_bias.shape)
    # Pixels split by parity class (y, x mod stride); class (0, 0) is the largest.
    class_pixels = triton.cdiv(height, stride) * triton.cdiv(width, stride)
    kernels.qna_backward_kernel[grid(batch, class_pixels, a["HEADS"], stride * stride)](
        scores, values, rpe_bias, mixing, grad_z, *stats, delta, grad_scores, grad_values, partials,
        **a, HEAD_D=head_d,
    )
    grad_bias, grad_mixing = partials[:, 0].sum(0), partials[:, 1].sum(0)  # apart: a custom op's outputs may not alias
    return grad_scores, grad_values, grad_bias.to(rpe_bias.dtype), grad_mixing.to(mixing.dtype)


def _save_for_backward(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    *tensors, stride = inputs
    ctx.save_for_backward(*tensors, output[1])
    ctx.stride = stride
    ctx.mark_non_differentiable(output[1])


def _grads(ctx: Any, grad_z: Tensor | None, backward: Callable[..., tuple[Tensor, ...]]) -> tuple[Tensor | None, ...]:
    if grad_z is None:  # z took no part in the loss
        return (None,) * 5
    grads = backward(grad_z.contiguous(), *ctx.saved_tensors, ctx.stride)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


class _TritonQnA(torch.autograd.Function):
    """The kernels with their backward, run eagerly; `triton_forward` and `triton_backward` are the same
    pair as custom ops for torch.compile."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        output = _forward(scores, values, rpe_bias, mixing, stride)
        _save_for_backward(ctx, (scores, values, rpe_bias, mixing, stride), output)
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        return _grads(ctx, grad_z, _backward)


# Opaque to torch.compile's trace (as the CPU core's `qna_bench::fast_core`): no graph break at the
# kernels' launches, their autotuner or their pre-hook, which resizes a buffer in place.
triton_forward = torch.library.custom_op(
    "qna_bench::triton_forward", _forward, mutates_args=(),
    schema="(Tensor scores, Tensor values, Tensor rpe_bias, Tensor mixing, int stride) -> (Tensor, Tensor)",
)
triton_backward = torch.library.custom_op(
    "qna_bench::triton_backward", _backward, mutates_args=(),
    schema="(Tensor grad_z, Tensor scores, Tensor values, Tensor rpe_bias, Tensor mixing, Tensor stats, "
    "int stride) -> (Tensor, Tensor, Tensor, Tensor)",
)


@triton_forward.register_fake
def _forward_fake(scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    batch, height, width, features = values.shape
    window = rpe_bias.shape[-1]
    out_h, out_w = qna_output_size(height, window, stride), qna_output_size(width, window, stride)
    return (
        values.new_empty(batch, out_h, out_w, features, dtype=torch.promote_types(scores.dtype, values.dtype)),
        values.new_empty(2, batch, out_h, out_w, scores.shape[-1], dtype=_accumulator(scores, values, rpe_bias)),
    )


@triton_backward.register_fake
def _backward_fake(
    grad_z: Tensor, scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stats: Tensor, stride: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t) for t in (scores, values, rpe_bias, mixing))


triton_forward.register_autograd(
    lambda ctx, grad_z, _: _grads(ctx, grad_z, triton_backward), setup_context=_save_for_backward
)


def triton_qna_attention(
    scores: Tensor, values: Tensor, rpe_bias: Tensor, query_mixing: Tensor, stride: int = 1
) -> Tensor:
    """QnA's windowed softmax by the Triton kernels; the contract of `qna_bench.qna.qna_attention`.

    ``scores`` (B, H, W, Nq*h) with channel ``n*h + head``, ``values`` (B, H, W, F) head-major,
    ``rpe_bias`` and ``query_mixing`` (Nq, h, k, k), k odd; returns ``z`` (B, H', W', F)
    ``= sum_n sum_j w_n(j) softmax_j(s_n(j) + b_n(j)) v_j`` over each zero-padded k x k window, padding
    outside the softmax, stride 1 or 2. Exact for any spread of the logits (a max and denominator per window);
    half types accumulate in fp32. Differentiable in all four tensors; under torch.compile the custom ops
    `triton_forward` and `triton_backward`.
    """
    _check_args(scores, values, rpe_bias, query_mixing, stride)
    tensors = [t.contiguous() for t in (scores, values, rpe_bias, query_mixing)]
    core = triton_forward if torch.compiler.is_compiling() else _TritonQnA.apply
    return core(*tensors, stride)[0]
