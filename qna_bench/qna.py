"""The QnA layer ("Learned Queries for Efficient Local Attention", arXiv 2112.11435) in PyTorch.

`QnA` holds the parameters; its ``impl`` attribute picks the fast form (two depthwise convolutions
with a custom backward, `qna_attention`) or the naive reference form that unfolds every window
(`qna_attention_reference`, for tests). Both forms share the same parameters. The fast form's
convolutions run directly, or on CPU as FFT convolutions where measured faster (`FFT_CONV_MIN_WINDOW`,
`FFT_WEIGHT_GRAD_MIN_WINDOW`) and where the data let an FFT resolve them (`FFT_RESOLVED_RATIO`).

Mapping from the official Flax ``FusedKQnA`` (repo moabarar/qna, ``layers/qna.py``). Flax dense
kernels are (in, out); the convolution-shaped tensors are HWIO; the official channel index of the
query/head axis is ``n * heads + head`` (query-major) and the feature index is ``head * d + i``:

==========================  =====================================  ==========================================
official parameter          official shape                         ours
==========================  =====================================  ==========================================
``query``                   (Nq, F)                                ``query`` (Nq, h, d) = reshape
``Wk``                      (C_in, F)                              ``key_weight`` (C_in, h, d) = reshape
``Wk_b`` (use_bias only)    (h, d)                                 dropped: adds a constant per query and head
                                                                   to every logit of a window, so it cancels
                                                                   exactly in the softmax
``to_v/kernel``, ``bias``   (C_in, F), (F,)                        ``value_proj.weight`` = kernel.T, ``.bias``
``rpe_bias``                (k*k, Nq*h)                            ``rpe_bias`` (Nq, h, k, k):
                                                                   ``reshape(k, k, Nq, h).permute(2, 3, 0, 1)``
``attn_scale_weights``      (1, 1, k*k, Nq*h)                      ``query_mixing`` (Nq, h, k, k): same as rpe
``to_out/kernel``, ``bias`` (F, F_out), (F_out,)                   ``out_proj.weight`` = kernel.T, ``.bias``
==========================  =====================================  ==========================================

`QnA.load_official_params` applies this mapping to a (nested or '/'-flattened) dict of arrays.
Only the released configuration is covered: relative position bias, ``attn_scale='normal'``,
``padding = (k - 1) // 2``, ``scale_rpe_bias=False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "FFT_CONV_MIN_WINDOW",
    "FFT_RESOLVED_RATIO",
    "FFT_WEIGHT_GRAD_MIN_WINDOW",
    "IMPLS",
    "PADDED_WINDOWS",
    "STRIDES",
    "TUNED_ON",
    "UNDERFLOW_DENOMINATOR",
    "QnA",
    "qna_attention",
    "qna_attention_reference",
    "convolution_window",
    "fft_lengths",
    "qna_output_size",
    "tuned_thresholds",
    "uses_fft_convolutions",
    "uses_fft_weight_grad",
]

Impl = Literal["fast", "reference"]
IMPLS: tuple[str, ...] = ("fast", "reference")
STRIDES: tuple[int, ...] = (1, 2)

# Kernel gradients of the depthwise convolutions on CPU: from this window size on (keyed by stride) they
# are FFT cross-correlations, below it PyTorch's own convolution backward. Measured on the 2-core CPU
# (B=8, 56x56, fp32, min CPU time of one thread, ms), one query's 128 channels, native vs FFT:
#   stride 1: k=3 2.4 vs 32, k=5 28 vs 29, k=7 48 vs 29, k=9 74 vs 31, k=13 144 vs 29, k=15 840 vs 34
#   stride 2: k=5 9.6 vs 28, k=9 22 vs 25, k=11 31 vs 23, k=13 43 vs 23, k=15 215 vs 23, k=31 906 vs 38
# and a whole QnA(128, 128, 4) forward + backward with either path:
#   stride 1: k=3 117 vs 176, k=5 172 vs 179, k=7 227 vs 200, k=9 291 vs 207
#   stride 2: k=7 102 vs 124, k=9 122 vs 130, k=11 148 vs 133, k=13 182 vs 146
# Checked with AVX2 (2-core AMD EPYC, 2 threads, 2026-11-30, QnA(128, 128, 4) train, best of 3 in 2
# rounds, ms): stride 1 k=3 145 vs 262, k=5 258 vs 256, k=7 272 vs 233, k=9 322 vs 295: the same threshold.
FFT_WEIGHT_GRAD_MIN_WINDOW: dict[int, int] = {1: 7, 2: 11}

# The machine the thresholds below were measured on; the report prints it with `tuned_thresholds()`.
TUNED_ON = ("2-core AMD EPYCs, torch 2.14.1 CPU, fp32, B=8, 56x56, C=128, 4 heads: FFT kernel gradients on Zen 4 "
            "(AVX-512), checked with AVX2; padded windows with AVX-512 and AVX2; FFT convolutions with AVX2")

# Stride-1 depthwise convolutions on CPU whose window k runs through the zero-padded kernel of a larger
# window (an exact rewrite), keyed by the CPU's instruction set (torch's `get_cpu_capability()`) and
# torch's thread count, then by k. With AVX-512 and 2 threads (B=8, 56x56, C=128, fp32, 2026-11-30),
# oneDNN's depthwise forward took 20 ms at k=13 against 9.9 ms at k=15, and QnA inherited the dip
# (forward 56.8 ms at k=13, 38.1 ms at k=15; train 257 vs 178); with 1 thread there was no dip (CPU time
# under load: k=13 37 ms, k=15 56 ms). With AVX2 and 2 threads (same problem, a quiet 2-core EPYC,
# 2026-11-30, median of 5 interleaved rounds' best of 3) padding makes QnA slower: k=13 forward 138 ms
# unpadded, 156 padded, 153 at k=15; train 396, 468, 478. Set {} to turn it off.
PADDED_WINDOWS: dict[tuple[str, int], dict[int, int]] = {("AVX512", 2): {13: 15}}

# The numerators' stride-1 depthwise convolutions on CPU, keyed by the CPU's instruction set (torch's
# `get_cpu_capability()`) and by pass: from these windows on they run as FFT convolutions, the backward's
# three (the numerator again, its input and its kernel gradient) sharing two spectra per chunk
# (`_fft_numerators`, `_fft_numerator_grads`); the Nq*h-channel denominators stay direct. Measured with
# AVX2 and 2 threads on a quiet 2-core AMD EPYC (2026-11-30, torch 2.14.1, fp32, QnA(128, 128, 4), 2
# queries, median over 3-5 interleaved rounds of the best of 3 calls, ms), direct vs FFT:
#   forward, B=8 56x56: k=11 72 vs 103, k=13 85 vs 99, k=15 104 vs 103, k=17 125 vs 103, k=19 151 vs 120
#   train (forward direct), B=8 56x56: k=7 288 vs 297, k=9 342 vs 298, k=11 353 vs 352, k=13 381 vs 332,
#     k=15 429 vs 336; B=2 112x112: k=9 310 vs 309, k=11 348 vs 299, k=13 444 vs 343
#   train again with 2 MiB chunks and the FFT lengths of `_FFT_ODD_PARTS` (5 rounds), FFT backward from
#     k=5 or 7 against from 9: B=8 56x56 k=5 258 vs 230, k=7 266 vs 299; B=2 112x112 k=5 252 vs 278,
#     k=7 274 vs 330; forward, FFT from k=13 against direct (5 rounds): B=8 56x56 k=13 111 vs 113,
#     k=15 91 vs 96; B=2 112x112 k=13 99 vs 92, k=15 95 vs 105
# One depthwise convolution of 128 channels (B=8, 56x56): oneDNN k=7 8.8 ms, k=13 23, k=21 68, k=31 140;
# FFT 35-58 at any k. AVX-512 is absent: there oneDNN's depthwise convolutions ran ~4x faster (179
# GFLOP/s at k=31, facts.md) and no crossover was measured.
FFT_CONV_MIN_WINDOW: dict[str, dict[str, int]] = {"AVX2": {"forward": 15, "backward": 7}}

# An FFT convolution's rounding error is relative to the largest value of the whole image, a direct
# one's to each window's own sum. So the FFT paths (numerators and kernel gradients) run only where
# every image's denominators lie within this ratio of their max, per query and head (the error of an
# output pixel grows as the image's largest denominator over its own); elsewhere the direct paths run.
# In fp32 the FFT convolution's error is ~4e-7 of the image's largest value (measured above), so 2^-6
# keeps it near 2.5e-5 of the output's scale. Random inputs at init spread their logits by ~1.5 and
# pass; a window ~4 below its image's max does not.
FFT_RESOLVED_RATIO: dict[torch.dtype, float] = {torch.float32: 2.0**-6, torch.float64: 2.0**-12}

# Bytes of one chunk's spectrum in the FFT kernel gradients and numerators: the extra memory is a few
# such buffers, small next to the activations. AVX2, 2 threads, QnA(128, 128, 4), B=8, 56x56 (median of
# 3 rounds' best of 3, ms; train peak by `cpu_peak`, MiB): 0.5/1/2/4 MiB gave train 549/420/378/375 ms
# at k=31 and 397/369/305/303 at k=13; 2 MiB peaks at 78.7 (k=31) and 90.9 (k=3, direct), 4 MiB at
# 88.0 and 97.0 (k=9).
_FFT_CHUNK_BYTES = 1 << 21

# Denominators below this (per work dtype) mark a window whose logits all lie so far below the image's
# max that exp(s - m) has underflowed, or kept too few bits: `_recompute_windows` redoes those windows
# with their own max. 2^-64 is a window ~44 below the image's max in fp32: its terms are still normal
# numbers with ~2^-60 of headroom for the value and mixing factors of the numerator, and logits of the
# released models (normalised queries) never spread that far, so the normal case recomputes nothing.
UNDERFLOW_DENOMINATOR: dict[torch.dtype, float] = {torch.float32: 2.0**-64, torch.float64: 2.0**-600}



def tuned_thresholds() -> dict[str, object]:
    """QnA's machine-dependent choices as data, for reports: where each was measured (`TUNED_ON`)."""
    return {
        "tuned_on": TUNED_ON,
        "fft_weight_grad_min_window": dict(FFT_WEIGHT_GRAD_MIN_WINDOW),
        "fft_conv_min_window": dict(FFT_CONV_MIN_WINDOW),
        "fft_resolved_ratio": {str(k).removeprefix("torch."): v for k, v in FFT_RESOLVED_RATIO.items()},
        "fft_chunk_bytes": _FFT_CHUNK_BYTES,
        "padded_windows": {f"{isa}, {t} thread(s)": dict(w) for (isa, t), w in PADDED_WINDOWS.items()},
        "underflow_denominator": {str(k).removeprefix("torch."): v for k, v in UNDERFLOW_DENOMINATOR.items()},
    }


