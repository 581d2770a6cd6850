"""QnA's FFT paths on CPU: the kernel gradients as FFT cross-correlations, the numerators and their
backward as FFT convolutions on chunked spectra, and the guard that lets an FFT run only on data it
resolves (`fft_resolves`). Which of them a call uses is its plan's choice (`qna_bench.qna.plans`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# An FFT convolution's rounding error is relative to the largest value of the whole image, a direct
# one's to each window's own sum. So the FFT paths (numerators and kernel gradients) run only where
# every image's denominators lie within this ratio of their max, per query and head (the error of an
# output pixel grows as the image's largest denominator over its own); elsewhere the direct paths run.
# In fp32 the FFT convolution's error is ~4e-7 of the image's largest value (measured on the AVX2 EPYC),
# so 2^-6 keeps it near 2.5e-5 of the output's scale. Random inputs at init spread their logits by ~1.5 and
# pass; a window ~4 below its image's max does not.
FFT_RESOLVED_RATIO: dict[torch.dtype, float] = {torch.float32: 2.0**-6, torch.float64: 2.0**-12}


@dataclass(frozen=True)
class LazyGrad:
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


def depthwise_weight_grad_fft(
    x: Tensor,
    grad_out: LazyGrad,
    out_size: tuple[int, int],
    window: int,
    stride: int,
    padding: int,
    chunk_bytes: int,
) -> Tensor:
    """Kernel gradient of `qna_bench.qna.direct.depthwise_conv` as an FFT cross-correlation summed over the batch.

    ``G[c, i, j] = sum_{b, o} grad_out[b, o, c] * x[b, stride * o + (i, j) - padding, c]`` with zeros
    outside ``x``. The output gradient is zero-stuffed onto the input grid (stride > 1), and the
    circular correlation has a period of at least ``size + padding`` so that the lags in
    ``[-padding, padding]`` never wrap onto data. Channels go in chunks through two reused zero-padded
    buffers (``chunk_bytes`` of spectrum each), which bounds the extra memory and keeps the spectra in
    cache; ``grad_out`` is only asked for one chunk at a time. Returns (C, 1, k, k).
    """
    batch, height, width, channels = x.shape
    out_h, out_w = out_size
    n1, n2 = fft_lengths(height, width, window)
    # pocketfft has no half precision, cuFFT only for powers of two
    work_dtype = torch.promote_types(x.dtype, torch.float32)
    spectrum_bytes = batch * n1 * (n2 // 2 + 1) * 2 * torch.finfo(work_dtype).bits // 8
    chunk = max(1, min(channels, chunk_bytes // spectrum_bytes))
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



def fft_lengths(height: int, width: int, window: int) -> tuple[int, int]:
    """The FFT lengths of QnA's FFT convolutions on a (height, width) input: at least size + padding,
    so that the lags in [-padding, padding] never wrap onto data."""
    padding = (window - 1) // 2
    return _fast_fft_len(height + padding), _fast_fft_len(width + padding)



def fft_resolves(den: Tensor) -> bool:
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


def _fft_chunk(head_dim: int, batch: int, lengths: tuple[int, int], dtype: torch.dtype, chunk_bytes: int) -> int:
    """Channels per chunk of the FFT numerators: the largest divisor of ``head_dim`` whose spectra
    (B, n1, n2 // 2 + 1, chunk) stay within ``chunk_bytes``, so a chunk never spans two heads."""
    n1, n2 = lengths
    per_channel = batch * n1 * (n2 // 2 + 1) * 2 * torch.finfo(dtype).bits // 8
    budget = max(1, chunk_bytes // per_channel)
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
class _FFTSetup:
    """What both FFT numerator passes derive from their inputs: head size, FFT lengths, the kernels'
    spectra (Nq, h, n1, n2 // 2 + 1), channels per chunk, and E and den channels first (B, Nq, h, H, W)."""

    head_dim: int
    lengths: tuple[int, int]
    spectra: Tensor
    chunk: int
    e: Tensor
    d: Tensor

    @classmethod
    def of(
        cls, exp_scores: Tensor, values: Tensor, value_kernels: Tensor, den: Tensor, chunk_bytes: int
    ) -> _FFTSetup:
        batch, height, width, _, heads = exp_scores.shape
        head_dim = values.shape[-1] // heads
        lengths = fft_lengths(height, width, value_kernels.shape[-1])
        return cls(
            head_dim,
            lengths,
            _kernel_spectra(value_kernels, lengths),
            _fft_chunk(head_dim, batch, lengths, exp_scores.dtype, chunk_bytes),
            _channels_first(exp_scores),
            _channels_first(den),
        )


def fft_numerators(
    exp_scores: Tensor, values: Tensor, value_kernels: Tensor, den: Tensor, chunk_bytes: int
) -> Tensor:
    """``z = sum_n num_n / den_n`` (B, H, W, F), stride 1, the numerators as FFT convolutions.

    ``value_kernels`` are (Nq, h, k, k), one per query and head (the numerator's kernel repeats over
    each head's d channels). Channels go in chunks within one head (`_fft_chunk`), channels first.
    """
    batch, height, width, num_queries, _ = exp_scores.shape
    features = values.shape[-1]
    setup = _FFTSetup.of(exp_scores, values, value_kernels, den, chunk_bytes)
    head_dim, lengths, spectra, chunk, e, d = (
        setup.head_dim, setup.lengths, setup.spectra, setup.chunk, setup.e, setup.d
    )
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


def fft_numerator_grads(
    exp_scores: Tensor,
    values: Tensor,
    value_kernels: Tensor,
    den: Tensor,
    g_z: Tensor,
    g_values: Tensor,
    need_kernel_grad: bool,
    chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The backward of `fft_numerators`, each chunk's two forward spectra reused three times.

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
    setup = _FFTSetup.of(exp_scores, values, value_kernels, den, chunk_bytes)
    head_dim, lengths, spectra, chunk, e, d = (
        setup.head_dim, setup.lengths, setup.spectra, setup.chunk, setup.e, setup.d
    )
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
                kernel_grad_spectra[n, head] += (torch.conj_physical(g_spectrum) * spectrum).sum(dim=(0, 1))
            del spectrum
            g_spectrum.mul_(torch.conj_physical(spectra[n, head]))
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


