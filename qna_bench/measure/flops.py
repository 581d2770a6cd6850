"""FLOPs of one call with `torch.utils.flop_counter.FlopCounterMode` (FLOPs = 2 × multiply-adds).

Ops the counter has no rule for count zero; a layer supplies formulas for its custom ops, and the
result says whether any were used. The counter's own rule for the weight gradient of a grouped
convolution ignores the groups (a depthwise one is overcounted C-fold); ours replaces it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# torch.utils.flop_counter imports dynamo (~1.3 s): imported where FLOPs are counted, not by every worker.

FLOP_COUNTER = "flop_counter"
FLOP_COUNTER_WITH_FORMULAS = "flop_counter+layer_formulas"


@dataclass(frozen=True)
class FlopStats:
    flops: int | None
    method: str
    note: str = ""


def convolution_backward_flops(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups,
    output_mask, out_shape=None, **kwargs,
) -> int:
    """FLOPs of ``aten.convolution_backward``, exact for any number of groups."""
    from torch.utils.flop_counter import conv_flop_count

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], transposed=not transposed)
    if output_mask[1]:
        # Every weight element is one product per batch element and per position of the map it slides over.
        positions = x_shape[2:] if transposed else grad_out_shape[2:]
        flops += 2 * math.prod(w_shape) * x_shape[0] * math.prod(positions)
    return flops


DEFAULT_FORMULAS = {torch.ops.aten.convolution_backward: convolution_backward_flops}


def count_flops(fn: Callable[[], object], formulas: Mapping[Any, Callable[..., int]] | None = None) -> FlopStats:
    """Total FLOPs of one call of ``fn`` (forward, plus backward if ``fn`` runs it)."""
    from torch._dynamo.exc import TorchDynamoException
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={**DEFAULT_FORMULAS, **(formulas or {})})
    try:
        with counter:
            fn()
    except (NotImplementedError, TorchDynamoException) as exc:
        # Compiled layers (flex attention) cannot always be traced under the counter's dispatch mode
        # (torch 2.11 on CUDA: dynamo's "Attempted to call function marked as skipped").
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        return FlopStats(None, "unavailable", f"FlopCounterMode cannot run this layer: {type(exc).__name__}: {first_line}")
    method = FLOP_COUNTER_WITH_FORMULAS if formulas else FLOP_COUNTER
    return FlopStats(int(counter.get_total_flops()), method)
