"""NATTEN's own `NeighborhoodAttention2D` (NA; DiNA when dilation > 1), with the backend NATTEN picks.

Without libnatten (no CUDA build) NATTEN's only backend is ``flex-fna``: torch's *eager* flex attention,
which builds the full (H·W)² score matrix and a fresh block mask on every call, forward only on CPU.
"""

from __future__ import annotations

import torch
from natten import HAS_LIBNATTEN, NeighborhoodAttention2D
from natten.backends import can_run_flex_attention, get_compatible_backends, get_compatible_fmha_backends
from natten.utils.checks import is_self_attention
from torch import nn

from baselines._common import (
    FLEX_CPU_BACKWARD,
    NA_STRIDE_WHY,
    attention_bytes,
    attention_flops,
    first_reason,
    na_constraints,
    natten_call,
    no_stride_reason,
)
from qna_bench.problem import Problem
from qna_bench.registry import register_layer

# What each backend NATTEN may pick means for the numbers in a row.
BACKEND_NOTES = {
    "flex-fna": (
        "eager flex attention: forward only on CPU, builds the full (HW)^2 score matrix "
        "and rebuilds its block mask on every call"
    ),
    "flex-fmha": "window covers the map: NATTEN runs plain self-attention on eager flex (full score matrix)",
}
# NATTEN's own fused kernels; any other backend stands in for them.
FUSED_BACKENDS = ("cutlass-fna", "hopper-fna", "blackwell-fna", "cutlass-fmha", "hopper-fmha", "blackwell-fmha")


def natten_fallback(backend: str) -> str:
    """Why a backend is not NATTEN's fused kernel ("" when it is one)."""
    if backend in FUSED_BACKENDS:
        return ""
    if not HAS_LIBNATTEN:
        return "NATTEN's fused kernels (libnatten) are not installed here; NATTEN fell back to " + backend
    return f"NATTEN chose {backend} over its fused kernels for this problem"


class NattenNeighborhoodAttention(nn.Module):
    """`natten.NeighborhoodAttention2D` as is (its qkv and proj, its kernel choice), channels-last input."""

    def __init__(self, channels: int, heads: int, window: int, dilation: int):
        super().__init__()
        self.attn = NeighborhoodAttention2D(channels, heads, kernel_size=window, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with natten_call(x):
            return self.attn(x)


def natten_backend(problem: Problem) -> str:
    """The backend NATTEN picks for this problem, by its own rules
    (`natten.functional.neighborhood_attention_generic`): an FMHA backend when the window covers the
    map (plain self-attention), else the first runnable of blackwell/hopper/cutlass/flex FNA.

    Raises NATTEN's own reason when no backend runs it (without libnatten, flex's: e.g. its head_dim rule).
    """
    q = torch.empty(
        problem.batch,
        problem.height,
        problem.width,
        problem.heads,
        problem.channels // problem.heads,
        dtype=problem.torch_dtype,
        device=problem.device,
    )  # never filled: the dispatcher looks at shape, dtype and device only
    if is_self_attention(q, (problem.window,) * 2, (False, False), has_additional_attention=False):
        q = q.flatten(1, 2)
        backends = get_compatible_fmha_backends(
            q, q, q, is_causal=False, is_varlen=False, torch_compile=False
        )
    else:
        backends = get_compatible_backends(q, q, q, torch_compile=False)
    if backends:
        return backends[0]
    can_run_flex_attention(q, q, q, torch_compile=False, raise_error=True)
    raise NotImplementedError("NATTEN found no backend for this problem")


def _unsupported(problem: Problem) -> str | None:
    reason = first_reason(
        no_stride_reason(problem, "na", NA_STRIDE_WHY),
        f"na on CPU: {FLEX_CPU_BACKWARD} (NATTEN's only CPU backend is torch's flex attention)"
        if problem.mode == "train" and problem.device == "cpu"
        else None,
    )
    if reason is None:
        try:
            natten_backend(problem)
        except (NotImplementedError, ValueError, RuntimeError) as exc:
            reason = f"na: no NATTEN backend runs this problem here: {exc}"
    return reason


def _flags(module: NattenNeighborhoodAttention, problem: Problem) -> dict:
    backend = natten_backend(problem)
    return {
        "natten_backend": backend,
        "natten_backend_note": BACKEND_NOTES.get(backend, ""),
        "natten_torch_compile": False,
        "backend": f"NATTEN {backend}",
        "fallback": natten_fallback(backend),
    }


def _flops(problem: Problem) -> int:
    tokens = problem.batch * problem.height * problem.width
    pixels = problem.height * problem.width
    # Eager flex computes every score and masks afterwards (NATTEN's fused CUDA kernels would not).
    return attention_flops(
        problem, qkv_tokens=tokens, out_tokens=tokens, pairs=problem.batch * pixels * pixels
    )


def natten_bytes(problem: Problem) -> int:
    """The attention shell, and eager flex attention's full (B, heads, HW, HW) scores written and read."""
    tokens = problem.batch * problem.height * problem.width
    pixels = problem.height * problem.width
    scores = problem.batch * problem.heads * pixels * pixels
    return attention_bytes(problem, qkv_tokens=tokens, out_tokens=tokens, core_intermediates=(scores,))


@register_layer(
    "na",
    forms=("gemm",),
    role="peer",
    family="neighborhood",
    cost_grows_with_window=True,
    implementation="natten.NeighborhoodAttention2D (backend chosen by NATTEN; flex-fna eager on CPU)",
    layout="nhwc",
    odd_window=True,
    window_within_map=True,
    dtypes=("float32", "bfloat16", "float16"),  # NATTEN's flex backend refuses float64
    description=(
        "NATTEN neighbourhood attention (DiNA when dilation > 1); on CPU eager flex attention, "
        "full score matrix, forward only; FLOPs counted analytically (dense, as executed)"
    ),
    constraints=na_constraints,
    unsupported=_unsupported,
    flags=_flags,
    analytic_flops=_flops,
    analytic_bytes=natten_bytes,
)
def build_na(problem: Problem) -> nn.Module:
    return NattenNeighborhoodAttention(problem.channels, problem.heads, problem.window, problem.dilation)
