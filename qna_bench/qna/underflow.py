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


@torch.compiler.disable  # data-dependent: the pixels' number; torch.compile runs it eagerly
def recompute_windows(
    z: Tensor, underflow: Tensor, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int
) -> Tensor:
    """``z`` with the ``underflow`` output pixels (B, H', W') recomputed the reference way, each window
    with its own max: the windows gathered (clamped at the border, the outside masked with -inf), a
    softmax in the work dtype, the query mixing and the weighted sum of the values. Differentiable by
    autograd.

    Memory grows with n * k^2 * (F + Nq*h) for n such pixels: this is the fallback for windows the fast
    form cannot resolve, not a path for whole images.
    """
    if not bool(underflow.any()):
        return z
    pixels = underflow.nonzero()
    num_queries, heads, window, _ = rpe_bias.shape
    _, height, width, channels = packed.shape
    features = channels - num_queries * heads
    padding = (window - 1) // 2
    taps = torch.arange(window, device=packed.device) - padding
    rows = pixels[:, 1, None] * stride + taps  # (n, k) input rows of each window
    cols = pixels[:, 2, None] * stride + taps
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    gathered = packed[
        pixels[:, 0, None, None], rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]
    ].to(z.dtype)  # (n, k, k, F + Nq*h)
    logits = gathered[..., features:].unflatten(-1, (num_queries, heads)) + rpe_bias.permute(2, 3, 0, 1).to(z.dtype)
    logits = logits.masked_fill(~inside[..., None, None], float("-inf")).flatten(1, 2)  # (n, k*k, Nq, h)
    weights = (torch.softmax(logits, dim=1) * mixing.permute(2, 3, 0, 1).flatten(0, 1).to(z.dtype)).sum(2)
    v = gathered[..., :features].flatten(1, 2).unflatten(-1, (heads, features // heads))  # (n, k*k, h, d)
    fixed = torch.einsum("njh,njhd->nhd", weights, v).flatten(1)
    return z.index_put(tuple(pixels.T), fixed)

