"""Triton kernels for QnA's windowed softmax (forward and backward), on (B, H, W, C) channels-last tensors.

Whether a kernel runs compiled or in Triton's CPU interpreter is fixed when this module is imported:
``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, so set it before importing.

Numerics. Each output window o and query n gets its max ``m_n(o)`` and denominator by an online softmax
over its taps (a running max and a rescaled sum, as flash attention does), from the scores alone (Nq*h
channels). A second pass over the taps then uses the exact probabilities ``exp(s + b - m) / den``, so no
window underflows whatever the spread of the logits, and nothing of size k^2 per pixel is held. The
backward recomputes the probabilities from the saved max and 1/den. (One saved log-sum-exp would cost
accuracy: rounded at |m|, it shifts every probability by eps * |m|, 1e-5 in fp32 for logits of 150.)
Accumulation is fp32 (fp64 for fp64).

Layouts: ``scores`` (B, H, W, Nq*h) with channel n*h + head, ``values`` (B, H, W, h*d) head-major,
``rpe_bias`` and ``query_mixing`` (Nq, h, k, k). A program owns one head and a tile of the batch's
pixels flattened (image, pixel), so a tile may span images and only grid axis 0 grows with the batch and
the heads; the channel block is the vector dimension, so value loads are contiguous in NHWC. Addresses
are 64-bit (`_flat`): a (B, H, W, C) tensor passes 2^31 elements long before its pixel count does.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import triton
import triton.language as tl

# Under the interpreter each config is a full run, so autotuning would multiply the test time: one config.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TUNING_KEY = ["OH", "OW", "HEADS", "D", "NQ", "K", "STRIDE"]


def _configs(pre_hook: Callable[[dict], None] | None = None) -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_P": 128}, num_warps=1, pre_hook=pre_hook)]
    return [
        triton.Config({"BLOCK_P": block}, num_warps=warps, pre_hook=pre_hook)
        for block, warps in ((32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8))
    ]


def _fitting(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Configs giving a thread at most 16 elements of a (pixels, channels) tile.

    ptxas for sm_90 (Triton 3.8), d = 32, k = 7: 8 per thread take 164 registers in the backward gather
    (81 forward), 16 take 252 (155), and 32 take all 255 plus a 712-byte (56-byte) spill stack.
    """
    width = kwargs.get("BLOCK_D") or kwargs["HEAD_D"]
    fit = [c for c in configs if c.kwargs["BLOCK_P"] * width <= 16 * 32 * c.num_warps]
    return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] / c.num_warps)]


def tiles(images: int, pixels: int, block_p: int) -> int:
    """Tiles of ``block_p`` over a batch's ``images * pixels`` pixels, flattened (image, pixel): per head."""
    return triton.cdiv(images * pixels, block_p)


def partial_rows(images: int, height: int, width: int, stride: int, block_p: int) -> int:
    """Rows of the backward's partial sums: one per program and head, i.e. per tile of each parity class."""
    return stride * stride * tiles(images, triton.cdiv(height, stride) * triton.cdiv(width, stride), block_p)


def _size_partials(nargs: dict) -> None:
    """Config pre-hook of the backward kernel: sizes ``part`` for the tile of the config about to run.

    The autotuner binds the caller's tensor before choosing the config, so it is resized in place, and
    zeroed: at stride 2 a program writes only the taps of its parity class.
    """
    part = nargs["part_ptr"]
    rows = partial_rows(nargs["B"], nargs["H"], nargs["W"], nargs["STRIDE"], nargs["BLOCK_P"])
    part.resize_(rows, *part.shape[1:]).zero_()


_PRUNE = {"early_config_prune": _fitting}


@triton.jit
def _flat(image, pixel, pixels, channels):
    """(image * pixels + pixel) * channels in 64 bits: the flat offset into a (B, H, W, C) tensor, which
    passes 2^31 long before any of its factors does. Every kernel address below is formed here."""
    return (tl.cast(image, tl.int64) * pixels + pixel) * channels


