"""QnA's windowed softmax computed naively, the readable definition the fast form is tested against.

It imports nothing of the fast form it checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qna_bench.qna.shapes import check_core_args, qna_output_size


def qna_attention_reference(
    scores: Tensor, values: Tensor, rpe_bias: Tensor, query_mixing: Tensor, stride: int = 1
) -> Tensor:
    """`qna_attention` computed naively: unfold every k x k window, mask the padding with -inf, softmax.

    Memory grows with k^2; for tests and as the readable definition.
    """
    check_core_args(scores, values, rpe_bias, query_mixing, stride)
    num_queries, heads, window, _ = rpe_bias.shape
    batch, height, width, features = values.shape
    head_dim = features // heads
    padding = (window - 1) // 2
    out_h, out_w = qna_output_size(height, window, stride), qna_output_size(width, window, stride)

    def windows(t: Tensor) -> Tensor:  # (B, H, W, C) -> (B, C, k*k, H'*W')
        cols = F.unfold(t.permute(0, 3, 1, 2), window, padding=padding, stride=stride)
        return cols.view(t.shape[0], t.shape[-1], window * window, -1)

    taps = window * window
    inside = windows(scores.new_ones(1, height, width, 1)).view(1, 1, 1, taps, -1) > 0
    logits = windows(scores).view(batch, num_queries, heads, taps, -1) + rpe_bias.reshape(
        1, num_queries, heads, taps, 1
    )
    attn = torch.softmax(logits.masked_fill(~inside, float("-inf")), dim=3)
    mixed = (attn * query_mixing.reshape(1, num_queries, heads, taps, 1)).sum(1)  # (B, h, k*k, L)
    v = windows(values).view(batch, heads, head_dim, taps, -1)
    z = torch.einsum("bhjl,bhdjl->bhdl", mixed, v)
    return z.reshape(batch, features, out_h, out_w).permute(0, 2, 3, 1)
