"""How numbers and shapes read in tables, figures and the console: one definition of each, without torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIB = 2**20


def image_size(shape: Mapping[str, Any]) -> str:
    """``64×64``: a problem's height × width."""
    return f"{shape['height']}×{shape['width']}"


def shape_label(shape: Mapping[str, Any], batch: bool = True) -> str:
    """``B=8, 64×64, C=64, 4 heads``: a problem's batch (unless ``batch`` is false), size, channels and heads."""
    return (f"B={shape['batch']}, " if batch else "") + (
        f"{image_size(shape)}, C={shape['channels']}, {shape['heads']} heads"
    )


def milliseconds(seconds: float, digits: int = 2) -> str:
    """``1.23 ms`` for 0.00123 seconds."""
    return f"{seconds * 1e3:.{digits}f} ms"


def mebibytes(size: float, digits: int = 1) -> str:
    """``1.5 MiB`` for 1572864 bytes."""
    return f"{size / MIB:.{digits}f} MiB"