# The official query normalisation epsilon.
_QUERY_EPS = 1e-6


def qna_output_size(size: int, window: int, stride: int = 1) -> int:
    """Output length of one spatial axis: ``floor((size + 2p - window) / stride) + 1``, ``p = (window-1)/2``."""
    padding = (window - 1) // 2
    return (size + 2 * padding - window) // stride + 1


# --------------------------------------------------------------------------------------------------
# Depthwise convolutions on (B, H, W, C) tensors. Permuting to NCHW gives a channels_last view, which is
# the fast layout for depthwise convolution on CPU, and the results permute back without a copy.


def convolution_window(device_type: str, window: int, stride: int) -> int:
    """The window QnA's depthwise convolutions (not their kernel gradients) run at: ``window``, or the
    larger one `PADDED_WINDOWS` names for this CPU's instruction set and thread count (stride 1, CPU)."""
    if device_type != "cpu" or stride != 1:
        return window
    machine = (torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    return PADDED_WINDOWS.get(machine, {}).get(window, window)


def _padded_kernel(kernel: Tensor, stride: int, padding: int) -> tuple[Tensor, int]:
    """``kernel`` zero-padded to `convolution_window`, and the matching padding: the same
    cross-correlation, through a oneDNN kernel that runs faster on this machine."""
    window = kernel.shape[-1]
    margin = (convolution_window(kernel.device.type, window, stride) - window) // 2
    if margin == 0:
        return kernel, padding
    return F.pad(kernel, (margin, margin, margin, margin)), padding + margin


def _depthwise_conv(x: Tensor, kernel: Tensor, stride: int, padding: int) -> Tensor:
    """Depthwise cross-correlation of ``x`` (B, H, W, C) with ``kernel`` (C, 1, k, k) -> (B, H', W', C)."""
    kernel, padding = _padded_kernel(kernel, stride, padding)
    out = F.conv2d(x.permute(0, 3, 1, 2), kernel, stride=stride, padding=padding, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class _LazyGrad:
    """An output gradient ``a / b`` that is never materialised whole by the FFT kernel gradient.

    ``a`` is (B, H', W', G, D), ``b`` None or (B, H', W', G, 1); channel ``g * D + i`` of the gradient
    is ``a[..., g, i] / b[..., g, 0]``.
    """

    a: Tensor
    b: Tensor | None = None

    def write_channels(self, c0: int, c1: int, out: Tensor) -> None:
        """Write channels [c0, c1) into ``out`` (B, c1 - c0, H', W'), any strides."""
        if self.b is None:
            out.copy_(self.a.flatten(-2)[..., c0:c1].permute(0, 3, 1, 2))
            return
        group = self.a.shape[-1]
        for g in range(c0 // group, -(-c1 // group)):
            lo, hi = max(c0, g * group), min(c1, (g + 1) * group)
            src = self.a[..., g, lo - g * group : hi - g * group].permute(0, 3, 1, 2)
            # no out= here: torch.compile refuses non-contiguous out= tensors
            out[:, lo - c0 : hi - c0].copy_(src).div_(self.b[..., g, :].permute(0, 3, 1, 2))


# The odd parts of the FFT lengths QnA uses: 2^a times one of these. Measured with AVX2 and 2 threads
# (torch 2.14.1, MKL; rfft2 + irfft2 of 64 planes, median of 4 rounds' best of 5, ns per point):
# 60 320, 63 515, 64 253, 66 379, 70 362, 72 339, 75 551, 80 295; 120 1001, 125 1254, 126 1134,
# 128 1002, 135 1225, 140 1145, 144 1039. Odd parts with 5^2, 3^3 or 7 cost 10-60% more per point;
# QnA at 112x112 ran 30-40% slower at k=19-27 (length 125) than at k=29 (128).
_FFT_ODD_PARTS = (1, 3, 5, 9, 15)


def _fast_fft_len(n: int) -> int:
    """The smallest integer >= n of the form 2^a * m, m in `_FFT_ODD_PARTS`."""
    while True:
        m = n
        while m % 2 == 0:
            m //= 2
        if m in _FFT_ODD_PARTS:
            return n
        n += 1


def _depthwise_weight_grad_fft(
    x: Tensor, grad_out: _LazyGrad, out_size: tuple[int, int], window: int, stride: int, padding: int
) -> Tensor:
    """Kernel gradient of `_depthwise_conv` as an FFT cross-correlation summed over the batch.

    ``G[c, i, j] = sum_{b, o} grad_out[b, o, c] * x[b, stride * o + (i, j) - padding, c]`` with zeros
    outside ``x``. The output gradient is zero-stuffed onto the input grid (stride > 1), and the
    circular correlation has a period of at least ``size + padding`` so that the lags in
    ``[-padding, padding]`` never wrap onto data. Channels go in chunks through two reused zero-padded
    buffers, which bounds the extra memory and keeps the spectra in cache; ``grad_out`` is only asked
    for one chunk at a time. Returns (C, 1, k, k).
    """
    batch, height, width, channels = x.shape
    out_h, out_w = out_size
    n1, n2 = fft_lengths(height, width, window)
    # pocketfft has no half precision, cuFFT only for powers of two
    work_dtype = torch.promote_types(x.dtype, torch.float32)
    spectrum_bytes = batch * n1 * (n2 // 2 + 1) * 2 * torch.finfo(work_dtype).bits // 8
    chunk = max(1, min(channels, _FFT_CHUNK_BYTES // spectrum_bytes))
    x_buf = x.new_zeros(batch, chunk, n1, n2, dtype=work_dtype)
    g_buf = torch.zeros_like(x_buf)
    lags1, lags2 = _tap_lags(window, n1, x.device), _tap_lags(window, n2, x.device)
    stuffed_h, stuffed_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    grad_kernel = x.new_empty(channels, window, window, dtype=work_dtype)
    for c0 in range(0, channels, chunk):
        c1 = min(c0 + chunk, channels)
        xc, gc = x_buf[:, : c1 - c0], g_buf[:, : c1 - c0]
        xc[..., :height, :width] = x[..., c0:c1].permute(0, 3, 1, 2)
        grad_out.write_channels(c0, c1, gc[..., :stuffed_h:stride, :stuffed_w:stride])
        spectrum = torch.fft.rfft2(gc).conj_physical_()
        spectrum.mul_(torch.fft.rfft2(xc))
        corr = torch.fft.irfft2(spectrum.sum(0), s=(n1, n2))
        grad_kernel[c0:c1] = corr.index_select(1, lags1).index_select(2, lags2)
    return grad_kernel.to(x.dtype).unsqueeze(1)


def uses_fft_weight_grad(device_type: str, window: int, stride: int) -> bool:
    """Whether the kernel gradients go through the FFT (CPU, large windows) or PyTorch's own backward."""
    return device_type == "cpu" and window >= FFT_WEIGHT_GRAD_MIN_WINDOW.get(stride, 1 << 30)


def fft_lengths(height: int, width: int, window: int) -> tuple[int, int]:
    """The FFT lengths of QnA's FFT convolutions on a (height, width) input: at least size + padding,
    so that the lags in [-padding, padding] never wrap onto data."""
    padding = (window - 1) // 2
    return _fast_fft_len(height + padding), _fast_fft_len(width + padding)


def _depthwise_conv_input_grad(
    grad_out: Tensor, kernel: Tensor, size: tuple[int, int], stride: int, padding: int
) -> Tensor:
    """Gradient of `_depthwise_conv` w.r.t. its input, (B, H, W, C), from ``grad_out`` (B, H', W', C).

    Stride 1: the same convolution with the flipped kernel (faster than the transposed convolution at
    large windows on CPU). Stride 2: the transposed convolution, with the output padding that restores
    ``size``.
    """
    g = grad_out.permute(0, 3, 1, 2)
    channels = grad_out.shape[-1]
    if stride == 1:
        kernel, padding = _padded_kernel(kernel.flip(-2, -1), stride, padding)
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


def _depthwise_weight_grad_direct(
    x: Tensor, grad_out: Tensor, window: int, stride: int, padding: int
) -> Tensor:
    """Kernel gradient of `_depthwise_conv`, (C, 1, k, k), by PyTorch's own convolution backward."""
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


def uses_fft_convolutions(device_type: str, window: int, stride: int, direction: str = "forward") -> bool:
    """Whether the numerators' convolutions of the ``direction`` ("forward" or "backward") pass run as
    FFT convolutions (`FFT_CONV_MIN_WINDOW`), where the data allow it (`_fft_resolves`)."""
    if device_type != "cpu" or stride != 1:
        return False
    thresholds = FFT_CONV_MIN_WINDOW.get(torch.backends.cpu.get_cpu_capability(), {})
    return window >= thresholds.get(direction, 1 << 30)


def _fft_resolves(den: Tensor) -> bool:
    """Whether every image's denominators (B, H', W', Nq, h) lie within `FFT_RESOLVED_RATIO` of their max."""
    low, high = den.amin(dim=(1, 2)), den.amax(dim=(1, 2))
    return bool((low >= FFT_RESOLVED_RATIO[den.dtype] * high).all())


def _tap_lags(window: int, length: int, device: torch.device) -> Tensor:
    """The circular lag ``t - padding`` (mod ``length``) of each of a window's taps t."""
    return (torch.arange(window, device=device) - (window - 1) // 2) % length


def _kernel_spectra(kernels: Tensor, lengths: tuple[int, int]) -> Tensor:
    """Spectra (..., n1, n2 // 2 + 1) of cross-correlation kernels (..., k, k) as circular convolutions
    of period ``lengths``: tap t sits at lag ``padding - t``, so the flipped kernel at `_tap_lags`."""
    window = kernels.shape[-1]
    lags1, lags2 = (_tap_lags(window, n, kernels.device) for n in lengths)
    placed = kernels.new_zeros(*kernels.shape[:-2], *lengths)
    placed[..., lags1[:, None], lags2[None, :]] = kernels.flip(-2, -1)
    return torch.fft.rfft2(placed)


def _fft_chunk(head_dim: int, batch: int, lengths: tuple[int, int], dtype: torch.dtype) -> int:
    """Channels per chunk of the FFT numerators: the largest divisor of ``head_dim`` whose spectra
    (B, n1, n2 // 2 + 1, chunk) stay within `_FFT_CHUNK_BYTES`, so a chunk never spans two heads."""
    n1, n2 = lengths
    per_channel = batch * n1 * (n2 // 2 + 1) * 2 * torch.finfo(dtype).bits // 8
    budget = max(1, _FFT_CHUNK_BYTES // per_channel)
    return max(c for c in range(1, head_dim + 1) if head_dim % c == 0 and c <= budget)


def _channels_first(t: Tensor) -> Tensor:
    """(B, H, W, ...) -> (B, ..., H, W), contiguous: the FFT numerators' layout, whose rows (W) are the
    innermost dimension of every chunk, so their element-wise work vectorises."""
    return t.movedim((1, 2), (-2, -1)).contiguous()


def _chunk_channels_first(t: Tensor, c0: int, c1: int, buffer: Tensor) -> Tensor:
    """Channels [c0, c1) of ``t`` (B, H, W, C) copied into ``buffer`` (B, >= c1 - c0, H, W): one chunk
    at a time, so the channels-first copy never holds more than a chunk."""
    out = buffer[:, : c1 - c0]
    return out.copy_(t[..., c0:c1].permute(0, 3, 1, 2))


@dataclass(frozen=True)
class _FFTPlan:
    """What both FFT numerator passes derive from their inputs: head size, FFT lengths, the kernels'
    spectra (Nq, h, n1, n2 // 2 + 1), channels per chunk, and E and den channels first (B, Nq, h, H, W)."""

    head_dim: int
    lengths: tuple[int, int]
    spectra: Tensor
    chunk: int
    e: Tensor
    d: Tensor

    @classmethod
    def of(cls, exp_scores: Tensor, values: Tensor, value_kernels: Tensor, den: Tensor) -> _FFTPlan:
        batch, height, width, _, heads = exp_scores.shape
        head_dim = values.shape[-1] // heads
        lengths = fft_lengths(height, width, value_kernels.shape[-1])
        return cls(
            head_dim,
            lengths,
            _kernel_spectra(value_kernels, lengths),
            _fft_chunk(head_dim, batch, lengths, exp_scores.dtype),
            _channels_first(exp_scores),
            _channels_first(den),
        )


def _fft_numerators(exp_scores: Tensor, values: Tensor, value_kernels: Tensor, den: Tensor) -> Tensor:
    """``z = sum_n num_n / den_n`` (B, H, W, F), stride 1, the numerators as FFT convolutions.

    ``value_kernels`` are (Nq, h, k, k), one per query and head (the numerator's kernel repeats over
    each head's d channels). Channels go in chunks within one head (`_fft_chunk`), channels first.
    """
    batch, height, width, num_queries, _ = exp_scores.shape
    features = values.shape[-1]
    plan = _FFTPlan.of(exp_scores, values, value_kernels, den)
    head_dim, lengths, spectra, chunk, e, d = plan.head_dim, plan.lengths, plan.spectra, plan.chunk, plan.e, plan.d
    # a whole channels-first copy of the values is faster than one per chunk here, and the forward's
    # peak lies elsewhere
    v_all = _channels_first(values)
    z = exp_scores.new_zeros(batch, features, height, width)
    for c0 in range(0, features, chunk):
        head, c1 = c0 // head_dim, c0 + chunk
        v = v_all[:, c0:c1]
        for n in range(num_queries):
            spectrum = torch.fft.rfft2(e[:, n, head, None] * v, s=lengths)
            spectrum.mul_(spectra[n, head])
            num = torch.fft.irfft2(spectrum, s=lengths)[..., :height, :width]
            z[:, c0:c1].addcdiv_(num, d[:, n, head, None])
    return z.permute(0, 2, 3, 1).contiguous()


def _fft_numerator_grads(
    exp_scores: Tensor,
    values: Tensor,
    value_kernels: Tensor,
    den: Tensor,
    g_z: Tensor,
    g_values: Tensor,
    need_kernel_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The backward of `_fft_numerators`, each chunk's two forward spectra reused three times.

    Per query n and chunk: the spectrum of ``E_n * V`` gives the numerator again (for the denominator's
    gradient) and, with the spectrum of ``g_num = g_z / den_n``, the kernel gradient; the latter's
    spectrum times the conjugate kernel spectrum is the input gradient. Adds ``sum_n g_weighted_n * E_n``
    into ``g_values`` (B, F, H, W), channels first. Returns, channels last, ``g_exp = sum_d g_weighted *
    v`` (B, H, W, Nq, h) and ``g_den_num = sum_d g_z * num_n`` (B, H, W, Nq, h), and the value kernels'
    gradient (Nq, h, k, k) when asked for.
    """
    batch, height, width, num_queries, _ = exp_scores.shape
    features = values.shape[-1]
    window = value_kernels.shape[-1]
    plan = _FFTPlan.of(exp_scores, values, value_kernels, den)
    head_dim, lengths, spectra, chunk, e, d = plan.head_dim, plan.lengths, plan.spectra, plan.chunk, plan.e, plan.d
    v_chunk = values.new_empty(batch, chunk, height, width)
    g_chunk = g_z.new_empty(batch, chunk, height, width)
    g_e, g_d = torch.zeros_like(e), torch.zeros_like(d)
    kernel_grad_spectra = torch.zeros_like(spectra) if need_kernel_grad else None
    for c0 in range(0, features, chunk):
        head, c1 = c0 // head_dim, c0 + chunk
        v = _chunk_channels_first(values, c0, c1, v_chunk)
        g = _chunk_channels_first(g_z, c0, c1, g_chunk)
        for n in range(num_queries):
            e_n = e[:, n, head, None]
            spectrum = torch.fft.rfft2(e_n * v, s=lengths)
            num = torch.fft.irfft2(spectrum * spectra[n, head], s=lengths)[..., :height, :width]
            g_d[:, n, head] += (num * g).sum(1)
            del num
            g_spectrum = torch.fft.rfft2(g / d[:, n, head, None], s=lengths)
            if kernel_grad_spectra is not None:
                kernel_grad_spectra[n, head] += (g_spectrum.conj() * spectrum).sum(dim=(0, 1))
            del spectrum
            g_spectrum.mul_(spectra[n, head].conj())
            g_weighted = torch.fft.irfft2(g_spectrum, s=lengths)[..., :height, :width]
            del g_spectrum
            g_e[:, n, head] += (g_weighted * v).sum(1)
            g_values[:, c0:c1].addcmul_(g_weighted, e_n)
    g_value_kernels = None
    if kernel_grad_spectra is not None:
        lags = [_tap_lags(window, n, values.device) for n in lengths]
        correlations = torch.fft.irfft2(kernel_grad_spectra, s=lengths)
        g_value_kernels = correlations.index_select(-2, lags[0]).index_select(-1, lags[1])
    return g_e.movedim((-2, -1), (1, 2)), g_d.movedim((-2, -1), (1, 2)), g_value_kernels


# --------------------------------------------------------------------------------------------------
# The windowed softmax core: scores (B, H, W, Nq*h) and values (B, H, W, F) -> z (B, H', W', F).


def _kernels(rpe_bias: Tensor, dtype: torch.dtype) -> Tensor:
    """``exp(b)`` per query and head, shifted by its max: a per-(query, head) factor that cancels
    between numerator and denominator and keeps the exponent finite."""
    return torch.exp(rpe_bias - rpe_bias.detach().amax(dim=(-2, -1), keepdim=True)).to(dtype)


def _value_kernel(rpe_exp: Tensor, mixing: Tensor, head_dim: int) -> Tensor:
    """The numerator's kernel for one query: ``exp(b) * w`` (h, k, k) repeated over each head's d channels."""
    heads, window = rpe_exp.shape[0], rpe_exp.shape[-1]
    kernel = (rpe_exp * mixing.to(rpe_exp.dtype)).unsqueeze(1)
    return kernel.expand(heads, head_dim, window, window).reshape(heads * head_dim, 1, window, window)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the windowed softmax's core: fp32 for half types (see `_qna_forward`), else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _exp_scores(scores: Tensor) -> Tensor:
    """``exp(s - m)`` in the work dtype, with ``m`` the max over each image, per query and head: a
    constant within every window, so exact, and it keeps the largest term at 1 (no overflow)."""
    scores = scores.to(_work_dtype(scores.dtype))
    return torch.exp(scores - scores.detach().amax(dim=(1, 2), keepdim=True))


def _underflowed(den: Tensor) -> Tensor:
    """The output pixels (B, H', W') where some query's and head's denominator is below
    `UNDERFLOW_DENOMINATOR` (their window's logits all lie far below the image's max).

    Writes 1 into those denominators, so that the fast form stays finite there; `_recompute_windows`
    then replaces those pixels. The normal case pays for one comparison and one reduction.
    """
    small = den < UNDERFLOW_DENOMINATOR[den.dtype]
    den.masked_fill_(small, 1.0)
    return small.flatten(-2).any(-1)


@torch.compiler.disable  # data-dependent: the pixels' number; torch.compile runs it eagerly
def _recompute_windows(
    z: Tensor, underflowed: Tensor, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int
) -> Tensor:
    """``z`` with the ``underflowed`` output pixels (B, H', W') recomputed the reference way, each window
    with its own max: the windows gathered (clamped at the border, the outside masked with -inf), a
    softmax in the work dtype, the query mixing and the weighted sum of the values. Differentiable by
    autograd.

    Memory grows with n * k^2 * (F + Nq*h) for n such pixels: this is the fallback for windows the fast
    form cannot resolve, not a path for whole images.
    """
    if not bool(underflowed.any()):
        return z
    pixels = underflowed.nonzero()
    num_queries, heads, window, _ = rpe_bias.shape
    _, height, width, channels = packed.shape
    features = channels - num_queries * heads
    padding = (window - 1) // 2
    taps = torch.arange(window, device=packed.device) - padding
    rows = pixels[:, 1, None] * stride + taps  # (n, k) input rows of each window
    cols = pixels[:, 2, None] * stride + taps
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    gathered = packed[
        pixels[:, 0, None, None], rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]
    ].to(z.dtype)  # (n, k, k, F + Nq*h)
    logits = gathered[..., features:].unflatten(-1, (num_queries, heads)) + rpe_bias.permute(2, 3, 0, 1).to(z.dtype)
    logits = logits.masked_fill(~inside[..., None, None], float("-inf")).flatten(1, 2)  # (n, k*k, Nq, h)
    weights = (torch.softmax(logits, dim=1) * mixing.permute(2, 3, 0, 1).flatten(0, 1).to(z.dtype)).sum(2)
    v = gathered[..., :features].flatten(1, 2).unflatten(-1, (heads, features // heads))  # (n, k*k, h, d)
    fixed = torch.einsum("njh,njhd->nhd", weights, v).flatten(1)
    return z.index_put(tuple(pixels.T), fixed)


def _qna_forward(
    exp_scores: Tensor, values: Tensor, rpe_exp: Tensor, mixing: Tensor, stride: int, padding: int
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The fast form on exponentiated scores (B, H, W, Nq, h) in the work dtype; returns z (B, H', W', F)
    and den (B, H', W', Nq, h) in the work dtype, the underflowed pixels (`_underflowed`), and whether
    the FFT paths may run on these data (`_fft_resolves`, checked only where an FFT path is in use): the
    numerators then run as FFT convolutions where `uses_fft_convolutions`, and the backward follows.

    One query at a time, so the largest intermediate is (B, H, W, F). For half types the whole core
    (E, E*V, both convolutions, the division) runs in fp32: E and the denominator then resolve windows
    down to ~87 below the image's max instead of ~17 (fp16), and the numerator E*V cannot underflow
    silently to 0 where the denominator is still fine. The cost is fp32 intermediates for half inputs.
    """
    batch, height, width, num_queries, heads = exp_scores.shape
    features = values.shape[-1]
    head_dim = features // heads
    den_kernel = rpe_exp.reshape(num_queries * heads, 1, *rpe_exp.shape[-2:])
    den = _depthwise_conv(exp_scores.view(batch, height, width, -1), den_kernel, stride, padding)
    out_h, out_w = den.shape[1:3]
    den = den.view(batch, out_h, out_w, num_queries, heads)
    underflowed = _underflowed(den)
    device, window = exp_scores.device.type, rpe_exp.shape[-1]
    fft_in_use = (
        uses_fft_convolutions(device, window, stride, "forward")
        or uses_fft_convolutions(device, window, stride, "backward")
        or uses_fft_weight_grad(device, window, stride)
    )
    fft_resolved = fft_in_use and _fft_resolves(den)
    if fft_resolved and uses_fft_convolutions(device, window, stride):
        z = _fft_numerators(exp_scores, values, rpe_exp * mixing.to(rpe_exp.dtype), den)
        return z, den, underflowed, fft_resolved
    v = values.unflatten(-1, (heads, head_dim))
    z: Tensor | None = None
    for n in range(num_queries):
        weighted = (exp_scores[..., n, :, None] * v).flatten(-2)
        num = _depthwise_conv(weighted, _value_kernel(rpe_exp[n], mixing[n], head_dim), stride, padding)
        del weighted
        num = num.view(batch, out_h, out_w, heads, head_dim)
        z = num.div_(den[..., n, :, None]) if z is None else z.addcdiv_(num, den[..., n, :, None])
    assert z is not None
    return z.view(batch, out_h, out_w, features), den, underflowed, fft_resolved


class _QnAAttention(torch.autograd.Function):
    """The fast form with a hand-written backward.

    Takes the values and the scores packed in one tensor (B, H, W, F + Nq*h), as one matmul makes them,
    and returns their gradient packed the same way. Saves only exp(s - m) (B, H, W, Nq*h), the packed
    input (for the values) and the denominator (B, H', W', Nq*h). The products E*V and the numerators
    are recomputed one query at a time in backward and freed as soon as they are used. The convolution input
    gradients are convolutions again (`_depthwise_conv_input_grad`), the kernel gradients FFT
    cross-correlations on CPU for large windows (see `FFT_WEIGHT_GRAD_MIN_WINDOW`); from
    `FFT_CONV_MIN_WINDOW` the numerators' three convolutions run on shared spectra
    (`_fft_numerator_grads`). Every FFT path runs only where the forward found the data resolved
    (`_fft_resolves`).
    """

    @staticmethod
    def forward(ctx: Any, packed: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        window = rpe_bias.shape[-1]
        padding = (window - 1) // 2
        values, exp_scores = _unpack(packed, rpe_bias)
        rpe_exp = _kernels(rpe_bias, exp_scores.dtype)
        z, den, underflowed, fft_resolved = _qna_forward(exp_scores, values, rpe_exp, mixing, stride, padding)
        # the underflowed pixels' den is 1 here; their z is replaced outside, so their gradient is 0
        ctx.save_for_backward(exp_scores, packed, den, rpe_bias, mixing)
        ctx.stride, ctx.padding, ctx.fft_resolved = stride, padding, fft_resolved
        ctx.mark_non_differentiable(underflowed)
        return z, underflowed

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor, _grad_pixels: Tensor | None) -> tuple[Tensor | None, ...]:
        exp_scores, packed, den, rpe_bias, mixing = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        need_kernel_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        batch, height, width, num_queries, heads = exp_scores.shape
        out_h, out_w = den.shape[1:3]
        features = packed.shape[-1] - num_queries * heads
        values = packed[..., :features]
        head_dim = features // heads
        window = rpe_bias.shape[-1]
        # accumulated into in place (compile refuses strided out=), in the work dtype
        device = exp_scores.device.type
        fft_conv = ctx.fft_resolved and uses_fft_convolutions(device, window, stride, "backward")
        if fft_conv:  # channels first in memory, as the FFT numerators write it; (B, H, W, F + Nq*h) in shape
            g_packed = packed.new_zeros(batch, packed.shape[-1], height, width, dtype=exp_scores.dtype)
            g_packed = g_packed.permute(0, 2, 3, 1)
        else:
            g_packed = torch.zeros_like(packed, dtype=exp_scores.dtype)

        rpe_exp = _kernels(rpe_bias, exp_scores.dtype)
        v = values.unflatten(-1, (heads, head_dim))
        g_z = grad_z.to(exp_scores.dtype).contiguous().view(batch, out_h, out_w, heads, head_dim)
        g_exp = torch.empty_like(exp_scores)
        g_den = torch.empty_like(den)
        g_values = g_packed[..., :features].unflatten(-1, (heads, head_dim))
        g_value_kernel = rpe_exp.new_zeros(num_queries, heads, window, window)
        use_fft = need_kernel_grad and ctx.fft_resolved and uses_fft_weight_grad(device, window, stride)

        if fft_conv:
            fft_g_exp, g_den_num, fft_g_value_kernel = _fft_numerator_grads(
                exp_scores, values, rpe_exp * mixing, den, g_z.flatten(-2), g_packed.permute(0, 3, 1, 2),
                need_kernel_grad,
            )
            g_exp.copy_(fft_g_exp)
            g_den.copy_(g_den_num).div_(den).div_(den).neg_()
            if fft_g_value_kernel is not None:
                g_value_kernel = fft_g_value_kernel
            del fft_g_exp, g_den_num
        for n in range(0 if fft_conv else num_queries):
            e_n = exp_scores[..., n, :, None]
            den_n = den[..., n, :, None]
            value_kernel = _value_kernel(rpe_exp[n], mixing[n], head_dim)
            weighted = (e_n * v).flatten(-2)
            num = _depthwise_conv(weighted, value_kernel, stride, padding).view(g_z.shape)
            # z = sum_n num_n / den_n  =>  dL/dden_n = -sum_d(g_z * num_n) / den_n / den_n (dividing
            # twice: den_n^2 overflows fp16 for den_n > 256 and 1 / den_n^2 for den_n < 4e-3)
            g_den[..., n, :] = num.mul_(g_z).sum(-1).div_(den[..., n, :]).div_(den[..., n, :]).neg_()
            if use_fft:
                # the numerator is freed first: the FFT's buffers then add nothing to the peak
                del num
                g_kernel = _depthwise_weight_grad_fft(
                    weighted, _LazyGrad(g_z, den_n), (out_h, out_w), window, stride, padding
                )
                del weighted
                g_num = g_z / den_n
            else:
                g_num = torch.div(g_z, den_n, out=num)
                del num
                if need_kernel_grad:
                    g_kernel = _depthwise_weight_grad_direct(
                        weighted, g_num.flatten(-2), window, stride, padding
                    )
                del weighted
            if need_kernel_grad:
                g_value_kernel[n] = g_kernel.view(heads, head_dim, window, window).sum(1)
            g_weighted = _depthwise_conv_input_grad(
                g_num.flatten(-2), value_kernel, (height, width), stride, padding
            )
            del g_num
            g_weighted = g_weighted.view(v.shape)
            g_exp[..., n, :] = (g_weighted * v).sum(-1)
            g_values.addcmul_(g_weighted, e_n)
            del g_weighted

        den_kernel = rpe_exp.reshape(num_queries * heads, 1, window, window)
        flat_exp = exp_scores.view(batch, height, width, -1)
        flat_g_den = g_den.view(batch, out_h, out_w, -1)
        g_exp.add_(
            _depthwise_conv_input_grad(flat_g_den, den_kernel, (height, width), stride, padding).view_as(
                g_exp
            )
        )
        g_packed[..., features:].copy_(g_exp.mul_(exp_scores).flatten(-2))

        g_rpe = g_mixing = None
        if need_kernel_grad:
            if use_fft:
                g_den_lazy = _LazyGrad(flat_g_den.unsqueeze(-1))
                g_den_kernel = _depthwise_weight_grad_fft(
                    flat_exp, g_den_lazy, (out_h, out_w), window, stride, padding
                )
            else:
                g_den_kernel = _depthwise_weight_grad_direct(flat_exp, flat_g_den, window, stride, padding)
            g_rpe_exp = g_value_kernel * mixing + g_den_kernel.view_as(rpe_exp)
            g_rpe = (g_rpe_exp * rpe_exp).to(rpe_bias.dtype)
            g_mixing = (g_value_kernel * rpe_exp).to(mixing.dtype)
        return g_packed.to(packed.dtype), g_rpe, g_mixing, None


def _check_core_args(scores: Tensor, values: Tensor, rpe_bias: Tensor, mixing: Tensor, stride: int) -> None:
    if rpe_bias.dim() != 4 or rpe_bias.shape[-1] != rpe_bias.shape[-2] or rpe_bias.shape[-1] % 2 == 0:
        raise ValueError(f"rpe_bias.shape={tuple(rpe_bias.shape)}: needs (num_queries, heads, k, k), k odd")
    if mixing.shape != rpe_bias.shape:
        raise ValueError(
            f"query_mixing.shape={tuple(mixing.shape)}: needs rpe_bias's shape {tuple(rpe_bias.shape)}"
        )
    num_queries, heads = rpe_bias.shape[:2]
    if scores.dim() != 4 or scores.shape[-1] != num_queries * heads:
        raise ValueError(f"scores.shape={tuple(scores.shape)}: needs (B, H, W, {num_queries * heads})")
    if values.shape[:-1] != scores.shape[:-1] or values.shape[-1] % heads != 0:
        raise ValueError(
            f"values.shape={tuple(values.shape)}: needs (B, H, W, F) with scores' (B, H, W) and F divisible by {heads}"
        )
    if stride not in STRIDES:
        raise ValueError(f"stride={stride}: QnA supports stride 1 or 2")


def _unpack(packed: Tensor, rpe_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Values (B, H, W, F) and exp(s - m) (B, H, W, Nq, h) from values and scores packed as (B, H, W, F + Nq*h)."""
    num_queries, heads = rpe_bias.shape[:2]
    features = packed.shape[-1] - num_queries * heads
    exp_scores = _exp_scores(packed[..., features:]).unflatten(-1, (num_queries, heads))
    return packed[..., :features], exp_scores


def _qna_attention_packed(packed: Tensor, rpe_bias: Tensor, query_mixing: Tensor, stride: int) -> Tensor:
    """`qna_attention` on values and scores packed as (B, H, W, F + Nq*h), values first."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (packed, rpe_bias, query_mixing)):
        z, underflowed = _QnAAttention.apply(packed, rpe_bias, query_mixing, stride)
    else:
        values, exp_scores = _unpack(packed, rpe_bias)
        rpe_exp = _kernels(rpe_bias, exp_scores.dtype)
        z, _, underflowed, _ = _qna_forward(
            exp_scores, values, rpe_exp, query_mixing, stride, (rpe_bias.shape[-1] - 1) // 2
        )
    return _recompute_windows(z, underflowed, packed, rpe_bias, query_mixing, stride).to(packed.dtype)


def qna_attention(
    scores: Tensor, values: Tensor, rpe_bias: Tensor, query_mixing: Tensor, stride: int = 1
) -> Tensor:
    """The fast form of QnA's windowed softmax, without the projections.

    ``scores`` (B, H, W, Nq*h) are the logits ``x . (W_k q_n)`` (channel ``n*h + head``), ``values``
    (B, H, W, F) head-major, ``rpe_bias`` and ``query_mixing`` (Nq, h, k, k). Returns
    ``z`` (B, H', W', F) ``= sum_n sum_j w_n(j) softmax_j(s_n(j) + b_n(j)) v_j`` over each zero-padded
    k x k window (padding outside the softmax), ``H' = qna_output_size(H, k, stride)``.

    Exact for any logits: one max per image keeps exp finite, and the windows whose logits all lie so
    far below it that their denominator underflows (`UNDERFLOW_DENOMINATOR`) are recomputed with their
    own max (`_recompute_windows`). Half types run the core in fp32 and return their own dtype.
    """
    _check_core_args(scores, values, rpe_bias, query_mixing, stride)
    return _qna_attention_packed(torch.cat([values, scores], dim=-1), rpe_bias, query_mixing, stride)


def qna_attention_reference(
    scores: Tensor, values: Tensor, rpe_bias: Tensor, query_mixing: Tensor, stride: int = 1
) -> Tensor:
    """`qna_attention` computed naively: unfold every k x k window, mask the padding with -inf, softmax.

    Memory grows with k^2; for tests and as the readable definition.
    """
    _check_core_args(scores, values, rpe_bias, query_mixing, stride)
    num_queries, heads, window, _ = rpe_bias.shape
    batch, height, width, features = values.shape
    head_dim = features // heads
    padding = (window - 1) // 2
    out_h, out_w = qna_output_size(height, window, stride), qna_output_size(width, window, stride)

    def windows(t: Tensor) -> Tensor:  # (B, H, W, C) -> (B, C, k*k, H'*W')
        cols = F.unfold(t.permute(0, 3, 1, 2), window, padding=padding, stride=stride)
        return cols.view(t.shape[0], t.shape[-1], window * window, -1)

    taps = window * window
    inside = windows(scores.new_ones(1, height, width, 1)).view(1, 1, 1, taps, -1) > 0
    logits = windows(scores).view(batch, num_queries, heads, taps, -1) + rpe_bias.reshape(
        1, num_queries, heads, taps, 1
    )
    attn = torch.softmax(logits.masked_fill(~inside, float("-inf")), dim=3)
    mixed = (attn * query_mixing.reshape(1, num_queries, heads, taps, 1)).sum(1)  # (B, h, k*k, L)
    v = windows(values).view(batch, heads, head_dim, taps, -1)
    z = torch.einsum("bhjl,bhdjl->bhdl", mixed, v)
    return z.reshape(batch, features, out_h, out_w).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------------


def _lecun_normal_(weight: Tensor, fan_in: int) -> Tensor:
    """Flax's default ``lecun_normal``: a normal truncated at +-2 sigma, rescaled to variance 1/fan_in."""
    # 0.8796... is the std of a standard normal truncated to [-2, 2].
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class QnA(nn.Module):
    """QnA local attention with learned queries, on channels-last input (B, H, W, C_in) -> (B, H', W', F_out).

    Args:
        in_channels: C_in.
        features: F, the attention's width; split into ``heads`` heads of ``d = F / heads``.
        heads: number of heads h.
        window: odd window size k; windows are zero padded by ``(k - 1) / 2``.
        stride: 1, or 2 for the downsampling block; ``H' = qna_output_size(H, k, stride)``.
        num_queries: Nq learned queries, whose attention outputs are summed.
        out_features: F_out of the output projection (default F).
        normalize_queries: unit-normalise each query head before scaling by 1/sqrt(d) (the default).
        bias: biases on the value and output projections.
        impl: ``"fast"`` (depthwise convolutions, custom backward) or ``"reference"`` (unfolded windows).
            A plain attribute; switch it at any time, the parameters are shared.

    Attributes:
        query (Nq, h, d), key_weight (C_in, h, d), value_proj (Linear C_in -> F),
        rpe_bias (Nq, h, k, k), query_mixing (Nq, h, k, k), out_proj (Linear F -> F_out), impl.
    """

    def __init__(
        self,
        in_channels: int,
        features: int,
        heads: int,
        window: int = 3,
        stride: int = 1,
        num_queries: int = 2,
        out_features: int | None = None,
        normalize_queries: bool = True,
        bias: bool = False,
        impl: Impl = "fast",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("features", features), ("heads", heads)):
            if value < 1:
                raise ValueError(f"{name}={value}: QnA needs a positive integer")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window={window}: QnA needs an odd window (1, 3, 5, ...)")
        if stride not in STRIDES:
            raise ValueError(f"stride={stride}: QnA supports stride 1 or 2")
        if features % heads != 0:
            raise ValueError(f"heads={heads}: must divide features={features}")
        if num_queries < 1:
            raise ValueError(f"num_queries={num_queries}: QnA needs at least 1 query")
        if out_features is not None and out_features < 1:
            raise ValueError(
                f"out_features={out_features}: QnA needs a positive integer (or None for features)"
            )
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r}: QnA's impl is one of {IMPLS}")
        self.in_channels = in_channels
        self.features = features
        self.heads = heads
        self.head_dim = features // heads
        self.window = window
        self.stride = stride
        self.padding = (window - 1) // 2
        self.num_queries = num_queries
        self.out_features = features if out_features is None else out_features
        self.normalize_queries = normalize_queries
        self.impl: Impl = impl

        self.query = nn.Parameter(torch.empty(num_queries, heads, self.head_dim))
        self.key_weight = nn.Parameter(torch.empty(in_channels, heads, self.head_dim))
        self.value_proj = nn.Linear(in_channels, features, bias=bias)
        self.rpe_bias = nn.Parameter(torch.empty(num_queries, heads, window, window))
        self.query_mixing = nn.Parameter(torch.empty(num_queries, heads, window, window))
        self.out_proj = nn.Linear(features, self.out_features, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (Flax ``FusedKQnA`` defaults)."""
        query_std = math.sqrt(1.0 / self.head_dim)
        nn.init.trunc_normal_(self.query, std=query_std, a=-2 * query_std, b=2 * query_std)
        _lecun_normal_(self.key_weight, fan_in=self.in_channels)
        _lecun_normal_(self.value_proj.weight, fan_in=self.in_channels)
        _lecun_normal_(self.out_proj.weight, fan_in=self.features)
        for linear in (self.value_proj, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.rpe_bias)
        nn.init.normal_(self.query_mixing, std=0.02)

    def scaled_queries(self) -> Tensor:
        """``q / (||q|| + 1e-6) / sqrt(d)`` per query and head (without the norm if not normalize_queries)."""
        q = self.query
        if self.normalize_queries:
            q = q / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + _QUERY_EPS)
        return q / math.sqrt(self.head_dim)

    def key_queries(self) -> Tensor:
        """``W_k q_n`` per query and head, (Nq*h, C_in), row ``n*h + head``: the scores are ``x @ this.T``."""
        return torch.einsum("chd,nhd->nhc", self.key_weight, self.scaled_queries()).flatten(0, 1)

    def scores(self, x: Tensor) -> Tensor:
        """Logits ``x . (W_k q_n)`` (B, H, W, Nq*h), channel ``n*h + head``; the keys are never built."""
        return F.linear(x, self.key_queries().to(x.dtype))

    def _values_and_scores(self, x: Tensor) -> Tensor:
        """Values and scores from one matmul, packed as (B, H, W, F + Nq*h)."""
        weight = torch.cat([self.value_proj.weight, self.key_queries()]).to(x.dtype)
        bias = self.value_proj.bias
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(self.num_queries * self.heads)]).to(x.dtype)
        return F.linear(x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C_in) -> (B, H', W', F_out) with the form ``self.impl`` names."""
        if x.dim() != 4:
            raise ValueError(f"x.dim()={x.dim()}: QnA needs a channels-last (B, H, W, C) input")
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x.shape[-1]={x.shape[-1]}: QnA was built for in_channels={self.in_channels} (input is (B, H, W, C))"
            )
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r}: QnA's impl is one of {IMPLS}")
        if self.impl == "fast":
            z = _qna_attention_packed(
                self._values_and_scores(x), self.rpe_bias, self.query_mixing, self.stride
            )
        else:
            z = qna_attention_reference(
                self.scores(x), self.value_proj(x), self.rpe_bias, self.query_mixing, self.stride
            )
        return self.out_proj(z)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, features={self.features}, heads={self.heads}, "
            f"window={self.window}, stride={self.stride}, num_queries={self.num_queries}, "
            f"out_features={self.out_features}, normalize_queries={self.normalize_queries}, impl={self.impl!r}"
        )

    @torch.no_grad()
    def load_official_params(self, params: Mapping[str, Any]) -> None:
        """Copy the parameters of an official Flax ``FusedKQnA`` into this module.

        ``params`` is that module's parameter dict (nested as Flax gives it, or flattened with '/'
        keys such as ``"to_v/kernel"``) of numpy or torch arrays (``np.asarray`` turns jax arrays into
        numpy ones). ``Wk_b`` is ignored (it cancels); the projection biases must match ``bias``.
        """
        flat = _flatten(params)
        heads, window = self.heads, self.window
        has_bias = self.value_proj.bias is not None
        if ("to_v/bias" in flat) != has_bias:
            raise ValueError(
                f"params: official biases {'present' if not has_bias else 'absent'}, but this QnA has bias={has_bias}"
            )

        def get(name: str, shape: tuple[int, ...]) -> Tensor:
            if name not in flat:
                raise ValueError(f"params: missing official parameter {name!r} (have {sorted(flat)})")
            t = torch.as_tensor(flat[name])
            if tuple(t.shape) != shape:
                raise ValueError(f"params[{name!r}].shape={tuple(t.shape)}: this QnA expects {shape}")
            return t

        def per_query_head(t: Tensor) -> Tensor:  # (k*k, Nq*h) in HWIO order -> (Nq, h, k, k)
            return t.reshape(window, window, self.num_queries, heads).permute(2, 3, 0, 1)

        nqh = self.num_queries * heads
        self.query.copy_(get("query", (self.num_queries, self.features)).reshape(self.query.shape))
        self.key_weight.copy_(get("Wk", (self.in_channels, self.features)).reshape(self.key_weight.shape))
        self.rpe_bias.copy_(per_query_head(get("rpe_bias", (window * window, nqh))))
        self.query_mixing.copy_(per_query_head(get("attn_scale_weights", (1, 1, window * window, nqh))))
        for ours, theirs, fan_out in (
            (self.value_proj, "to_v", self.features),
            (self.out_proj, "to_out", self.out_features),
        ):
            ours.weight.copy_(get(f"{theirs}/kernel", (ours.in_features, fan_out)).T)
            if ours.bias is not None:
                ours.bias.copy_(get(f"{theirs}/bias", (fan_out,)))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out
