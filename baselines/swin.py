"""Swin window attention from timm: W-MSA and shifted SW-MSA (M×M windows, M = problem.window), run
through timm's own `SwinTransformerBlock._attn` (shift, pad, partition, attend, merge), eager and fused."""

from __future__ import annotations

import math

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from baselines._common import (
    CPU_SDPA_FLOP_FORMULAS,
    attention_bytes,
    attention_flops,
    first_reason,
    no_dilation_reason,
    no_stride_reason,
)
from qna_bench.problem import Problem
from qna_bench.registry import register_layer


class SwinWindowAttention(nn.Module):
    """The attention half of a timm `SwinTransformerBlock` (B, H, W, C) → (B, H, W, C).

    The block is timm's, so its window clamping, padding and shift mask are timm's; its norms and MLP
    are replaced by identities so that only the attention's parameters (qkv, proj, relative position
    bias table) are built into the layer and counted.
    """

    def __init__(
        self, channels: int, heads: int, height: int, width: int, window: int, shifted: bool, fused: bool
    ):
        super().__init__()
        block = SwinTransformerBlock(
            channels,
            (height, width),
            num_heads=heads,
            window_size=window,
            shift_size=window // 2 if shifted else 0,
        )
        block.norm1, block.norm2, block.mlp = nn.Identity(), nn.Identity(), nn.Identity()
        # Per module rather than timm.layers.set_fused_attn(), which is process-wide state.
        block.attn.fused_attn = fused
        self.block = block

    @property
    def fused(self) -> bool:
        return bool(self.block.attn.fused_attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block._attn(x)


def clamped_window(problem: Problem) -> tuple[int, int]:
    """timm's window for this map (`SwinTransformerBlock._calc_window_shift`): clamped to the map per
    axis; the shift is dropped on an axis the window covers."""
    return min(problem.height, problem.window), min(problem.width, problem.window)


def padded_map(height: int, width: int, window: tuple[int, int]) -> tuple[int, int]:
    """The map timm attends over: zero-padded up to whole windows."""
    return math.ceil(height / window[0]) * window[0], math.ceil(width / window[1]) * window[1]


def _flags(module: SwinWindowAttention, problem: Problem) -> dict:
    block = module.block
    padded = padded_map(problem.height, problem.width, block.window_size)
    flags = {
        "timm_fused_attn": module.fused,
        "window_effective": "x".join(map(str, block.window_size)),
        "shift_effective": "x".join(map(str, block.shift_size)),
        "padded_map": "x".join(map(str, padded)),
        # timm zero-pads to whole windows and does not mask the padding: padded tokens are attended.
        "padded_tokens_attended": padded != (problem.height, problem.width),
    }
    if module.fused:
        if problem.device != "cpu":
            flags["sdpa_kernel"] = "chosen by torch (not checked off CPU)"
        elif problem.mode == "train":
            # The relative-position bias makes SDPA's attn_mask require grad, which the fused CPU
            # kernel does not take: SDPA falls back to its math path (a test checks the ops that run).
            flags["sdpa_kernel"] = "math (attn_mask requires grad)"
        else:
            flags["sdpa_kernel"] = "flash (cpu)"
    return flags


def _flops(problem: Problem) -> int:
    window = clamped_window(problem)
    padded_h, padded_w = padded_map(problem.height, problem.width, window)
    tokens = problem.batch * padded_h * padded_w
    # On CPU the fused path's backward is SDPA's math fallback (see _flags): plain matmul counts.
    return attention_flops(
        problem, qkv_tokens=tokens, out_tokens=tokens, pairs=tokens * window[0] * window[1]
    )


def swin_bytes(problem: Problem, shifted: bool, fused: bool) -> int:
    """The attention shell over the padded map, the relative-position bias table read and its gathered
    (heads, M², M²) bias written and read; the eager path (and the fused one in train mode, SDPA's math
    fallback on CPU) also writes and reads the scores and the probabilities, (windows, heads, M², M²)
    each. Shifted windows read the (windows, M², M²) shift mask; the fused path adds it to the bias
    into a mask as large as the scores."""
    window = clamped_window(problem)
    padded_h, padded_w = padded_map(problem.height, problem.width, window)
    tokens = problem.batch * padded_h * padded_w
    area, heads = window[0] * window[1], problem.heads
    shift = shifted and (window[0] < problem.height or window[1] < problem.width)
    windows = padded_h * padded_w // area
    scores = tokens * heads * area
    core = [heads * area * area]
    if not fused or problem.mode == "train":
        core += [scores, scores]
    elif shift:
        core.append(scores)
    return attention_bytes(
        problem,
        qkv_tokens=tokens,
        out_tokens=tokens,
        core_reads=windows * area * area if shift else 0,
        core_params=(2 * window[0] - 1) * (2 * window[1] - 1) * heads,
        core_intermediates=tuple(core),
    )


def _unsupported(problem: Problem) -> str | None:
    return first_reason(
        no_stride_reason(problem, "swin", "its downsampling is a separate patch-merging layer"),
        no_dilation_reason(problem, "swin"),
    )


def _register(name: str, shifted: bool, fused: bool) -> None:
    kind = "shifted windows (SW-MSA)" if shifted else "windows (W-MSA)"
    path = (
        "fused_attn=True: scaled_dot_product_attention"
        if fused
        else "fused_attn=False: explicit (windows, heads, M², M²) scores"
    )

    @register_layer(
        name,
        role="peer",
        family="swin",
        forms=("gemm",),
        implementation=f"timm SwinTransformerBlock._attn, {path}",
        layout="nhwc",
        description=f"Swin window attention over non-overlapping M×M {kind}, M = window (timm clamps it to the map)",
        unsupported=_unsupported,
        flags=_flags,
        flop_formulas=CPU_SDPA_FLOP_FORMULAS if fused else {},
        analytic_flops=_flops,
        analytic_bytes=lambda p: swin_bytes(p, shifted, fused),
    )
    def build(problem: Problem) -> nn.Module:
        return SwinWindowAttention(
            problem.channels, problem.heads, problem.height, problem.width, problem.window, shifted, fused
        )


_register("swin", shifted=False, fused=False)
_register("swin_fused", shifted=False, fused=True)
_register("swin_shifted", shifted=True, fused=False)
_register("swin_shifted_fused", shifted=True, fused=True)
