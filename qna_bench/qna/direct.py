"""Direct depthwise convolutions on (B, H, W, C) tensors, their input and kernel gradients.

Permuting to NCHW gives a channels_last view, the fast layout for depthwise convolution on CPU, and
the results permute back without a copy. A plan's ``convolutions="padded"`` runs a stride-1 window k
through the zero-padded kernel of k + 2: the same cross-correlation through another oneDNN kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qna_bench.qna.plans import ConvForm

# The taps a padded convolution adds on each side of its kernel.
PADDED_MARGIN = 1


def convolution_window(window: int, stride: int, form: ConvForm) -> int:
    """The window a direct convolution of ``window`` runs at under a plan's ``convolutions`` form."""
    return window + 2 * PADDED_MARGIN if form == "padded" and stride == 1 else window


def _padded_kernel(kernel: Tensor, stride: int, padding: int, form: ConvForm) -> tuple[Tensor, int]:
    """``kernel`` zero-padded to `convolution_window`, and the matching padding."""
    margin = (convolution_window(kernel.shape[-1], stride, form) - kernel.shape[-1]) // 2
    if margin == 0:
        return kernel, padding
    return F.pad(kernel, (margin, margin, margin, margin)), padding + margin


def depthwise_conv(x: Tensor, kernel: Tensor, stride: int, padding: int, form: ConvForm = "direct") -> Tensor:
    """Depthwise cross-correlation of ``x`` (B, H, W, C) with ``kernel`` (C, 1, k, k) -> (B, H', W', C)."""
    kernel, padding = _padded_kernel(kernel, stride, padding, form)
    out = F.conv2d(x.permute(0, 3, 1, 2), kernel, stride=stride, padding=padding, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1).contiguous()


def depthwise_conv_input_grad(
    grad_out: Tensor, kernel: Tensor, size: tuple[int, int], stride: int, padding: int, form: ConvForm = "direct"
) -> Tensor:
    """Gradient of `depthwise_conv` w.r.t. its input, (B, H, W, C), from ``grad_out`` (B, H', W', C).

    Stride 1: the same convolution with the flipped kernel (faster than the transposed convolution at
    large windows on CPU). Stride 2: the transposed convolution, with the output padding that restores
    ``size``.
    """
    g = grad_out.permute(0, 3, 1, 2)
    channels = grad_out.shape[-1]
    if stride == 1:
        kernel, padding = _padded_kernel(kernel.flip(-2, -1), stride, padding, form)
        grad_x = F.conv2d(g, kernel, padding=padding, groups=channels)
    else:
        window = kernel.shape[-1]
        output_padding = [
            n - ((m - 1) * stride - 2 * padding + window) for n, m in zip(size, grad_out.shape[1:3])
        ]
        grad_x = F.conv_transpose2d(
            g, kernel, stride=stride, padding=padding, output_padding=output_padding, groups=channels
        )
    return grad_x.permute(0, 2, 3, 1).contiguous()


def depthwise_weight_grad_direct(x: Tensor, grad_out: Tensor, window: int, stride: int, padding: int) -> Tensor:
    """Kernel gradient of `depthwise_conv`, (C, 1, k, k), by PyTorch's own convolution backward."""
    channels = x.shape[-1]
    return torch.ops.aten.convolution_backward(
        grad_out.permute(0, 3, 1, 2),
        x.permute(0, 3, 1, 2),
        x.new_empty(channels, 1, window, window),
        None,
        [stride, stride],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        channels,
        [False, True, False],
    )[1]


# The backward's per-query temporaries (E*V, its numerator, their gradients, in `qna_bench.qna.core`) are made this many bytes
# at most, a slice of the batch at a time (whole samples, at least one): at B=8, 56x56, C=128 (fp32) two
# whole-batch temporaries of 12.25 MiB set the train peak at 80.2 MiB, 18% over the 68.0 MiB of the FFT
# plans, whose spectra come in chunks.
BACKWARD_CHUNK_BYTES = 8 << 20


def batch_chunks(batch: int, sample_bytes: int) -> list[slice]:
    """Slices of the batch, each at most `BACKWARD_CHUNK_BYTES` of one temporary (at least one sample)."""
    per_chunk = max(1, BACKWARD_CHUNK_BYTES // max(1, sample_bytes))
    return [slice(start, min(batch, start + per_chunk)) for start in range(0, batch, per_chunk)]