@triton.jit
def _tile(count, pixels, BLOCK_P: tl.constexpr):
    """This program's head, tile, and its BLOCK_P positions among a batch's pixels flattened (image,
    pixel), ``pixels`` an image; ``count`` tiles per head. Grid axis 0 is heads * tiles (tiles fastest),
    the one axis CUDA lets reach 2^31 - 1: no axis grows with the batch or the heads but this one."""
    tile = (tl.program_id(0) % count).to(tl.int32)
    offs = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    return (tl.program_id(0) // count).to(tl.int32), tile, offs // pixels, (offs % pixels).to(tl.int32), offs


@triton.jit
def _window_softmax_stats(s_ptr, b_ptr, b, oy, ox, p_ok, offs_n, n_ok, head, H, W, HEADS, CS,
                          K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, NQ_P: tl.constexpr,
                          ACC: tl.constexpr):
    """Max m and 1 / sum_j exp(s_n(j) + b_n(j) - m) over each output pixel's in-image taps: (BLOCK_P, NQ_P)."""
    PAD: tl.constexpr = (K - 1) // 2
    m = tl.full((BLOCK_P, NQ_P), float("-inf"), ACC)
    total = tl.zeros((BLOCK_P, NQ_P), ACC)
    for t in range(K * K):
        y = oy * STRIDE + t // K - PAD
        x = ox * STRIDE + t % K - PAD
        inside = p_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        mask = inside[:, None] & n_ok[None, :]
        s = tl.load(s_ptr + _flat(b, y * W + x, H * W, CS)[:, None] + offs_n[None, :] * HEADS + head,
                    mask=mask, other=0.0).to(ACC)
        bias = tl.load(b_ptr + (offs_n * HEADS + head) * (K * K) + t, mask=n_ok, other=0.0).to(ACC)
        logit = tl.where(mask, s + bias[None, :], float("-inf"))
        m_new = tl.maximum(m, logit)
        # A window (or padded query) with no tap seen yet keeps m = -inf: shift by 0 there to avoid inf - inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - shift) + tl.exp(logit - shift)
        m = m_new
    # Every window holds its centre pixel, so total >= 1 on real pixels and queries; 0 leaves the rest out.
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    return tl.where(m == float("-inf"), 0.0, m), inv


@triton.autotune(configs=_configs(), key=_TUNING_KEY, prune_configs_by=_PRUNE)
@triton.jit
def qna_forward_kernel(s_ptr, v_ptr, b_ptr, w_ptr, z_ptr, max_ptr, inv_ptr,
                       B, H, W, OH, OW, HEADS, D, NQ,
                       K: tl.constexpr, STRIDE: tl.constexpr, NQ_P: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """z (B, OH, OW, h*d), window max and 1/den (B, OH, OW, Nq*h); grid (h * tiles of B*OH*OW, blocks of d)."""
    head, _, b, p, offs = _tile(tl.cdiv(_flat(B, 0, 1, OH * OW), BLOCK_P), OH * OW, BLOCK_P)
    pid_d = tl.program_id(1)
    PAD: tl.constexpr = (K - 1) // 2
    CS = NQ * HEADS
    F = HEADS * D
    p_ok = b < B
    oy = p // OW
    ox = p % OW
    offs_n = tl.arange(0, NQ_P)
    n_ok = offs_n < NQ
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    m, inv = _window_softmax_stats(s_ptr, b_ptr, b, oy, ox, p_ok, offs_n, n_ok, head, H, W, HEADS, CS,
                                   K, STRIDE, BLOCK_P, NQ_P, ACC)
    acc = tl.zeros((BLOCK_P, BLOCK_D), ACC)
    for t in range(K * K):
        y = oy * STRIDE + t // K - PAD
        x = ox * STRIDE + t % K - PAD
        inside = p_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        mask = inside[:, None] & n_ok[None, :]
        pix = y * W + x
        s = tl.load(s_ptr + _flat(b, pix, H * W, CS)[:, None] + offs_n[None, :] * HEADS + head,
                    mask=mask, other=0.0).to(ACC)
        kernel_at = (offs_n * HEADS + head) * (K * K) + t
        bias = tl.load(b_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
        mix = tl.load(w_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
        prob = tl.exp(tl.where(mask, s + bias[None, :] - m, float("-inf"))) * inv
        coeff = tl.sum(prob * mix[None, :], axis=1)  # the Nq queries mixed into one weight per tap
        v = tl.load(v_ptr + _flat(b, pix, H * W, F)[:, None] + head * D + offs_d[None, :],
                    mask=inside[:, None] & d_ok[None, :], other=0.0).to(ACC)
        acc += coeff[:, None] * v

    z_at = z_ptr + _flat(offs, 0, 1, F)[:, None] + head * D + offs_d[None, :]
    tl.store(z_at, acc.to(z_ptr.dtype.element_ty), mask=p_ok[:, None] & d_ok[None, :])
    stat_at = _flat(offs, 0, 1, CS)[:, None] + offs_n[None, :] * HEADS + head
    stat_ok = p_ok[:, None] & n_ok[None, :] & (pid_d == 0)
    tl.store(max_ptr + stat_at, m, mask=stat_ok)
    tl.store(inv_ptr + stat_at, inv, mask=stat_ok)


@triton.autotune(configs=_configs(), key=_TUNING_KEY, prune_configs_by=_PRUNE)
@triton.jit
def qna_backward_delta_kernel(s_ptr, v_ptr, b_ptr, w_ptr, g_ptr, max_ptr, inv_ptr, delta_ptr,
                              B, H, W, OH, OW, HEADS, D, NQ,
                              K: tl.constexpr, STRIDE: tl.constexpr, NQ_P: tl.constexpr, HEAD_D: tl.constexpr,
                              ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """delta_n(o) = g(o) . z_n(o) = sum_j a_n(o, j) w_n(j) g(o).v_j, per output pixel: (B, OH, OW, Nq*h)."""
    head, _, b, p, offs = _tile(tl.cdiv(_flat(B, 0, 1, OH * OW), BLOCK_P), OH * OW, BLOCK_P)
    PAD: tl.constexpr = (K - 1) // 2
    CS = NQ * HEADS
    F = HEADS * D
    p_ok = b < B
    oy = p // OW
    ox = p % OW
    offs_n = tl.arange(0, NQ_P)
    n_ok = offs_n < NQ
    offs_d = tl.arange(0, HEAD_D)
    d_ok = offs_d < D
    stat_at = _flat(offs, 0, 1, CS)[:, None] + offs_n[None, :] * HEADS + head
    stat_ok = p_ok[:, None] & n_ok[None, :]
    m = tl.load(max_ptr + stat_at, mask=stat_ok, other=0.0)
    inv = tl.load(inv_ptr + stat_at, mask=stat_ok, other=0.0)
    g = tl.load(g_ptr + _flat(offs, 0, 1, F)[:, None] + head * D + offs_d[None, :],
                mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)

    delta = tl.zeros((BLOCK_P, NQ_P), ACC)
    for t in range(K * K):
        y = oy * STRIDE + t // K - PAD
        x = ox * STRIDE + t % K - PAD
        inside = p_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        mask = inside[:, None] & n_ok[None, :]
        pix = y * W + x
        s = tl.load(s_ptr + _flat(b, pix, H * W, CS)[:, None] + offs_n[None, :] * HEADS + head,
                    mask=mask, other=0.0).to(ACC)
        kernel_at = (offs_n * HEADS + head) * (K * K) + t
        bias = tl.load(b_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
        mix = tl.load(w_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
        prob = tl.exp(tl.where(mask, s + bias[None, :] - m, float("-inf"))) * inv
        v = tl.load(v_ptr + _flat(b, pix, H * W, F)[:, None] + head * D + offs_d[None, :],
                    mask=inside[:, None] & d_ok[None, :], other=0.0).to(ACC)
        gv = tl.sum(g * v, axis=1)
        delta += prob * mix[None, :] * gv[:, None]
    tl.store(delta_ptr + stat_at, delta, mask=stat_ok)


# `_size_partials` sizes part for the config that runs (and zeroes it), in tuning and after.
@triton.autotune(configs=_configs(_size_partials), key=_TUNING_KEY, prune_configs_by=_PRUNE)
@triton.jit
def qna_backward_kernel(s_ptr, v_ptr, b_ptr, w_ptr, g_ptr, max_ptr, inv_ptr, delta_ptr,
                        ds_ptr, dv_ptr, part_ptr,
                        B, H, W, OH, OW, HEADS, D, NQ,
                        K: tl.constexpr, STRIDE: tl.constexpr, NQ_P: tl.constexpr, HEAD_D: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """Gradients gathered per input pixel j over the outputs o whose window holds it (no atomics).

    With a = a_n(o, j), w = w_n(j - o), u = g(o).v_j and delta_n(o) from the kernel above:
    dv_j = sum_o sum_n w a g(o);  ds_n(j) = sum_o a (w u - delta_n(o)), also the logit gradient of the
    pair, summed over j into the bias partial; and a u summed over j into the mixing partial. Partials
    go to part (`partial_rows`, 2, Nq, h, k*k), a row per tile of a class, summed by the caller: each
    (o, j) pair is visited once. A program takes pixels of one parity class (y, x mod STRIDE), so at
    stride 2 it visits only the quarter of the taps that reach an output, the same for all its pixels;
    grid (h * tiles of the largest class's B * pixels, STRIDE^2).
    """
    py = tl.program_id(1) // STRIDE
    px = tl.program_id(1) % STRIDE
    PAD: tl.constexpr = (K - 1) // 2
    CS = NQ * HEADS
    F = HEADS * D
    class_w = (W - px + STRIDE - 1) // STRIDE
    count = tl.cdiv(_flat(B, 0, 1, ((H + STRIDE - 1) // STRIDE) * ((W + STRIDE - 1) // STRIDE)), BLOCK_P)
    class_pixels = ((H - py + STRIDE - 1) // STRIDE) * class_w  # 0 for a class past a map of one row or column
    head, tile, b, p, _ = _tile(count, tl.maximum(class_pixels, 1), BLOCK_P)
    p_ok = (b < B) & (class_pixels > 0)
    y = py + STRIDE * (p // tl.maximum(class_w, 1))
    x = px + STRIDE * (p % tl.maximum(class_w, 1))
    offs_n = tl.arange(0, NQ_P)
    n_ok = offs_n < NQ
    offs_d = tl.arange(0, HEAD_D)
    d_ok = offs_d < D
    s_at = _flat(b, y * W + x, H * W, CS)[:, None] + offs_n[None, :] * HEADS + head
    s_ok = p_ok[:, None] & n_ok[None, :]
    v_at = _flat(b, y * W + x, H * W, F)[:, None] + head * D + offs_d[None, :]
    v_ok = p_ok[:, None] & d_ok[None, :]
    s = tl.load(s_ptr + s_at, mask=s_ok, other=0.0).to(ACC)
    v = tl.load(v_ptr + v_at, mask=v_ok, other=0.0).to(ACC)

    ds = tl.zeros((BLOCK_P, NQ_P), ACC)
    dv = tl.zeros((BLOCK_P, HEAD_D), ACC)
    part_base = part_ptr + _flat(tl.program_id(1), tile, count, 2 * K * K * CS)
    # Output o with o * STRIDE + tap - PAD = j: the taps of this class's parity, y + PAD - tap >= -2 * PAD.
    for ty in range((py + PAD) % STRIDE, K, STRIDE):
        oy = (y + PAD - ty + STRIDE * K) // STRIDE - K  # offset: divide non-negative integers only
        for tx in range((px + PAD) % STRIDE, K, STRIDE):
            ox = (x + PAD - tx + STRIDE * K) // STRIDE - K
            valid = p_ok & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
            mask = valid[:, None] & n_ok[None, :]
            o = oy * OW + ox
            stat_at = _flat(b, o, OH * OW, CS)[:, None] + offs_n[None, :] * HEADS + head
            m = tl.load(max_ptr + stat_at, mask=mask, other=0.0)
            inv = tl.load(inv_ptr + stat_at, mask=mask, other=0.0)
            delta = tl.load(delta_ptr + stat_at, mask=mask, other=0.0)
            g = tl.load(g_ptr + _flat(b, o, OH * OW, F)[:, None] + head * D + offs_d[None, :],
                        mask=valid[:, None] & d_ok[None, :], other=0.0).to(ACC)
            kernel_at = (offs_n * HEADS + head) * (K * K) + ty * K + tx
            bias = tl.load(b_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
            mix = tl.load(w_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
            prob = tl.exp(tl.where(mask, s + bias[None, :] - m, float("-inf"))) * inv
            u = tl.sum(g * v, axis=1)
            dv += tl.sum(prob * mix[None, :], axis=1)[:, None] * g
            d_logit = prob * (mix[None, :] * u[:, None] - delta)
            ds += d_logit
            tl.store(part_base + kernel_at, tl.sum(d_logit, axis=0), mask=n_ok)
            tl.store(part_base + K * K * CS + kernel_at, tl.sum(prob * u[:, None], axis=0), mask=n_ok)

    tl.store(ds_ptr + s_at, ds.to(ds_ptr.dtype.element_ty), mask=s_ok)
    tl.store(dv_ptr + v_at, dv.to(dv_ptr.dtype.element_ty), mask=v_ok)
