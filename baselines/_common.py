"""Pieces the attention peers share: the qkv/output-projection shell, NATTEN's neighbourhood rule,
capability reasons, and closed-form FLOP counts in `FlopCounterMode`'s conventions."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from natten import HAS_LIBNATTEN
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from qna_bench.measure.traffic import traffic_bytes
from qna_bench.problem import Problem

# --------------------------------------------------------------------------------------------------
# The attention shell: every attention peer projects x to q, k, v and back with the same two Linears.


class ProjectedAttention(nn.Module):
    """``proj(attend(qkv(x)))`` on channels-last input (B, H, W, C), heads laid out head-major.

    The parameter names (``qkv``, ``proj``) match `natten.NeighborhoodAttention2D`, so weights load
    across the neighbourhood-attention peers unchanged.
    """

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads={heads}: must divide channels={channels}")
        self.heads = heads
        self.head_dim = channels // heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, W, heads, d) ×3 → (B, H', W', heads, d)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).view(batch, height, width, 3, self.heads, self.head_dim)
        out = self.attend(*qkv.unbind(3))
        return self.proj(out.flatten(-2))


def to_sequence(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, heads, d) → (B, heads, H·W, d), the layout SDPA and flex attention take."""
    return t.flatten(1, 2).transpose(1, 2)


def from_sequence(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, heads, H·W, d) → (B, H, W, heads, d)."""
    return t.transpose(1, 2).unflatten(1, (height, width))


# --------------------------------------------------------------------------------------------------
# NATTEN's neighbourhood rule, per axis. Dilation d splits an axis into d interleaved groups
# (coordinate mod d); inside its group a query's k neighbours are a window centred on it, shifted
# (clamped) to stay inside the group at the borders, so every query has exactly k neighbours per axis.


def na_axis_allowed(query, key, length: int, window: int, dilation: int):
    """Whether ``key`` is among ``query``'s neighbours along one axis (integer tensors, broadcast).

    Closed form on purpose: it is also the body of the flex-attention ``mask_mod``, which must not
    index captured tensors to compile on CPU.
    """
    radius = window // 2
    if dilation == 1:
        # The same rule without the group arithmetic, which doubles a compiled mask_mod's cost.
        centre = torch.clamp(query, min=radius, max=length - 1 - radius)
        return (key - centre).abs() <= radius
    group = query % dilation
    group_length = (length - group + dilation - 1) // dilation
    centre = torch.minimum(torch.clamp(query // dilation, min=radius), group_length - 1 - radius)
    return ((key % dilation) == group) & ((key // dilation - centre).abs() <= radius)


def na_mask(height: int, width: int, window: int, dilation: int, device=None) -> torch.Tensor:
    """(H·W, H·W) boolean mask, True where the query (row) attends to the key (column)."""
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    along_h = na_axis_allowed(rows[:, None], rows[None, :], height, window, dilation)
    along_w = na_axis_allowed(cols[:, None], cols[None, :], width, window, dilation)
    return (along_h[:, None, :, None] & along_w[None, :, None, :]).reshape(height * width, height * width)


def na_constraints(problem: Problem) -> list[str]:
    """NATTEN's own input rule (stricter than the registry's reach check): window·dilation ≤ H and W."""
    span = problem.window * problem.dilation
    if span > min(problem.height, problem.width):
        return [
            f"window={problem.window}: neighbourhood attention needs window*dilation={span} "
            f"<= min(problem.height, problem.width)={min(problem.height, problem.width)}"
        ]
    return []


# --------------------------------------------------------------------------------------------------
# Capability gaps, worded once.

# torch's own message (torch.nn.attention.flex_attention._validate_device, torch 2.14), raised for
# eager and compiled flex attention alike; tests check that both flex-based layers really raise it.
FLEX_CPU_BACKWARD = "FlexAttention does not support backward on CPU"


# Why the neighbourhood-attention peers have no strided row: NATTEN's stride is another operation.
NA_STRIDE_WHY = "NATTEN's stride makes groups of queries share a window but keeps all H×W outputs"


def no_stride_reason(problem: Problem, layer: str, why: str) -> str | None:
    return (
        f"{layer} has no strided form ({why}); problem.stride={problem.stride}"
        if problem.stride != 1
        else None
    )


def no_dilation_reason(problem: Problem, layer: str) -> str | None:
    if problem.dilation != 1:
        return f"{layer} has no dilated form; problem.dilation={problem.dilation}"
    return None


def first_reason(*reasons: str | None) -> str | None:
    return next((reason for reason in reasons if reason), None)


# Under a TorchDispatchMode (FlopCounterMode) Dynamo runs a compiled function eagerly, and torch
# 2.14's flex attention cannot run under such a mode at all (pytorch/pytorch#134385: FlopCounterMode
# does not support higher-order ops). Both flex layers refuse such a pass before flex runs, so no pass
# runs flex eagerly in na_flex's place; the FLOP count is then "unavailable" and the closed form stands.
# (Peak memory comes from the profiler's allocator events, no dispatch mode, so flex layers have one.)
FLEX_UNDER_DISPATCH_MODE = (
    "flex attention is a HigherOrderOperator that no TorchDispatchMode can run in this torch "
    "(pytorch/pytorch#134385); this pass does not call it"
)

# What torch warns the first time natten runs flex attention on CPU: that it is eager (natten's only CPU
# backend; the row's natten_backend_note says what that costs) and that natten passes `return_lse`.
NATTEN_FLEX_WARNINGS = (
    (UserWarning, "flex_attention called without torch.compile"),
    (FutureWarning, "return_lse is deprecated"),
)


def refuse_under_dispatch_mode() -> None:
    if is_in_torch_dispatch_mode(include_infra_modes=False):
        raise NotImplementedError(FLEX_UNDER_DISPATCH_MODE)


@contextlib.contextmanager
def natten_call(x: torch.Tensor) -> Iterator[None]:
    """A call into natten on ``x``. Where natten runs eager flex attention (its only backend on CPU,
    and anywhere without libnatten): refused under a dispatch mode, the warnings above silenced.
    natten's own kernels (libnatten, on CUDA) run as they are."""
    if x.device.type != "cpu" and HAS_LIBNATTEN:
        yield
        return
    refuse_under_dispatch_mode()
    with warnings.catch_warnings():
        for category, message in NATTEN_FLEX_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


