"""QnA-ViT (arXiv 2112.11435) in PyTorch, built from `qna_bench.qna.QnA`, for model-level benchmarks.

The layout follows the official Flax model (repo moabarar/qna, ``models/qna_vit.py``, ``qna_vit_tiny``
and ``qna_vit_tiny_7x7``); the code is ours. Every stage is: its window self-attention (LSA) blocks,
then its QnA blocks, then, except in the last stage, one downsampling QnA block (stride 2, twice the
features and heads) whose skip path is a 1×1 stride-2 projection. Blocks are pre-LN,
``x + mix(LN(x))`` then ``x + MLP(LN(x))`` with MLP ratio 4 (of the block's output width).

==========  =======  =========  ==========  =========  =========  =================================
stage       width    map @224   LSA blocks  LSA (M,h)  QnA blocks QnA heads (d = 8), then downsample
==========  =======  =========  ==========  =========  =========  =================================
1           64       56×56      0           —          2          8,  down → 128 ch, 16 heads
2           128      28×28      0           —          3          16, down → 256 ch, 32 heads
3           256      14×14      4           (14, 8)    2          32, down → 512 ch, 64 heads
4           512      7×7        2           (7, 16)    0          —
==========  =======  =========  ==========  =========  =========  =================================

Stem: a 4×4 stride-4 convolution (3 → 64, no bias, "SAME" padding, no norm). Head: LayerNorm, global
average pool, Linear → classes. LSA windows are non-overlapping and unshifted; at 224² the stage-3
window (14) covers the whole 14×14 map. Official details kept: LayerNorm eps 1e-6, tanh-approximated
GELU (Flax's default), no biases in QnA and LSA projections, biases in the MLPs and the classifier, a
Swin-style relative position bias table in every LSA block. Drop path is left out (speed-neutral).
Initialisation is random (PyTorch defaults; QnA's own official initialisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qna_bench.qna import QnA, qna_output_size

LAYER_NORM_EPS = 1e-6  # Flax's LayerNorm default, which the official model uses


@dataclass(frozen=True)
class QnAViTConfig:
    """One QnA-ViT variant, per stage (the official config's field names in comments)."""

    dim: int = 64  # base_dim: width of stage 1, doubled by each downsampling block
    qna_heads: tuple[int, ...] = (8, 16, 32, 64)  # qna_heads
    qna_blocks: tuple[int, ...] = (2, 3, 2, 0)  # qna_layers (stride-1 QnA blocks)
    qna_window: tuple[int, ...] = (3, 3, 3, 3)  # qna_receptive_field (also the downsampling QnA's)
    lsa_blocks: tuple[int, ...] = (0, 0, 4, 2)  # lsa_layers
    lsa_window: tuple[int, ...] = (7, 7, 14, 7)  # lsa_window
    lsa_heads: tuple[int, ...] = (2, 4, 8, 16)  # lsa_heads
    num_queries: int = 2  # qna_num_queries
    mlp_ratio: int = 4
    patch_size: int = 4

    @property
    def stages(self) -> int:
        return len(self.qna_blocks)

    def widths(self) -> list[int]:
        return [self.dim * 2**stage for stage in range(self.stages)]


QNA_VIT_TINY = QnAViTConfig()
QNA_VIT_TINY_7X7 = replace(QNA_VIT_TINY, qna_window=(7, 7, 7, 7))


class Mlp(nn.Sequential):
    """Linear → GELU (tanh approximation, as Flax's ``nn.gelu``) → Linear, with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class StridedSkip(nn.Module):
    """The downsampling block's skip path: a 1×1 stride-2 convolution without bias, on (B, H, W, C).

    A 1×1 kernel with stride 2 and no padding reads pixel (2i, 2j) only, so it is a Linear on the
    strided view; its output size ``ceil(H / 2)`` matches the stride-2 QnA's."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x[:, ::2, ::2])


class Block(nn.Module):
    """Pre-LN block: ``skip(x) + mixer(LN(x))``, then ``x + MLP(LN(x))``, on channels-last tensors."""

    def __init__(self, mixer: nn.Module, in_dim: int, out_dim: int, mlp_ratio: int, skip: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=LAYER_NORM_EPS)
        self.mixer = mixer
        self.skip = skip
        self.norm2 = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(out_dim, mlp_ratio * out_dim)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        x = shortcut + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@lru_cache(maxsize=32)
def _relative_position_index(window: int, height: int, width: int) -> Tensor:
    """(h·w, h·w) indices into a ((2·window − 1)², heads) bias table for an h×w window (h, w ≤ window)."""
    # Cached across calls, so never an inference tensor: a later training step saves it for backward.
    with torch.inference_mode(False):
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        delta_rows = rows[:, None] - rows[None, :] + window - 1
        delta_cols = cols[:, None] - cols[None, :] + window - 1
        return delta_rows * (2 * window - 1) + delta_cols


class WindowSelfAttention(nn.Module):
    """Multi-head self-attention inside each window, with a relative position bias.

    Input and output are windows (N, h, w, C) with h, w ≤ ``window`` (a map smaller than the nominal
    window gets one window the size of the map). Projections have no bias, as in the official
    ``MultiHeadSelfAttention``; its fused qkv layout (per head: q, k, v) is kept. ``fused`` runs
    `F.scaled_dot_product_attention`, otherwise explicit matmuls and softmax (timm's Swin default).
    """

    def __init__(self, dim: int, heads: int, window: int, fused: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads}: must divide dim={dim}")
        self.heads = heads
        self.head_dim = dim // heads
        self.window = window
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # Zero-initialised, as the official RelativePositionalEmbedding is in QnA-ViT.
        self.relative_position_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.proj = nn.Linear(dim, dim, bias=False)

    def position_bias(self, height: int, width: int) -> Tensor:
        index = _relative_position_index(self.window, height, width).to(self.relative_position_bias.device)
        tokens = height * width
        return self.relative_position_bias[index.flatten()].view(tokens, tokens, self.heads).permute(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        windows, height, width, dim = x.shape
        tokens = height * width
        qkv = self.qkv(x).view(windows, tokens, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # (N, heads, tokens, d) each
        bias = self.position_bias(height, width).to(x.dtype)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + bias
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(windows, height, width, dim))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, window={self.window}, fused={self.fused}"


def window_shape(window: int, height: int, width: int) -> tuple[int, int]:
    """The window actually used on an H×W map: the nominal one, clamped to the map."""
    return min(window, height), min(window, width)


def window_errors(window: int, height: int, width: int) -> list[str]:
    """Why an H×W map cannot be split into windows of this size (empty when it can)."""
    wh, ww = window_shape(window, height, width)
    if height % wh or width % ww:
        return [f"a {height}×{width} map does not split into {wh}×{ww} windows"]
    return []


class WindowStage(nn.Module):
    """The LSA blocks of one stage: partition into windows once, run every block, merge back."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: int, fused: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.Sequential(
            *(Block(WindowSelfAttention(dim, heads, window, fused), dim, dim, mlp_ratio) for _ in range(depth))
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        errors = window_errors(self.window, height, width)
        if errors:
            raise ValueError(f"x.shape={tuple(x.shape)}: {errors[0]} (window={self.window})")
        wh, ww = window_shape(self.window, height, width)
        x = x.view(batch, height // wh, wh, width // ww, ww, dim).transpose(2, 3).reshape(-1, wh, ww, dim)
        x = self.blocks(x)
        x = x.view(batch, height // wh, width // ww, wh, ww, dim).transpose(2, 3)
        return x.reshape(batch, height, width, dim)


class QnAStage(nn.Sequential):
    """One stage: its LSA blocks, its QnA blocks, and (unless last) the downsampling QnA block."""

    def __init__(self, config: QnAViTConfig, stage: int, downsample: bool, fused_attention: bool):
        dim, heads, window = config.widths()[stage], config.qna_heads[stage], config.qna_window[stage]
        ratio, queries = config.mlp_ratio, config.num_queries
        parts: list[nn.Module] = []
        if config.lsa_blocks[stage]:
            parts.append(
                WindowStage(
                    dim, config.lsa_blocks[stage], config.lsa_heads[stage], config.lsa_window[stage], ratio, fused_attention
                )
            )
        for _ in range(config.qna_blocks[stage]):
            parts.append(Block(QnA(dim, dim, heads, window, 1, queries), dim, dim, ratio))
        if downsample:
            mixer = QnA(dim, 2 * dim, 2 * heads, window, 2, queries)
            parts.append(Block(mixer, dim, 2 * dim, ratio, skip=StridedSkip(dim, 2 * dim)))
        super().__init__(*parts)


class QnAViT(nn.Module):
    """QnA-ViT on images (B, 3, H, W) → logits (B, classes)."""

    def __init__(self, config: QnAViTConfig = QNA_VIT_TINY, num_classes: int = 1000, fused_attention: bool = False):
        super().__init__()
        self.config = config
        self.stem = nn.Conv2d(3, config.dim, config.patch_size, stride=config.patch_size, bias=False)
        self.stages = nn.Sequential(
            *(QnAStage(config, s, downsample=s < config.stages - 1, fused_attention=fused_attention) for s in range(config.stages))
        )
        width = config.widths()[-1]
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, images: Tensor) -> Tensor:
        """The last stage's map, channels-last (B, H/32, W/32, C)."""
        # Flax's "SAME" padding: only when the image does not divide into patches, the extra low-side.
        patch = self.config.patch_size
        pad_h, pad_w = (-images.shape[-2]) % patch, (-images.shape[-1]) % patch
        if pad_h or pad_w:
            images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        # A channels_last stem output permutes to (B, H, W, C) without a copy.
        x = self.stem(images.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        return self.stages(x)

    def forward(self, images: Tensor) -> Tensor:
        x = self.norm(self.forward_features(images))
        return self.head(x.mean(dim=(1, 2)))


def stage_maps(config: QnAViTConfig, height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of each stage's input map for an H×W image."""
    size = (math.ceil(height / config.patch_size), math.ceil(width / config.patch_size))
    maps = [size]
    for stage in range(config.stages - 1):
        window = config.qna_window[stage]
        size = (qna_output_size(size[0], window, 2), qna_output_size(size[1], window, 2))
        maps.append(size)
    return maps


def image_errors(config: QnAViTConfig, height: int, width: int) -> list[str]:
    """Why an H×W image does not fit this QnA-ViT's windows (the official code asserts the same)."""
    errors = []
    for stage, (h, w) in enumerate(stage_maps(config, height, width)):
        if config.lsa_blocks[stage]:
            errors += [f"stage {stage + 1}: {e}" for e in window_errors(config.lsa_window[stage], h, w)]
    return errors


def qna_vit_macs(config: QnAViTConfig, height: int, width: int, num_classes: int = 1000) -> int:
    """Multiply-adds of one image's forward, counted as `FlopCounterMode` counts: matmuls and
    convolutions (QnA's windowed sums are two depthwise convolutions), no norms, softmax or GELU."""
    patch, queries, ratio = config.patch_size, config.num_queries, config.mlp_ratio
    maps = stage_maps(config, height, width)
    macs = maps[0][0] * maps[0][1] * config.dim * 3 * patch * patch  # stem

    def qna(c_in: int, features: int, heads: int, window: int, tokens_in: int, tokens_out: int) -> int:
        return (
            c_in * features * queries  # the folded key-query weights W_k q̂ (once per call)
            + tokens_in * c_in * queries * heads  # scores
            + tokens_in * c_in * features  # values
            + tokens_out * queries * (features + heads) * window**2  # numerator and denominator windows
            + tokens_out * features * features  # output projection
        )

    for stage, (c, (h, w)) in enumerate(zip(config.widths(), maps)):
        tokens = h * w
        wh, ww = window_shape(config.lsa_window[stage], h, w)
        lsa = tokens * 4 * c * c + 2 * tokens * wh * ww * c + tokens * 2 * ratio * c * c
        macs += config.lsa_blocks[stage] * lsa
        heads, window = config.qna_heads[stage], config.qna_window[stage]
        block = qna(c, c, heads, window, tokens, tokens) + tokens * 2 * ratio * c * c
        macs += config.qna_blocks[stage] * block
        if stage < config.stages - 1:
            out_tokens = maps[stage + 1][0] * maps[stage + 1][1]
            macs += (
                qna(c, 2 * c, 2 * heads, window, tokens, out_tokens)
                + out_tokens * c * 2 * c  # the 1×1 stride-2 skip
                + out_tokens * 2 * ratio * (2 * c) ** 2  # MLP
            )
    return macs + config.widths()[-1] * num_classes
