"""The fast form of QnA's windowed softmax: scores (B, H, W, Nq*h) and values (B, H, W, F) -> z
(B, H', W', F) as two depthwise convolutions per query (or the fused CPU loops), with a hand-written
backward. A `Plan` names the form of each pass; the FFT passes run only where the data let an FFT
resolve them. Its entry points (autograd function, custom ops, `qna_attention`): `qna_bench.qna.attention`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qna_bench.qna.direct import (
    batch_chunks,
    depthwise_conv,
    depthwise_conv_input_grad,
    depthwise_weight_grad_direct,
)
from qna_bench.qna.fft import (
    LazyGrad,
    depthwise_weight_grad_fft,
    fft_numerator_grads,
    fft_numerators,
    fft_resolves,
)
from qna_bench.qna.fused_cpu import fused_backward, fused_forward
from qna_bench.qna.plans import Plan, plan_from_spec
from qna_bench.qna.underflow import (
    UNDERFLOW_DENOMINATOR,
    recompute_windows,
    recompute_windows_grads,
    underflowed,
)


def _kernels(rpe_bias: Tensor, dtype: torch.dtype) -> Tensor:
    """``exp(b)`` per query and head, shifted by its max: a per-(query, head) factor that cancels
    between numerator and denominator and keeps the exponent finite."""
    return torch.exp(rpe_bias - rpe_bias.detach().amax(dim=(-2, -1), keepdim=True)).to(dtype)


def _value_kernel(rpe_exp: Tensor, mixing: Tensor, head_dim: int) -> Tensor:
    """The numerator's kernel for one query: ``exp(b) * w`` (h, k, k) repeated over each head's d channels."""
    heads, window = rpe_exp.shape[0], rpe_exp.shape[-1]
    kernel = (rpe_exp * mixing.to(rpe_exp.dtype)).unsqueeze(1)
    return kernel.expand(heads, head_dim, window, window).reshape(heads * head_dim, 1, window, window)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the windowed softmax's core: fp32 for half types (see `_qna_forward`), else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _exp_scores(scores: Tensor) -> Tensor:
    """``exp(s - m)`` in the work dtype, with ``m`` the max over each image, per query and head: a
    constant within every window, so exact, and it keeps the largest term at 1 (no overflow)."""
    scores = scores.to(work_dtype(scores.dtype))
    return torch.exp(scores - scores.detach().amax(dim=(1, 2), keepdim=True))


def _qna_forward(
    exp_scores: Tensor, values: Tensor, rpe_exp: Tensor, mixing: Tensor, stride: int, padding: int, plan: Plan
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The fast form on exponentiated scores (B, H, W, Nq, h) in the work dtype; returns z (B, H', W', F)
    and den (B, H', W', Nq, h) in the work dtype, the underflowed pixels (`underflowed`), and whether
    the plan's FFT passes may run on these data (`fft_resolves`, checked only where the plan has one):
    the numerators then run as FFT convolutions where the plan says so, and the backward follows.

    One query at a time, so the largest intermediate is (B, H, W, F). For half types the whole core
    (E, E*V, both convolutions, the division) runs in fp32: E and the denominator then resolve windows
    down to ~87 below the image's max instead of ~17 (fp16), and the numerator E*V cannot underflow
    silently to 0 where the denominator is still fine. The cost is fp32 intermediates for half inputs.
    """
    batch, height, width, num_queries, heads = exp_scores.shape
    features = values.shape[-1]
    head_dim = features // heads
    den_kernel = rpe_exp.reshape(num_queries * heads, 1, *rpe_exp.shape[-2:])
    den = depthwise_conv(exp_scores.view(batch, height, width, -1), den_kernel, stride, padding, plan.convolutions)
    out_h, out_w = den.shape[1:3]
    den = den.view(batch, out_h, out_w, num_queries, heads)
    underflow = underflowed(den)
    fft_resolved = plan.uses_fft and fft_resolves(den)
    if fft_resolved and plan.numerators == "fft":
        z = fft_numerators(exp_scores, values, rpe_exp * mixing.to(rpe_exp.dtype), den, plan.fft_chunk_bytes)
        return z, den, underflow, fft_resolved
    v = values.unflatten(-1, (heads, head_dim))
    z: Tensor | None = None
    for n in range(num_queries):
        weighted = (exp_scores[..., n, :, None] * v).flatten(-2)
        kernel = _value_kernel(rpe_exp[n], mixing[n], head_dim)
        num = depthwise_conv(weighted, kernel, stride, padding, plan.convolutions)
        del weighted
        num = num.view(batch, out_h, out_w, heads, head_dim)
        z = num.div_(den[..., n, :, None]) if z is None else z.addcdiv_(num, den[..., n, :, None])
    assert z is not None
    return z.view(batch, out_h, out_w, features), den, underflow, fft_resolved


