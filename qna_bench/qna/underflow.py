"""Windows the fast form cannot resolve with one max per image: found after the denominators
(`underflowed`) and recomputed the reference way, each with its own max (`recompute_windows`)."""

from __future__ import annotations

import torch
from torch import Tensor

# Denominators below this (per work dtype) mark a window whose logits all lie so far below the image's
# max that exp(s - m) has underflowed, or kept too few bits: `recompute_windows` redoes those windows
# with their own max. 2^-64 is a window ~44 below the image's max in fp32: its terms are still normal
# numbers with ~2^-60 of headroom for the value and mixing factors of the numerator, and logits of the
# released models (normalised queries) never spread that far, so the normal case recomputes nothing.
UNDERFLOW_DENOMINATOR: dict[torch.dtype, float] = {torch.float32: 2.0**-64, torch.float64: 2.0**-600}


def underflowed(den: Tensor) -> Tensor:
    """The output pixels (B, H', W') where some query's and head's denominator is below
    `UNDERFLOW_DENOMINATOR` (their window's logits all lie far below the image's max).

    Writes 1 into those denominators, so that the fast form stays finite there; `recompute_windows`
    then replaces those pixels. The normal case pays for one comparison and one reduction.
    """
    small = den < UNDERFLOW_DENOMINATOR[den.dtype]
    den.masked_fill_(small, 1.0)
    return small.flatten(-2).any(-1)


def _windows(
    underflow: Tensor, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int, dtype: torch.dtype
) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The windows of the ``underflow`` pixels: where each tap reads ``packed`` (its index, clamped at the
    border), which taps lie inside the image (n, k, k), the values (n, k*k, h, d), each window's softmax
    (n, k*k, Nq, h) in ``dtype`` and the mixing as (k*k, Nq, h)."""
    pixels = underflow.nonzero()
    num_queries, heads, window, _ = rpe_bias.shape
    _, height, width, channels = packed.shape
    features = channels - num_queries * heads
    taps = torch.arange(window, device=packed.device) - (window - 1) // 2
    rows = pixels[:, 1, None] * stride + taps  # (n, k) input rows of each window
    cols = pixels[:, 2, None] * stride + taps
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    index = (pixels[:, 0, None, None], rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :])
    gathered = packed[index].to(dtype)  # (n, k, k, F + Nq*h)
    logits = gathered[..., features:].unflatten(-1, (num_queries, heads)) + rpe_bias.permute(2, 3, 0, 1).to(dtype)
    logits = logits.masked_fill(~inside[..., None, None], float("-inf")).flatten(1, 2)  # (n, k*k, Nq, h)
    values = gathered[..., :features].flatten(1, 2).unflatten(-1, (heads, features // heads))
    flat_mixing = mixing.permute(2, 3, 0, 1).flatten(0, 1).to(dtype)
    return index, inside, values, torch.softmax(logits, dim=1), flat_mixing, pixels


def recompute_windows(
    z: Tensor, underflow: Tensor, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int
) -> Tensor:
    """``z`` with the ``underflow`` output pixels (B, H', W') recomputed the reference way, each window
    with its own max: the windows gathered (clamped at the border, the outside masked with -inf), a
    softmax in the work dtype, the query mixing and the weighted sum of the values. Its gradient is
    `recompute_windows_grads`.

    Memory grows with n * k^2 * (F + Nq*h) for n such pixels: this is the fallback for windows the fast
    form cannot resolve, not a path for whole images.
    """
    if not bool(underflow.any()):
        return z
    _, _, values, softmax, flat_mixing, pixels = _windows(underflow, packed, rpe_bias, mixing, stride, z.dtype)
    weights = (softmax * flat_mixing).sum(2)  # (n, k*k, h)
    fixed = torch.einsum("njh,njhd->nhd", weights, values).flatten(1)
    return z.index_put(tuple(pixels.T), fixed)


def recompute_windows_grads(
    grad_z: Tensor, underflow: Tensor, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int,
    grad_packed: Tensor, kernel_grads: bool,
) -> tuple[Tensor, Tensor] | None:
    """The gradient of `recompute_windows`' pixels, given ``grad_z`` (B, H', W', F): added into
    ``grad_packed`` (B, H, W, F + Nq*h, the work dtype); returns the gradients of ``rpe_bias`` and
    ``mixing`` (zero where no pixel underflowed) when ``kernel_grads``, else None."""
    dtype = grad_packed.dtype
    num_queries, heads, window, _ = rpe_bias.shape
    if not bool(underflow.any()):
        if not kernel_grads:
            return None
        return torch.zeros_like(rpe_bias), torch.zeros_like(mixing)
    index, inside, values, softmax, flat_mixing, pixels = _windows(underflow, packed, rpe_bias, mixing, stride, dtype)
    g_fixed = grad_z[tuple(pixels.T)].to(dtype).unflatten(-1, values.shape[-2:])  # (n, h, d)
    weights = (softmax * flat_mixing).sum(2)
    g_values = weights[..., None] * g_fixed[:, None]  # (n, k*k, h, d)
    g_weights = torch.einsum("nhd,njhd->njh", g_fixed, values)[:, :, None]  # (n, k*k, 1, h)
    g_softmax = g_weights * flat_mixing
    g_logits = softmax * (g_softmax - (softmax * g_softmax).sum(1, keepdim=True))  # (n, k*k, Nq, h)
    g_window = torch.cat([g_values.flatten(-2), g_logits.flatten(-2)], dim=-1).unflatten(1, (window, window))
    grad_packed.index_put_(index, g_window * inside[..., None], accumulate=True)
    if not kernel_grads:
        return None
    g_rpe = g_logits.sum(0).unflatten(0, (window, window)).permute(2, 3, 0, 1)
    g_mixing = (g_weights * softmax).sum(0).unflatten(0, (window, window)).permute(2, 3, 0, 1)
    return g_rpe.to(rpe_bias.dtype), g_mixing.to(mixing.dtype)
