"""A memory cap the measuring process survives: on Linux the OOM killer would end the whole sweep,
while an allocation refused under RLIMIT_AS raises an error the runner turns into an ``oom`` row."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

AUTOMATIC_FRACTION = 0.8


def _status_kib(field: str, path: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def available_bytes() -> int | None:
    kib = _status_kib("MemAvailable", "/proc/meminfo")
    return kib * 1024 if kib is not None else None


def address_space_bytes() -> int | None:
    kib = _status_kib("VmSize", "/proc/self/status")
    return kib * 1024 if kib is not None else None


@contextlib.contextmanager
def address_space_cap(cap_bytes: int | None, enabled: bool = True) -> Iterator[int | None]:
    """Limit the process to its current address space plus ``cap_bytes`` (default: 80% of available
    memory) while inside; yields the cap applied, or None where it cannot be applied."""
    size = address_space_bytes()
    if not enabled or size is None:
        yield None
        return
    if cap_bytes is None:
        available = available_bytes()
        if available is None:
            yield None
            return
        cap_bytes = int(available * AUTOMATIC_FRACTION)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + cap_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield cap_bytes
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
