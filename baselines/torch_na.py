"""Exact neighbourhood attention (NATTEN's semantics, dilation included) in plain PyTorch: SDPA with the
neighbourhood as an additive mask. Runs forward and backward on CPU; also the test oracle."""

from __future__ import annotations

import torch
from torch import nn

from baselines._common import (
    CPU_SDPA_FLOP_FORMULAS,
    FUSED_SDPA_BACKWARD,
    NA_STRIDE_WHY,
    ProjectedAttention,
    attention_bytes,
    attention_flops,
    from_sequence,
    na_constraints,
    na_mask,
    no_stride_reason,
    to_sequence,
)
from qna_bench.problem import Problem
from qna_bench.registry import register_layer


class MaskedNeighborhoodAttention(ProjectedAttention):
    """NA as dense SDPA over all H·W keys with a 0/−inf mask: exact, and lean in memory (one (H·W)²
    mask shared by batch and heads, no k²-fold copy of keys and values as the gather form makes), at
    the price of computing every score; the fused CPU kernel then skips nothing."""

    def __init__(self, channels: int, heads: int, height: int, width: int, window: int, dilation: int):
        super().__init__(channels, heads)
        self.window, self.dilation = window, dilation
        allowed = na_mask(height, width, window, dilation)
        # Additive and in the layer's dtype (the buffer follows .to(dtype)): a boolean mask would be
        # converted to this inside SDPA on every call, inside the timed region.
        bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
        self.register_buffer("mask", bias, persistent=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        height, width = q.shape[1:3]
        out = nn.functional.scaled_dot_product_attention(
            to_sequence(q), to_sequence(k), to_sequence(v), attn_mask=self.mask
        )
        return from_sequence(out, height, width)


def _flops(problem: Problem) -> int:
    tokens = problem.batch * problem.height * problem.width
    pixels = problem.height * problem.width
    return attention_flops(
        problem,
        qkv_tokens=tokens,
        out_tokens=tokens,
        pairs=problem.batch * pixels * pixels,  # dense: every score is computed, then masked
        attention_backward=FUSED_SDPA_BACKWARD,
    )


def na_torch_bytes(problem: Problem) -> int:
    """The attention shell and the (HW)² additive mask read once; the fused SDPA kernel writes no
    scores (its backward recomputes them)."""
    tokens = problem.batch * problem.height * problem.width
    pixels = problem.height * problem.width
    return attention_bytes(problem, qkv_tokens=tokens, out_tokens=tokens, core_reads=pixels * pixels)


@register_layer(
    "na_torch",
    role="reference",
    family="neighborhood",
    cost_grows_with_window=True,
    implementation="plain PyTorch: scaled_dot_product_attention with a (HW)² 0/-inf neighbourhood mask",
    layout="nhwc",
    odd_window=True,
    window_within_map=True,
    description=(
        "exact neighbourhood attention (NATTEN semantics: window clamped inside the map, DiNA dilation), "
        "dense masked SDPA: FLOPs and time do not shrink with the window"
    ),
    constraints=na_constraints,
    unsupported=lambda p: no_stride_reason(p, "na_torch", NA_STRIDE_WHY),
    flags=lambda module, problem: {"scores": "dense (HW)^2, masked", "mask_bytes": module.mask.nbytes},
    flop_formulas=CPU_SDPA_FLOP_FORMULAS,
    analytic_flops=_flops,
    analytic_bytes=na_torch_bytes,
)
def build_na_torch(problem: Problem) -> nn.Module:
    return MaskedNeighborhoodAttention(
        problem.channels, problem.heads, problem.height, problem.width, problem.window, problem.dilation
    )
