"""FLOPs of one call with `torch.utils.flop_counter.FlopCounterMode` (FLOPs = 2 × multiply-adds).

Ops the counter has no rule for count zero; a layer supplies formulas for its custom ops, and the
result says whether any were used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

FLOP_COUNTER = "flop_counter"
FLOP_COUNTER_WITH_FORMULAS = "flop_counter+layer_formulas"


@dataclass(frozen=True)
class FlopStats:
    flops: int | None
    method: str
    note: str = ""


def count_flops(fn: Callable[[], object], formulas: Mapping[Any, Callable[..., int]] | None = None) -> FlopStats:
    """Total FLOPs of one call of ``fn`` (forward, plus backward if ``fn`` runs it)."""
    counter = FlopCounterMode(display=False, custom_mapping=dict(formulas or {}))
    try:
        with counter:
            fn()
    except NotImplementedError as exc:
        return FlopStats(None, "unavailable", f"FlopCounterMode cannot run this layer: {str(exc).splitlines()[0][:300]}")
    method = FLOP_COUNTER_WITH_FORMULAS if formulas else FLOP_COUNTER
    return FlopStats(int(counter.get_total_flops()), method)