# --------------------------------------------------------------------------------------------------
# FLOPs (2 × multiply-adds), in FlopCounterMode's conventions so the analytic count cross-checks it:
# a matmul's backward is two matmuls of its size (input and weight/other-operand gradients), and a
# fused SDPA backward counts five (the scores are recomputed), i.e. 2.5× its forward.

MATMUL_BACKWARD = 2.0
FUSED_SDPA_BACKWARD = 2.5


def attention_flops(
    problem: Problem,
    *,
    qkv_tokens: int,
    out_tokens: int,
    pairs: int,
    attention_backward: float = MATMUL_BACKWARD,
) -> int:
    """Projections (qkv on ``qkv_tokens``, output on ``out_tokens``) plus QKᵀ and AV over ``pairs``
    (query, key) pairs actually computed, summed over the batch and with d·heads = C."""
    c = problem.channels
    projections = 2 * qkv_tokens * c * 3 * c + 2 * out_tokens * c * c
    scores = 2 * 2 * pairs * c
    if problem.mode != "train":
        return projections + scores
    return int(projections * (1 + MATMUL_BACKWARD) + scores * (1 + attention_backward))


def attention_bytes(
    problem: Problem,
    *,
    qkv_tokens: int,
    out_tokens: int,
    core_reads: int = 0,
    core_params: int = 0,
    core_intermediates: tuple[int, ...] = (),
) -> int:
    """Bytes of the attention shell around a core: x read, the qkv and output projections' weights
    and biases read, q/k/v and the attention output written and read back, the output written; plus
    what the core itself reads (a mask), its parameters (a bias table) and the intermediates it
    materialises (scores, probabilities, unfolded windows). Elements, as `traffic_bytes` takes them."""
    c = problem.channels
    pixels = problem.batch * problem.height * problem.width
    return traffic_bytes(
        problem,
        inputs=pixels * c + core_reads,
        params=4 * c * c + 4 * c + core_params,
        outputs=out_tokens * c,
        intermediates=(qkv_tokens * 3 * c, out_tokens * c, *core_intermediates),
    )


def _cpu_flash_forward_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch 2.14 registers FLOP formulas for the CUDA SDPA kernels only: on CPU, SDPA runs
# `_scaled_dot_product_flash_attention_for_cpu`, which FlopCounterMode would count as zero.
CPU_SDPA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
}
