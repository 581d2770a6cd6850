"""What the registry declares about a layer, looked up on use so that the pure analysis imports no torch.

Rows carry their layer's role; the registry is consulted only for facts a row does not hold (a model's
published size, a padded convolution's taps, the role of rows written before the column).
"""

from __future__ import annotations

from typing import Any


def find_layer(name: str) -> Any | None:
    """The registry's `LayerSpec` for ``name``, or None for a name it does not know."""
    from qna_bench.registry import find_layer as lookup  # imported on use: the registry loads torch

    return lookup(name)


def role_of(name: str) -> str | None:
    """The declared role of a registered layer, or None for a name the registry does not know."""
    spec = find_layer(name)
    return spec.role if spec is not None else None
