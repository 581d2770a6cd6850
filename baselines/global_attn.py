"""Global multi-head self-attention over all H·W positions (scaled_dot_product_attention): the
quadratic peer every local attention is measured against. It has no window."""

from __future__ import annotations

import torch
from torch import nn

from baselines._common import (
    CPU_SDPA_FLOP_FORMULAS,
    FUSED_SDPA_BACKWARD,
    ProjectedAttention,
    attention_bytes,
    attention_flops,
    first_reason,
    from_sequence,
    no_dilation_reason,
    no_stride_reason,
    to_sequence,
)
from qna_bench.problem import Problem
from qna_bench.registry import register_layer


class GlobalAttention(ProjectedAttention):
    """Every pixel attends to every pixel."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        height, width = q.shape[1:3]
        out = nn.functional.scaled_dot_product_attention(to_sequence(q), to_sequence(k), to_sequence(v))
        return from_sequence(out, height, width)


def _flops(problem: Problem) -> int:
    pixels = problem.height * problem.width
    tokens = problem.batch * pixels
    return attention_flops(
        problem,
        qkv_tokens=tokens,
        out_tokens=tokens,
        pairs=tokens * pixels,
        attention_backward=FUSED_SDPA_BACKWARD,
    )


def _unsupported(problem: Problem) -> str | None:
    return first_reason(
        no_stride_reason(problem, "global_attn", "every output pixel is an input pixel"),
        no_dilation_reason(problem, "global_attn"),
    )


@register_layer(
    "global_attn",
    forms=("gemm",),
    role="peer",
    family="global",
    implementation="torch scaled_dot_product_attention, no mask",
    layout="nhwc",
    uses_window=False,
    description="global self-attention over all H·W positions; the problem's window is ignored",
    unsupported=_unsupported,
    flags=lambda module, problem: {"window_ignored": True},
    flop_formulas=CPU_SDPA_FLOP_FORMULAS,
    analytic_flops=_flops,
    analytic_bytes=lambda p: attention_bytes(  # fused SDPA: no scores leave the kernel
        p, qkv_tokens=p.batch * p.height * p.width, out_tokens=p.batch * p.height * p.width
    ),
)
def build_global_attn(problem: Problem) -> nn.Module:
    return GlobalAttention(problem.channels, problem.heads)
