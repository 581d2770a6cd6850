"""The caches a machine reports (sysfs on a CPU, the device's properties on a GPU), which size the probes'
working sets; ``$QNA_BENCH_LLC_BYTES`` overrides the last level."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

LLC_OVERRIDE_ENV = "QNA_BENCH_LLC_BYTES"
_SIZE_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}


@dataclass(frozen=True)
class CacheSizes:
    """The caches the probes size their working sets from: ``l2_bytes`` the L2 of the measuring threads
    together (one core's L2 × threads on a CPU), ``llc_bytes`` the last-level cache; 0 where unknown.
    ``source`` says where they came from (sysfs, the GPU's properties, the `LLC_OVERRIDE_ENV` override)."""

    l2_bytes: int
    llc_bytes: int
    source: str


def parse_size(text: str) -> int:
    """``"480M"``, ``"480MiB"``, ``"32K"`` or a plain byte count."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = _SIZE_SUFFIXES.get(cleaned[-1:], 1)
    number = cleaned[:-1] if cleaned[-1:] in _SIZE_SUFFIXES else cleaned
    value = int(float(number) * factor)
    if value <= 0:
        raise ValueError(f"{text!r}: not a positive size")
    return value


def _sysfs_caches(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[int, int]:
    """Cache level → size in bytes of cpu0's data or unified caches, as Linux reports them."""
    sizes: dict[int, int] = {}
    for index in root.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            sizes[level] = max(sizes.get(level, 0), parse_size((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    return sizes


def cache_sizes(device: str | torch.device, threads: int, environ: dict[str, str] | None = None) -> CacheSizes:
    """The L2 the ``threads`` measuring threads use together and the LLC; ``$QNA_BENCH_LLC_BYTES``
    (e.g. ``480M``) overrides the LLC the machine reports."""
    device = torch.device(device)
    environ = os.environ if environ is None else environ
    if device.type == "cuda":
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
        sizes, source = CacheSizes(l2, l2, "GPU properties"), "GPU properties"
    else:
        levels = _sysfs_caches()
        l2 = levels.get(2, 0) * max(1, threads)
        sizes, source = CacheSizes(l2, max(levels.values(), default=0), "sysfs"), "sysfs"
    override = environ.get(LLC_OVERRIDE_ENV)
    if override:
        sizes = CacheSizes(sizes.l2_bytes, parse_size(override), f"{source}, LLC from ${LLC_OVERRIDE_ENV}")
    return sizes
