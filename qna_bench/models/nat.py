"""NAT-Tiny (Neighborhood Attention Transformer, arXiv 2204.07143) from `natten.NeighborhoodAttention2D`.

The published NAT-Tiny configuration (SHI-Labs NAT repo, ``classification/nat.py``, ``nat_tiny``):
an overlapping convolutional tokenizer (two 3×3 stride-2 convolutions, 3 → 32 → 64, then LayerNorm),
four levels of depths 3 / 4 / 18 / 5, widths 64 / 128 / 256 / 512, heads 2 / 4 / 8 / 16, 7×7
neighbourhoods, MLP ratio 3, pre-LN blocks; between levels a 3×3 stride-2 convolution (no bias) and
LayerNorm; head: LayerNorm, global average pool, Linear. Random initialisation (NAT's: truncated
normal 0.02 for Linears).

One deviation: natten 0.21's `NeighborhoodAttention2D` has no relative position bias (NATTEN dropped
it), so the model lacks NAT's ``rpb`` tables (41,574 parameters of 28M; no multiply-adds).
Maps smaller than the 7×7 neighbourhood (images under 224²) are zero padded at the bottom/right
before the attention and cropped after it, as the original NAT module did.

On CPU natten runs through torch's eager flex attention: forward only (no CPU backward), and the full
(H·W)² score matrix is computed and masked, not the H·W·49 scores a fused kernel computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from natten import NeighborhoodAttention2D
from natten.backends import choose_backend
from torch import Tensor, nn

from baselines._common import natten_call


@dataclass(frozen=True)
class NATConfig:
    dim: int = 64
    depths: tuple[int, ...] = (3, 4, 18, 5)
    heads: tuple[int, ...] = (2, 4, 8, 16)
    kernel: int = 7
    mlp_ratio: int = 3

    def widths(self) -> list[int]:
        return [self.dim * 2**level for level in range(len(self.depths))]


NAT_TINY = NATConfig()

# What the registry's `unsupported` hook reports for training on CPU: natten's own words.
CPU_BACKWARD_REASON = (
    "natten on CPU: FlexAttention does not support backward on CPU "
    "(natten 0.21 has no CPU kernels; its only CPU backend is torch's flex attention, forward only)"
)


class NeighborhoodMixer(nn.Module):
    """`natten.NeighborhoodAttention2D` on (B, H, W, C), padded up to the kernel size on small maps."""

    def __init__(self, dim: int, heads: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.attn = NeighborhoodAttention2D(dim, heads, kernel_size=kernel)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1:3]
        pad_h, pad_w = max(self.kernel - height, 0), max(self.kernel - width, 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        with natten_call(x):
            x = self.attn(x)
        return x[:, :height, :width] if pad_h or pad_w else x

    def backend(self, x: Tensor) -> str:
        """The backend natten picks for this (channels-last) input, by natten's own rule."""
        attn = self.attn
        q = x.new_empty(x.shape[0], max(x.shape[1], self.kernel), max(x.shape[2], self.kernel), attn.num_heads, attn.head_dim)
        return choose_backend(q, q, q, torch_compile=False)


class NATBlock(nn.Module):
    """``x + NA(LN(x))``, then ``x + MLP(LN(x))`` (exact GELU, PyTorch's LayerNorm eps as in NAT)."""

    def __init__(self, dim: int, heads: int, kernel: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodMixer(dim, heads, kernel)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvDown(nn.Module):
    """A 3×3 stride-2 convolution (no bias) on (B, H, W, C), then LayerNorm: NAT's downsampler."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NAT(nn.Module):
    """NAT on images (B, 3, H, W) → logits (B, classes)."""

    def __init__(self, config: NATConfig = NAT_TINY, num_classes: int = 1000):
        super().__init__()
        self.config = config
        dim = config.dim
        self.tokenizer = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, stride=2, padding=1), nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        )
        self.tokenizer_norm = nn.LayerNorm(dim)
        levels: list[nn.Module] = []
        widths = config.widths()
        for level, (width, depth, heads) in enumerate(zip(widths, config.depths, config.heads)):
            levels += [NATBlock(width, heads, config.kernel, config.mlp_ratio) for _ in range(depth)]
            if level < len(widths) - 1:
                levels.append(ConvDown(width, widths[level + 1]))
        self.levels = nn.Sequential(*levels)
        self.norm = nn.LayerNorm(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward_features(self, images: Tensor) -> Tensor:
        x = self.tokenizer_norm(self.tokenizer(images).permute(0, 2, 3, 1))
        return self.levels(x)

    def forward(self, images: Tensor) -> Tensor:
        x = self.norm(self.forward_features(images))
        return self.head(x.mean(dim=(1, 2)))

    def first_mixer(self) -> NeighborhoodMixer:
        return next(m for m in self.modules() if isinstance(m, NeighborhoodMixer))


def _down(size: int) -> int:
    """Output length of a 3×3 stride-2 convolution with padding 1."""
    return math.ceil(size / 2)


def nat_macs(config: NATConfig, height: int, width: int, num_classes: int = 1000, dense_attention: bool = False) -> int:
    """Multiply-adds of one image's forward, in `FlopCounterMode`'s conventions (matmuls and
    convolutions only). Attention counts ``2·k²·C`` per token (QKᵀ and AV over the k×k neighbourhood,
    as the NAT paper counts); ``dense_attention`` counts ``2·(H·W)·C`` instead, what eager flex
    attention on CPU actually computes. Maps under k×k count at their padded size."""
    dim, k = config.dim, config.kernel
    h, w = _down(height), _down(width)
    macs = h * w * (dim // 2) * 3 * 9
    h, w = _down(h), _down(w)
    macs += h * w * dim * (dim // 2) * 9
    widths = config.widths()
    for level, (c, depth) in enumerate(zip(widths, config.depths)):
        tokens = h * w
        padded = max(h, k) * max(w, k)
        keys = padded if dense_attention else k * k
        block = padded * 4 * c * c + 2 * padded * keys * c + tokens * 2 * config.mlp_ratio * c * c
        macs += depth * block
        if level < len(widths) - 1:
            h, w = _down(h), _down(w)
            macs += h * w * widths[level + 1] * c * 9
    return macs + widths[-1] * num_classes
