"""ConvNeXt-style convolutional token mixer: pointwise projection, depthwise k×k convolution, pointwise
projection, in channels_last — the convolutional peer with a parameter budget close to QnA's."""

from __future__ import annotations

import torch
from torch import nn

from baselines.conv import same_conv2d
from qna_bench.measure.traffic import traffic_bytes
from qna_bench.problem import Problem
from qna_bench.registry import register_layer


class ConvNeXtMixer(nn.Module):
    """(B, H, W, C) → Linear → depthwise k×k conv → Linear → (B, H', W', C).

    The NHWC tensor permuted to (B, C, H, W) is already channels_last in memory, so the depthwise
    convolution runs channels_last with no copy (contiguous NCHW falls off a cliff at k ≥ 15 on CPU).
    """

    def __init__(self, channels: int, window: int, stride: int, dilation: int):
        super().__init__()
        self.pw_in = nn.Linear(channels, channels)
        self.dw = same_conv2d(channels, window, stride, dilation, groups=channels)
        self.pw_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.dw(self.pw_in(x).permute(0, 3, 1, 2))
        return self.pw_out(mixed.permute(0, 2, 3, 1))


def convnext_flops(problem: Problem) -> int:
    """2 × multiply-adds (biases not counted, as FlopCounterMode does); train mode 3×."""
    out_h, out_w = problem.output_hw
    c = problem.channels
    pixels, out_pixels = problem.batch * problem.height * problem.width, problem.batch * out_h * out_w
    macs = pixels * c * c + out_pixels * c * problem.window**2 + out_pixels * c * c
    return 2 * macs * (3 if problem.mode == "train" else 1)


def convnext_bytes(problem: Problem) -> int:
    """The two pointwise outputs' inputs (the first projection's and the depthwise convolution's
    outputs) are written and read back."""
    out_h, out_w = problem.output_hw
    c = problem.channels
    pixels, out_pixels = problem.batch * problem.height * problem.width, problem.batch * out_h * out_w
    return traffic_bytes(
        problem,
        inputs=pixels * c,
        params=2 * (c * c + c) + c * problem.window**2 + c,
        outputs=out_pixels * c,
        intermediates=(pixels * c, out_pixels * c),
    )


@register_layer(
    "convnext_mixer",
    forms=("gemm",),
    role="baseline",
    family="conv",
    cost_grows_with_window=True,
    implementation="torch: Linear, Conv2d groups=C (channels_last), Linear",
    layout="nhwc",
    odd_window=True,
    description=(
        "ConvNeXt-style mixer: pointwise, depthwise kxk, pointwise; 2C²+(k²+3)C parameters vs QnA's "
        "3C²+2C+4hk² (C=128, h=4, k=7: 39,424 vs 50,192)"
    ),
    analytic_flops=convnext_flops,
    analytic_bytes=convnext_bytes,
)
def build_convnext_mixer(problem: Problem) -> nn.Module:
    return ConvNeXtMixer(problem.channels, problem.window, problem.stride, problem.dilation)
