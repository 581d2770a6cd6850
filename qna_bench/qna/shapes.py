"""QnA's argument checks and output sizes, shared by the fast and the reference form."""

from __future__ import annotations

from torch import Tensor

STRIDES: tuple[int, ...] = (1, 2)


def qna_output_size(size: int, window: int, stride: int = 1) -> int:
    """Output length of one spatial axis: ``floor((size + 2p - window) / stride) + 1``, ``p = (window-1)/2``."""
    padding = (window - 1) // 2
    return (size + 2 * padding - window) // stride + 1


def check_core_args(scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> None:
    """Raise ValueError naming the first argument of the windowed softmax whose shape does not fit."""
    if rpe_bias.dim() != 4 or rpe_bias.shape[-1] != rpe_bias.shape[-2] or rpe_bias.shape[-1] % 2 == 0:
        raise ValueError(f"rpe_bias.shape={tuple(rpe_bias.shape)}: needs (num_queries, heads, k, k), k odd")
    if mixing.shape != rpe_bias.shape:
        raise ValueError(
            f"query_mixing.shape={tuple(mixing.shape)}: needs rpe_bias's shape {tuple(rpe_bias.shape)}"
        )
    num_queries, heads = rpe_bias.shape[:2]
    if scores.dim() != 4 or scores.shape[-1] != num_queries * heads:
        raise ValueError(f"scores.shape={tuple(scores.shape)}: needs (B, H, W, {num_queries * heads})")
    if values.shape[:-1] != scores.shape[:-1] or values.shape[-1] % heads != 0:
        raise ValueError(
            f"values.shape={tuple(values.shape)}: needs (B, H, W, F) with scores' (B, H, W) and F divisible by {heads}"
        )
    if stride not in STRIDES:
        raise ValueError(f"stride={stride}: QnA supports stride 1 or 2")