def _fast_backward(
    grad_z: Tensor, exp_scores: Tensor, packed: Tensor, den: Tensor, rpe_bias: Tensor, mixing: Tensor,
    stride: int, plan: Plan, need_kernel_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fast form's hand-written backward: the gradients of the packed values and scores (in the work
    dtype), of ``rpe_bias`` and of ``mixing`` (None without ``need_kernel_grad``).

    The products E*V and the numerators are recomputed one query at a time and freed as soon as they
    are used. The convolution input gradients are convolutions again (`depthwise_conv_input_grad`); the
    kernel gradients PyTorch's convolution backward or FFT cross-correlations (``plan.kernel_grads``);
    with ``plan.numerator_grads="fft"`` the numerators' three convolutions run on shared spectra
    (`fft_numerator_grads`).
    """
    padding = (rpe_bias.shape[-1] - 1) // 2
    batch, height, width, num_queries, heads = exp_scores.shape
    out_h, out_w = den.shape[1:3]
    features = packed.shape[-1] - num_queries * heads
    values = packed[..., :features]
    head_dim = features // heads
    window = rpe_bias.shape[-1]
    conv, chunk_bytes = plan.convolutions, plan.fft_chunk_bytes
    # accumulated into in place (compile refuses strided out=), in the work dtype
    fft_conv = plan.numerator_grads == "fft"
    if fft_conv:  # channels first in memory, as the FFT numerators write it; (B, H, W, F + Nq*h) in shape
        g_packed = packed.new_zeros(batch, packed.shape[-1], height, width, dtype=exp_scores.dtype)
        g_packed = g_packed.permute(0, 2, 3, 1)
    else:
        g_packed = torch.zeros_like(packed, dtype=exp_scores.dtype)

    rpe_exp = _kernels(rpe_bias, exp_scores.dtype)
    v = values.unflatten(-1, (heads, head_dim))
    g_z = grad_z.to(exp_scores.dtype).contiguous().view(batch, out_h, out_w, heads, head_dim)
    g_exp = torch.empty_like(exp_scores)
    g_den = torch.empty_like(den)
    g_values = g_packed[..., :features].unflatten(-1, (heads, head_dim))
    g_value_kernel = rpe_exp.new_zeros(num_queries, heads, window, window)
    use_fft = need_kernel_grad and plan.kernel_grads == "fft"

    if fft_conv:
        fft_g_exp, g_den_num, fft_g_value_kernel = fft_numerator_grads(
            exp_scores, values, rpe_exp * mixing, den, g_z.flatten(-2), g_packed.permute(0, 3, 1, 2),
            need_kernel_grad, chunk_bytes,
        )
        g_exp.copy_(fft_g_exp)
        g_den.copy_(g_den_num).div_(den).div_(den).neg_()
        if fft_g_value_kernel is not None:
            g_value_kernel = fft_g_value_kernel
        del fft_g_exp, g_den_num
    for n in range(0 if fft_conv else num_queries):
        value_kernel = _value_kernel(rpe_exp[n], mixing[n], head_dim)
        for rows in batch_chunks(batch, v[0].numel() * v.element_size()):
            e_n = exp_scores[rows, ..., n, :, None]
            den_n = den[rows, ..., n, :, None]
            v_rows, g_z_rows = v[rows], g_z[rows]
            weighted = (e_n * v_rows).flatten(-2)
            num = depthwise_conv(weighted, value_kernel, stride, padding, conv).view(g_z_rows.shape)
            # z = sum_n num_n / den_n  =>  dL/dden_n = -sum_d(g_z * num_n) / den_n / den_n (dividing
            # twice: den_n^2 overflows fp16 for den_n > 256 and 1 / den_n^2 for den_n < 4e-3)
            g_den[rows, ..., n, :] = num.mul_(g_z_rows).sum(-1).div_(den_n[..., 0]).div_(den_n[..., 0]).neg_()
            if use_fft:
                # the numerator is freed first: the FFT's buffers then add nothing to the peak
                del num
                g_kernel = depthwise_weight_grad_fft(
                    weighted, LazyGrad(g_z_rows, den_n), (out_h, out_w), window, stride, padding, chunk_bytes
                )
                del weighted
                g_num = g_z_rows / den_n
            else:
                g_num = torch.div(g_z_rows, den_n, out=num)
                del num
                if need_kernel_grad:
                    g_kernel = depthwise_weight_grad_direct(weighted, g_num.flatten(-2), window, stride, padding)
                del weighted
            if need_kernel_grad:
                g_value_kernel[n] += g_kernel.view(heads, head_dim, window, window).sum(1)
            g_weighted = depthwise_conv_input_grad(
                g_num.flatten(-2), value_kernel, (height, width), stride, padding, conv
            )
            del g_num
            g_weighted = g_weighted.view(v_rows.shape)
            g_exp[rows, ..., n, :] = (g_weighted * v_rows).sum(-1)
            g_values[rows].addcmul_(g_weighted, e_n)
            del g_weighted

    den_kernel = rpe_exp.reshape(num_queries * heads, 1, window, window)
    flat_exp = exp_scores.view(batch, height, width, -1)
    flat_g_den = g_den.view(batch, out_h, out_w, -1)
    g_exp.add_(
        depthwise_conv_input_grad(flat_g_den, den_kernel, (height, width), stride, padding, conv).view_as(g_exp)
    )
    g_packed[..., features:].copy_(g_exp.mul_(exp_scores).flatten(-2))

    g_rpe = g_mixing = None
    if need_kernel_grad:
        if use_fft:
            g_den_kernel = depthwise_weight_grad_fft(
                flat_exp, LazyGrad(flat_g_den.unsqueeze(-1)), (out_h, out_w), window, stride, padding,
                chunk_bytes,
            )
        else:
            g_den_kernel = depthwise_weight_grad_direct(flat_exp, flat_g_den, window, stride, padding)
        g_rpe_exp = g_value_kernel * mixing + g_den_kernel.view_as(rpe_exp)
        g_rpe = (g_rpe_exp * rpe_exp).to(rpe_bias.dtype)
        g_mixing = (g_value_kernel * rpe_exp).to(mixing.dtype)
    return g_packed, g_rpe, g_mixing


def _fused_backward(
    grad_z: Tensor, exp_scores: Tensor, packed: Tensor, den: Tensor, z: Tensor, shares: Tensor, rpe_bias: Tensor,
    mixing: Tensor, stride: int, need_kernel_grad: bool, vector_bytes: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`_fast_backward` in the fused CPU loops (`fused_backward`, in vectors of at most ``vector_bytes``),
    from z and the queries' shares of it that the fused forward kept: the same outputs."""
    dtype = exp_scores.dtype
    rpe_exp = _kernels(rpe_bias, dtype).contiguous()
    mixing_w = mixing.to(dtype)
    z = z.to(dtype).contiguous() if shares.shape[3] < rpe_bias.shape[0] else shares  # z is read only then
    g_packed, g_den_kernel, g_value_kernel = fused_backward(
        grad_z.to(dtype).contiguous(), exp_scores, packed.to(dtype).contiguous(), den, z, shares, rpe_exp,
        (rpe_exp * mixing_w).contiguous(), stride, need_kernel_grad, vector_bytes,
    )
    if not need_kernel_grad:
        return g_packed, None, None
    g_rpe = ((g_value_kernel * mixing_w + g_den_kernel) * rpe_exp).to(rpe_bias.dtype)
    return g_packed, g_rpe, (g_value_kernel * rpe_exp).to(mixing.dtype)


