"""SASA (stand-alone self-attention, Ramachandran et al. 2019) in the naive unfold form QnA's paper
contrasts itself with: each pixel's own query over its zero-padded k×k window, padding masked out."""

from __future__ import annotations

import torch
from torch import nn

from baselines._common import ProjectedAttention, attention_bytes, attention_flops, no_dilation_reason
from qna_bench.problem import Problem
from qna_bench.registry import register_layer


class UnfoldSASA(ProjectedAttention):
    """Unfolds keys and values into (B, C·k², H'·W') copies, the k²-fold memory QnA avoids.

    Nothing is chunked or guarded: at large windows the unfolded copies are simply allocated, and a
    refused allocation surfaces as torch's allocator error (the harness's ``oom`` row).
    """

    def __init__(self, channels: int, heads: int, window: int, stride: int):
        super().__init__(channels, heads)
        self.window, self.stride = window, stride

    def _unfold(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, C, k², L): every output pixel's zero-padded window, channel-major."""
        batch, _, _, channels = t.shape
        cols = nn.functional.unfold(
            t.permute(0, 3, 1, 2), self.window, padding=(self.window - 1) // 2, stride=self.stride
        )
        return cols.view(batch, channels, self.window**2, -1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, height, width, heads, dim = q.shape
        keys = self._unfold(k.flatten(-2)).unflatten(1, (heads, dim))  # B, heads, d, k², L
        values = self._unfold(v.flatten(-2)).unflatten(1, (heads, dim))
        queries = q[:, :: self.stride, :: self.stride]
        out_h, out_w = queries.shape[1:3]
        queries = queries.flatten(1, 2).permute(0, 2, 3, 1)  # B, heads, d, L
        logits = torch.einsum("bhdl,bhdkl->bhkl", queries * dim**-0.5, keys)
        # Unfolding a map of ones marks which window positions lie inside the image.
        inside = self._unfold(q.new_ones(1, height, width, 1))[0, 0]  # k², L
        attn = logits.masked_fill(inside == 0, float("-inf")).softmax(dim=2)
        out = torch.einsum("bhkl,bhdkl->bhdl", attn, values)
        return out.permute(0, 3, 1, 2).reshape(batch, out_h, out_w, heads, dim)


def _unfolded_bytes(problem: Problem) -> int:
    """Size of the two unfolded copies (keys and values), the tensors that run out of memory first."""
    out_h, out_w = problem.output_hw
    return (
        2
        * problem.batch
        * problem.channels
        * problem.window**2
        * out_h
        * out_w
        * problem.torch_dtype.itemsize
    )


def _flops(problem: Problem) -> int:
    out_h, out_w = problem.output_hw
    out_tokens = problem.batch * out_h * out_w
    return attention_flops(
        problem,
        qkv_tokens=problem.batch * problem.height * problem.width,
        out_tokens=out_tokens,
        pairs=out_tokens * problem.window**2,  # padded positions are computed, then masked
    )


def sasa_bytes(problem: Problem) -> int:
    """The attention shell, plus the unfolded keys and values (B, C, k², L) each, the scaled queries,
    and the logits and probabilities (B, heads, k², L) each, all written and read back."""
    out_h, out_w = problem.output_hw
    out_tokens = problem.batch * out_h * out_w
    taps = problem.window**2
    return attention_bytes(
        problem,
        qkv_tokens=problem.batch * problem.height * problem.width,
        out_tokens=out_tokens,
        core_intermediates=(
            2 * out_tokens * problem.channels * taps,
            out_tokens * problem.channels,
            2 * out_tokens * problem.heads * taps,
        ),
    )


@register_layer(
    "sasa",
    forms=("gemm",),
    role="peer",
    family="sasa",
    cost_grows_with_window=True,
    implementation="plain PyTorch: F.unfold of keys and values, einsum, masked softmax",
    layout="nhwc",
    odd_window=True,
    description="SASA local self-attention, naive unfold form (k²-fold copies of K and V); zero padding masked",
    unsupported=lambda p: no_dilation_reason(p, "sasa"),
    flags=lambda module, problem: {"unfolded_kv_bytes": _unfolded_bytes(problem)},
    analytic_flops=_flops,
    analytic_bytes=sasa_bytes,
)
def build_sasa(problem: Problem) -> nn.Module:
    return UnfoldSASA(problem.channels, problem.heads, problem.window, problem.stride)
