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
``rpe_bias`` and ``query_mixing`` (Nq, h, k, k). A program owns a tile of pixels of one image and one
head; the channel block is the vector dimension, so value loads are contiguous in NHWC.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Under the interpreter each config is a full run, so autotuning would multiply the test time: one config.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TUNING_KEY = ["OH", "OW", "HEADS", "D", "NQ", "K", "STRIDE"]


def _configs() -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_P": 128}, num_warps=1)]
    return [
        triton.Config({"BLOCK_P": block}, num_warps=warps)
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


# The backward's per-tile partial sums need a row per tile of the smallest pixel block any config uses.
MIN_BLOCK_P = min(config.kwargs["BLOCK_P"] for config in _configs())
_PRUNE = {"early_config_prune": _fitting}


@triton.jit
def _window_softmax_stats(s_base, b_ptr, oy, ox, p_ok, offs_n, n_ok, head, H, W, HEADS, CS,
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
        s = tl.load(s_base + (y * W + x)[:, None] * CS + offs_n[None, :] * HEADS + head,
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
                       H, W, OH, OW, HEADS, D, NQ,
                       K: tl.constexpr, STRIDE: tl.constexpr, NQ_P: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """z (B, OH, OW, h*d), window max and 1/den (B, OH, OW, Nq*h); grid (pixel tiles, B*h, blocks of d)."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    head = tl.program_id(1) % HEADS
    pid_d = tl.program_id(2)
    PAD: tl.constexpr = (K - 1) // 2
    CS = NQ * HEADS
    F = HEADS * D
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < OH * OW
    oy = offs_p // OW
    ox = offs_p % OW
    offs_n = tl.arange(0, NQ_P)
    n_ok = offs_n < NQ
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    s_base = s_ptr + b.to(tl.int64) * H * W * CS
    v_base = v_ptr + b.to(tl.int64) * H * W * F + head * D

    m, inv = _window_softmax_stats(s_base, b_ptr, oy, ox, p_ok, offs_n, n_ok, head, H, W, HEADS, CS,
                                   K, STRIDE, BLOCK_P, NQ_P, ACC)
    acc = tl.zeros((BLOCK_P, BLOCK_D), ACC)
    for t in range(K * K):
        y = oy * STRIDE + t // K - PAD
        x = ox * STRIDE + t % K - PAD
        inside = p_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        mask = inside[:, None] & n_ok[None, :]
        pix = y * W + x
        s = tl.load(s_base + pix[:, None] * CS + offs_n[None, :] * HEADS + head, mask=mask, other=0.0).to(ACC)
        kernel_at = (offs_n * HEADS + head) * (K * K) + t
        bias = tl.load(b_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
        mix = tl.load(w_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
        prob = tl.exp(tl.where(mask, s + bias[None, :] - m, float("-inf"))) * inv
        coeff = tl.sum(prob * mix[None, :], axis=1)  # the Nq queries mixed into one weight per tap
        v = tl.load(v_base + pix[:, None] * F + offs_d[None, :], mask=inside[:, None] & d_ok[None, :],
                    other=0.0).to(ACC)
        acc += coeff[:, None] * v

    out_base = b.to(tl.int64) * OH * OW
    z_at = z_ptr + (out_base + offs_p)[:, None] * F + head * D + offs_d[None, :]
    tl.store(z_at, acc.to(z_ptr.dtype.element_ty), mask=p_ok[:, None] & d_ok[None, :])
    stat_at = (out_base + offs_p)[:, None] * CS + offs_n[None, :] * HEADS + head
    stat_ok = p_ok[:, None] & n_ok[None, :] & (pid_d == 0)
    tl.store(max_ptr + stat_at, m, mask=stat_ok)
    tl.store(inv_ptr + stat_at, inv, mask=stat_ok)


@triton.autotune(configs=_configs(), key=_TUNING_KEY, prune_configs_by=_PRUNE)
@triton.jit
def qna_backward_delta_kernel(s_ptr, v_ptr, b_ptr, w_ptr, g_ptr, max_ptr, inv_ptr, delta_ptr,
                              H, W, OH, OW, HEADS, D, NQ,
                              K: tl.constexpr, STRIDE: tl.constexpr, NQ_P: tl.constexpr, HEAD_D: tl.constexpr,
                              ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """delta_n(o) = g(o) . z_n(o) = sum_j a_n(o, j) w_n(j) g(o).v_j, per output pixel: (B, OH, OW, Nq*h)."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    head = tl.program_id(1) % HEADS
    PAD: tl.constexpr = (K - 1) // 2
    CS = NQ * HEADS
    F = HEADS * D
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < OH * OW
    oy = offs_p // OW
    ox = offs_p % OW
    offs_n = tl.arange(0, NQ_P)
    n_ok = offs_n < NQ
    offs_d = tl.arange(0, HEAD_D)
    d_ok = offs_d < D
    s_base = s_ptr + b.to(tl.int64) * H * W * CS
    v_base = v_ptr + b.to(tl.int64) * H * W * F + head * D
    out_base = b.to(tl.int64) * OH * OW
    stat_at = (out_base + offs_p)[:, None] * CS + offs_n[None, :] * HEADS + head
    stat_ok = p_ok[:, None] & n_ok[None, :]
    m = tl.load(max_ptr + stat_at, mask=stat_ok, other=0.0)
    inv = tl.load(inv_ptr + stat_at, mask=stat_ok, other=0.0)
    g = tl.load(g_ptr + (out_base + offs_p)[:, None] * F + head * D + offs_d[None, :],
                mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)

    delta = tl.zeros((BLOCK_P, NQ_P), ACC)
    for t in range(K * K):
        y = oy * STRIDE + t // K - PAD
        x = ox * STRIDE + t % K - PAD
        inside = p_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        mask = inside[:, None] & n_ok[None, :]
        pix = y * W + x
        s = tl.load(s_base + pix[:, None] * CS + offs_n[None, :] * HEADS + head, mask=mask, other=0.0).to(ACC)
        kernel_at = (offs_n * HEADS + head) * (K * K) + t
        bias = tl.load(b_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
        mix = tl.load(w_ptr + kernel_at, mask=n_ok, other=0.0).to(ACC)
        prob = tl.exp(tl.where(mask, s + bias[None, :] - m, float("-inf"))) * inv
        v = tl.load(v_base + pix[:, None] * F + offs_d[None, :], mask=inside[:, None] & d_ok[None, :],
                    other=0.0).to(ACC)
        gv = tl.sum(g * v, axis=1)
        delta += prob * mix[None, :] * gv[:, None]
    tl.store(delta_ptr + stat_at, delta, mask=stat_ok)


# Rows of tiles a config does not reach must read 0: the autotuner zeroes part after benchmarking.
@triton.autotune(configs=_configs(), key=_TUNING_KEY, prune_configs_by=_PRUNE, reset_to_zero=["part_ptr"])
@triton.jit
def qna_backward_kernel(s_ptr, v_ptr, b_ptr, w_ptr, g_ptr, max_ptr, inv_ptr, delta_ptr,
                        ds_ptr, dv_ptr, part_ptr,
                        H, W, OH, OW, HEADS, D, NQ,
                        K: tl.constexpr, STRIDE: tl.constexpr, NQ_P: tl.constexpr, HEAD_D: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """Gradients gathered per input pixel j over the outputs o whose window holds it (no atomics).

    With a = a_n(o, j), w = w_n(j - o), u = g(o).v_j and delta_n(o) from the kernel above:
    dv_j = sum_o sum_n w a g(o);  ds_n(j) = sum_o a (w u - delta_n(o)), also the logit gradient of the
    pair, summed over j into the bias partial; and a u summed over j into the mixing partial. Partials
    go to part (STRIDE^2 * tiles, B, 2, Nq, h, k*k), summed by the caller: each (o, j) pair is visited once.
    A program takes pixels of one parity class (y, x mod STRIDE), so at stride 2 it visits only the
    quarter of the taps that reach an output, the same for all its pixels; grid (tiles, B*h, STRIDE^2).
    """
    pid_p = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    head = tl.program_id(1) % HEADS
    py = tl.program_id(2) // STRIDE
    px = tl.program_id(2) % STRIDE
    PAD: tl.constexpr = (K - 1) // 2
    CS = NQ * HEADS
    F = HEADS * D
    class_w = (W - px + STRIDE - 1) // STRIDE
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < ((H - py + STRIDE - 1) // STRIDE) * class_w
    y = py + STRIDE * (offs_p // class_w)
    x = px + STRIDE * (offs_p % class_w)
    offs_n = tl.arange(0, NQ_P)
    n_ok = offs_n < NQ
    offs_d = tl.arange(0, HEAD_D)
    d_ok = offs_d < D
    in_base = b.to(tl.int64) * H * W
    out_base = b.to(tl.int64) * OH * OW
    s_at = (in_base + y * W + x)[:, None] * CS + offs_n[None, :] * HEADS + head
    s_ok = p_ok[:, None] & n_ok[None, :]
    v_at = (in_base + y * W + x)[:, None] * F + head * D + offs_d[None, :]
    v_ok = p_ok[:, None] & d_ok[None, :]
    s = tl.load(s_ptr + s_at, mask=s_ok, other=0.0).to(ACC)
    v = tl.load(v_ptr + v_at, mask=v_ok, other=0.0).to(ACC)

    ds = tl.zeros((BLOCK_P, NQ_P), ACC)
    dv = tl.zeros((BLOCK_P, HEAD_D), ACC)
    tile = (tl.program_id(2) * tl.num_programs(0) + pid_p) * (tl.num_programs(1) // HEADS) + b
    part_base = part_ptr + tile.to(tl.int64) * (2 * CS * K * K)
    # Output o with o * STRIDE + tap - PAD = j: the taps of this class's parity, y + PAD - tap >= -2 * PAD.
    for ty in range((py + PAD) % STRIDE, K, STRIDE):
        oy = (y + PAD - ty + STRIDE * K) // STRIDE - K  # offset: divide non-negative integers only
        for tx in range((px + PAD) % STRIDE, K, STRIDE):
            ox = (x + PAD - tx + STRIDE * K) // STRIDE - K
            valid = p_ok & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
            mask = valid[:, None] & n_ok[None, :]
            o = out_base + oy * OW + ox
            stat_at = o[:, None] * CS + offs_n[None, :] * HEADS + head
            m = tl.load(max_ptr + stat_at, mask=mask, other=0.0)
            inv = tl.load(inv_ptr + stat_at, mask=mask, other=0.0)
            delta = tl.load(delta_ptr + stat_at, mask=mask, other=0.0)
            g = tl.load(g_ptr + o[:, None] * F + head * D + offs_d[None, :],
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
            tl.store(part_base + CS * K * K + kernel_at, tl.sum(prob * u[:, None], axis=0), mask=n_ok)

    tl.store(ds_ptr + s_at, ds.to(ds_ptr.dtype.element_ty), mask=s_ok)
    tl.store(dv_ptr + v_at, dv.to(dv_ptr.dtype.element_ty), mask=v_ok)