def shares_kept(plan: Plan, num_queries: int, packed_dtype: torch.dtype) -> int:
    """How many queries' shares of z the forward keeps for the backward: none unless the backward is the
    fused one; then all but the last where z comes back in the work dtype (the last share is z less the
    others), else all."""
    if plan.numerator_grads != "fused":
        return 0
    return num_queries - 1 if packed_dtype == work_dtype(packed_dtype) else num_queries


def _without_fft(plan: Plan) -> Plan:
    """``plan`` with its FFT passes direct: what a call runs where the data do not resolve an FFT."""
    return dataclasses.replace(plan, numerators="direct", numerator_grads="direct", kernel_grads="direct")


def _unpack(packed: Tensor, rpe_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Values (B, H, W, F) and exp(s - m) (B, H, W, Nq, h) from values and scores packed as (B, H, W, F + Nq*h)."""
    num_queries, heads = rpe_bias.shape[:2]
    features = packed.shape[-1] - num_queries * heads
    exp_scores = _exp_scores(packed[..., features:]).unflatten(-1, (num_queries, heads))
    return packed[..., :features], exp_scores


def _fast_core(
    packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int, plan: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fast form's forward: values and scores packed (B, H, W, F + Nq*h) and the plan's `Plan.spec`
    -> z (B, H', W', F) in ``packed``'s dtype with the underflowed windows recomputed, and, for the
    backward, exp(s - m), the denominators, the underflowed pixels, whether the plan's FFT passes fell
    back to direct ones (a 0-dim bool: `fft_resolves` said the data do not let an FFT resolve them) and
    the queries' shares of z that a fused backward reads (B, H', W', `shares_kept`, F)."""
    chosen = plan_from_spec(plan)
    values, exp_scores = _unpack(packed, rpe_bias)
    rpe_exp = _kernels(rpe_bias, exp_scores.dtype)
    if chosen.numerators == "fused":
        z, den, shares = fused_forward(
            exp_scores, packed.to(exp_scores.dtype).contiguous(), rpe_exp.contiguous(),
            (rpe_exp * mixing.to(rpe_exp.dtype)).contiguous(),
            stride, UNDERFLOW_DENOMINATOR[exp_scores.dtype], shares_kept(chosen, rpe_bias.shape[0], packed.dtype),
            chosen.fused_vector_bytes,
        )
        underflow, resolved = underflowed(den), False
    else:
        z, den, underflow, resolved = _qna_forward(
            exp_scores, values, rpe_exp, mixing, stride, (rpe_bias.shape[-1] - 1) // 2, chosen
        )
        shares = z.new_empty(*z.shape[:3], 0, z.shape[-1])
    z = recompute_windows(z, underflow, packed, rpe_bias, mixing, stride)
    fell_back = torch.tensor(chosen.uses_fft and not resolved, device=packed.device)
    return z.to(packed.dtype), exp_scores, den, underflow, fell_back, shares


def _fast_core_backward(
    grad_z: Tensor, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, exp_scores: Tensor, den: Tensor,
    underflow: Tensor, fell_back: Tensor, z: Tensor, shares: Tensor, stride: int, plan: str, kernel_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """`_fast_core`'s backward: the gradients of ``packed``, ``rpe_bias`` and ``mixing`` (the last two
    empty without ``kernel_grads``). The underflowed pixels take their gradient from the windows that
    recomputed them (`recompute_windows_grads`), the others from the fast form's backward, whose FFT
    passes run only where the forward found the data resolved."""
    chosen = plan_from_spec(plan)
    if bool(fell_back):
        chosen = _without_fft(chosen)
    any_underflow = bool(underflow.any())
    fast_grad = grad_z.masked_fill(underflow[..., None], 0) if any_underflow else grad_z
    if chosen.numerator_grads == "fused":
        g_packed, g_rpe, g_mixing = _fused_backward(
            fast_grad, exp_scores, packed, den, z, shares, rpe_bias, mixing, stride, kernel_grads,
            chosen.fused_vector_bytes,
        )
    else:
        g_packed, g_rpe, g_mixing = _fast_backward(
            fast_grad, exp_scores, packed, den, rpe_bias, mixing, stride, chosen, kernel_grads
        )
    if any_underflow:
        recomputed = recompute_windows_grads(grad_z, underflow, packed, rpe_bias, mixing, stride, g_packed, kernel_grads)
        if recomputed is not None:
            g_rpe, g_mixing = g_rpe + recomputed[0], g_mixing + recomputed[1]
    if not kernel_grads:
        g_rpe, g_mixing = rpe_bias.new_empty(0), mixing.new_empty(0)
    return g_packed.to(packed.dtype), g_rpe, g_mixing
