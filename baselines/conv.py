"""Convolutional peers: dense and depthwise k×k convolutions (NCHW input in channels_last memory format)."""

from __future__ import annotations

import torch
from torch import nn

from qna_bench.measure.traffic import traffic_bytes
from qna_bench.problem import Problem
from qna_bench.registry import register_layer


def same_conv2d(channels: int, window: int, stride: int, dilation: int, groups: int) -> nn.Conv2d:
    """A C→C k×k convolution padded to keep the map size (at stride 1), weights in channels_last."""
    conv = nn.Conv2d(
        channels, channels, window, stride=stride, padding=dilation * (window - 1) // 2, dilation=dilation, groups=groups
    )
    return conv.to(memory_format=torch.channels_last)


class ChannelsLastConv(nn.Module):
    """A k×k "same" convolution whose weights and input use the channels_last memory format."""

    def __init__(self, channels: int, window: int, stride: int, dilation: int, groups: int):
        super().__init__()
        self.conv = same_conv2d(channels, window, stride, dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def conv_flops(problem: Problem, groups: int) -> int:
    """2 × multiply-adds of the convolution (bias adds not counted, as FlopCounterMode does)."""
    out_h, out_w = problem.output_hw
    per_output = problem.window * problem.window * problem.channels // groups
    forward = 2 * problem.batch * out_h * out_w * problem.channels * per_output
    # Backward: the input gradient and the weight gradient each cost one forward.
    return forward * (3 if problem.mode == "train" else 1)


def conv_bytes(problem: Problem, groups: int) -> int:
    """Input, weights and bias read, output written; nothing in between."""
    out_h, out_w = problem.output_hw
    c = problem.channels
    return traffic_bytes(
        problem,
        inputs=problem.batch * problem.height * problem.width * c,
        params=c * (c // groups) * problem.window**2 + c,
        outputs=problem.batch * out_h * out_w * c,
    )


_CONV = dict(role="baseline", family="conv", layout="nchw_channels_last", odd_window=True,
             cost_grows_with_window=True, padded_convolution=True)


@register_layer(
    "conv_dense",
    implementation="torch.nn.Conv2d, channels_last",
    description="dense k×k convolution, C→C channels",
    analytic_flops=lambda p: conv_flops(p, groups=1),
    analytic_bytes=lambda p: conv_bytes(p, groups=1),
    **_CONV,
)
def build_conv_dense(problem: Problem) -> nn.Module:
    return ChannelsLastConv(problem.channels, problem.window, problem.stride, problem.dilation, groups=1)


@register_layer(
    "conv_dw",
    implementation="torch.nn.Conv2d groups=C, channels_last",
    description="depthwise k×k convolution",
    analytic_flops=lambda p: conv_flops(p, groups=p.channels),
    analytic_bytes=lambda p: conv_bytes(p, groups=p.channels),
    **_CONV,
)
def build_conv_dw(problem: Problem) -> nn.Module:
    return ChannelsLastConv(problem.channels, problem.window, problem.stride, problem.dilation, groups=problem.channels)
