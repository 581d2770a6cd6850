"""Neighbourhood attention (NATTEN's semantics) on torch's *compiled* flex attention with a closed-form
``mask_mod``: the block-sparse fused kernel NATTEN itself refuses to compile on CPU."""

from __future__ import annotations

import types

import torch
from natten import HAS_LIBNATTEN
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from baselines._common import (
    FLEX_CPU_BACKWARD,
    NA_STRIDE_WHY,
    ProjectedAttention,
    attention_bytes,
    attention_flops,
    first_reason,
    from_sequence,
    na_axis_allowed,
    na_constraints,
    no_stride_reason,
    refuse_under_dispatch_mode,
    to_sequence,
)
from qna_bench.problem import Problem
from qna_bench.registry import register_layer

# flex attention's default sparse block (queries × keys); the kernel computes whole blocks that hold
# any allowed pair and skips the rest. Passed explicitly so the FLOP count agrees by construction.
FLEX_BLOCK = 128


def na_mask_mod(height: int, width: int, window: int, dilation: int):
    """flex attention ``mask_mod`` over flattened row-major pixel indices."""

    def mask_mod(batch, head, q_idx, kv_idx):
        return na_axis_allowed(q_idx // width, kv_idx // width, height, window, dilation) & na_axis_allowed(
            q_idx % width, kv_idx % width, width, window, dilation
        )

    return mask_mod


def _flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    return flex_attention(q, k, v, block_mask=block_mask)


def compiled_flex(name: str):
    """``torch.compile(flex_attention)`` with a code object of its own.

    Dynamo caches compiled graphs per code object and, past ``recompile_limit`` (8) of them, runs the
    function eagerly after one logged warning: in a sweep over many shapes in one process, later
    points would time the dense eager path. A fresh code object per module keeps each module's single
    graph apart; ``fullgraph`` turns any remaining fallback into an error rather than an eager run.
    """
    code = _flex_call.__code__.replace(co_name=name)
    function = types.FunctionType(code, _flex_call.__globals__, name)
    return torch.compile(function, dynamic=False, fullgraph=True)


class FlexNeighborhoodAttention(ProjectedAttention):
    """NA with compiled flex attention; the block mask is built once, at construction, on ``device``."""

    def __init__(
        self, channels: int, heads: int, height: int, width: int, window: int, dilation: int, device: str
    ):
        super().__init__(channels, heads)
        pixels = height * width
        self.block_mask = create_block_mask(
            na_mask_mod(height, width, window, dilation),
            None,
            None,
            pixels,
            pixels,
            device=device,
            BLOCK_SIZE=FLEX_BLOCK,
        )
        self.flex = compiled_flex(f"na_flex_{height}x{width}_k{window}_d{dilation}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        height, width = q.shape[1:3]
        refuse_under_dispatch_mode()
        out = self.flex(to_sequence(q), to_sequence(k), to_sequence(v), self.block_mask)
        return from_sequence(out, height, width)


def computed_blocks(problem: Problem, block: int = FLEX_BLOCK) -> int:
    """(query block, key block) pairs holding at least one neighbour pair: what the kernel computes.

    Evaluated one row of query blocks at a time, so memory stays at block·H·W booleans.
    """
    height, width, window, dilation = problem.height, problem.width, problem.window, problem.dilation
    pixels = height * width
    blocks = -(-pixels // block)
    keys = torch.arange(pixels)
    count = 0
    for start in range(0, pixels, block):
        queries = torch.arange(start, min(start + block, pixels))[:, None]
        allowed = na_mask_mod(height, width, window, dilation)(None, None, queries, keys[None, :])
        padded = nn.functional.pad(allowed.any(0), (0, blocks * block - pixels))
        count += int(padded.view(blocks, block).any(1).sum())
    return count


def _flops(problem: Problem) -> int:
    tokens = problem.batch * problem.height * problem.width
    pairs = problem.batch * computed_blocks(problem) * FLEX_BLOCK * FLEX_BLOCK
    return attention_flops(problem, qkv_tokens=tokens, out_tokens=tokens, pairs=pairs)


def _bytes(problem: Problem) -> int:
    """The attention shell only: the compiled kernel keeps its score blocks on chip."""
    tokens = problem.batch * problem.height * problem.width
    return attention_bytes(problem, qkv_tokens=tokens, out_tokens=tokens)


def _flags(module: FlexNeighborhoodAttention, problem: Problem) -> dict:
    stands_in = problem.device != "cpu" and not HAS_LIBNATTEN
    return {
        "backend": "torch.compile(flex_attention)",
        "fallback": "stands in for NATTEN's fused CUDA kernels (libnatten is not installed here)" if stands_in else "",
        "flex_compiled": True,
        "flex_block": FLEX_BLOCK,
        "flex_block_density": round(1.0 - module.block_mask.sparsity() / 100.0, 4),
    }


def _unsupported(problem: Problem) -> str | None:
    return first_reason(
        no_stride_reason(problem, "na_flex", NA_STRIDE_WHY),
        f"na_flex on CPU: {FLEX_CPU_BACKWARD}"
        if problem.mode == "train" and problem.device == "cpu"
        else None,
    )


@register_layer(
    "na_flex",
    forms=("gemm",),
    role="peer",
    compiles=True,
    family="neighborhood",
    cost_grows_with_window=True,
    implementation="torch.compile(flex_attention), closed-form neighbourhood mask_mod, block-sparse",
    layout="nhwc",
    odd_window=True,
    window_within_map=True,
    dtypes=("float32", "bfloat16", "float16"),  # inductor's CPU flex template has no float64
    description=(
        "neighbourhood attention (NATTEN semantics) on compiled flex attention; forward only on CPU; "
        "FLOPs counted analytically over the computed 128x128 blocks (FlopCounterMode cannot run flex)"
    ),
    constraints=na_constraints,
    unsupported=_unsupported,
    flags=_flags,
    analytic_flops=_flops,
    analytic_bytes=_bytes,
)
def build_na_flex(problem: Problem) -> nn.Module:
    return FlexNeighborhoodAttention(
        problem.channels,
        problem.heads,
        problem.height,
        problem.width,
        problem.window,
        problem.dilation,
        problem.device,
    )
