"""HaloNet's blocked local attention (timm `HaloAttn`, NCHW), with an output projection added to match
the other attention peers. Window k maps to halo (k−1)/2 around fixed 8×8 query blocks."""

from __future__ import annotations

import torch
from timm.layers.halo_attn import HaloAttn
from torch import nn

from baselines._common import first_reason, no_dilation_reason
from qna_bench.measure.traffic import traffic_bytes
from qna_bench.problem import Problem
from qna_bench.registry import register_layer

# HaloNet's default block (and timm's). A fixed block, not one derived from the window, keeps the
# query tiling, and so the cost per pixel, comparable across windows; 8 divides the 56/112/224 maps.
BLOCK_SIZE = 8
STRIDES = (1, 2)  # HaloAttn's own limit


def halo_size(window: int) -> int:
    """Halo (k−1)/2: every pixel of a block then sees at least its own k×k neighbourhood, inside the
    block's (block + 2·halo)² attended region; pixels away from the block's centre see more."""
    return (window - 1) // 2


class HaloAttention(nn.Module):
    """timm `HaloAttn` (qkv as 1×1 convolutions, relative position logits) followed by a 1×1 output
    projection, which `HaloAttn` leaves to the surrounding block; qkv biases on, as in the other peers."""

    def __init__(self, channels: int, heads: int, window: int, stride: int):
        super().__init__()
        self.attn = HaloAttn(
            channels,
            channels,
            stride=stride,
            num_heads=heads,
            block_size=BLOCK_SIZE,
            halo_size=halo_size(window),
            qkv_bias=True,
        )
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x))


def _constraints(problem: Problem) -> list[str]:
    if problem.stride not in STRIDES:
        return [f"problem.stride={problem.stride}: halo (timm HaloAttn) supports stride 1 or 2"]
    return []


def _unsupported(problem: Problem) -> str | None:
    indivisible = problem.height % BLOCK_SIZE or problem.width % BLOCK_SIZE
    return first_reason(
        f"halo: timm HaloAttn needs height and width divisible by its block size {BLOCK_SIZE}, "
        f"got {problem.height}x{problem.width}"
        if indivisible
        else None,
        no_dilation_reason(problem, "halo"),
    )


def _flags(module: HaloAttention, problem: Problem) -> dict:
    attn = module.attn
    return {
        "block_size": attn.block_size,
        "halo_size": attn.halo_size,
        "attended_window": attn.win_size,
        "qk_head_dim": attn.dim_head_qk,
        # timm pads the key/value map with zeros and does not mask them: in every block touching the
        # border, padded positions take part in the softmax (key 0, value 0). Kept as timm has it.
        "padded_halo_attended": attn.halo_size > 0,
    }


def halo_flops(problem: Problem) -> int:
    """2 × multiply-adds of HaloAttn and the output projection (3× in train mode)."""
    b, c, s = problem.batch, problem.channels, problem.stride
    attn = HaloAttn(
        c,
        c,
        stride=s,
        num_heads=problem.heads,
        block_size=BLOCK_SIZE,
        halo_size=halo_size(problem.window),
        device="meta",
    )
    qk = attn.dim_out_qk
    pixels = b * problem.height * problem.width
    queries = pixels // s**2
    keys_per_query = attn.win_size**2
    rel_positions = 2 * attn.win_size - 1
    macs = (
        queries * c * qk  # q
        + pixels * c * (qk + c)  # k and v
        + queries * keys_per_query * (qk + c)  # QKᵀ and AV
        + queries * 2 * rel_positions * qk  # relative logits, along height and width
        + queries * c * c  # output projection
    )
    return 2 * macs * (3 if problem.mode == "train" else 1)


def halo_bytes(problem: Problem) -> int:
    """x read; q, k and v written and read; keys and values unfolded into (block + 2·halo)² windows per
    block; the content logits, relative logits and probabilities (queries, heads, window²) each; the
    attention output; the output projection's output written."""
    b, c, s = problem.batch, problem.channels, problem.stride
    attn = HaloAttn(
        c, c, stride=s, num_heads=problem.heads, block_size=BLOCK_SIZE, halo_size=halo_size(problem.window),
        qkv_bias=True, device="meta",
    )
    qk, v = attn.dim_out_qk, attn.dim_out_v
    pixels = b * problem.height * problem.width
    queries = pixels // s**2
    blocks = pixels // BLOCK_SIZE**2
    area = attn.win_size**2
    rel_positions = 2 * attn.win_size - 1
    return traffic_bytes(
        problem,
        inputs=pixels * c,
        params=c * qk + c * (qk + v) + 2 * qk + v + 2 * rel_positions * qk // problem.heads + v * c + c,
        outputs=queries * c,
        intermediates=(
            queries * qk,
            pixels * (qk + v),
            blocks * area * (qk + v),
            3 * queries * problem.heads * area,
            queries * v,
        ),
    )


@register_layer(
    "halo",
    forms=("gemm",),
    role="peer",
    family="halo",
    cost_grows_with_window=True,
    implementation="timm.layers.halo_attn.HaloAttn + 1x1 conv projection",
    layout="nchw",
    odd_window=True,
    description=(
        f"HaloNet blocked local attention: {BLOCK_SIZE}x{BLOCK_SIZE} query blocks attend over the block "
        "plus a (window-1)/2 halo; relative position logits; qkv biases and output projection added; "
        "timm leaves the zero-padded halo unmasked"
    ),
    constraints=_constraints,
    unsupported=_unsupported,
    flags=_flags,
    analytic_flops=halo_flops,
    analytic_bytes=halo_bytes,
)
def build_halo(problem: Problem) -> nn.Module:
    return HaloAttention(problem.channels, problem.heads, problem.window, problem.stride)
