"""Parameter counts of a module."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Distinct parameter elements (shared parameters counted once)."""
    seen = {id(p): p.numel() for p in module.parameters()}
    return sum(seen.values())


def parameter_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
