"""Where a point's time goes: a per-op breakdown from `torch.profiler`, taken after (never inside) the timed calls.

With ``measure.profile=true`` every measured point writes ``profiles/<layer>_<mode>_k<window>_<key>.md``
next to the parquet: the top ops by self time, each with its share of the profiled self time, the
FLOPs the profiler attributes to it and its number of calls. The row's ``profile_file`` names it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

PROFILES_DIR = "profiles"
TOP_OPS = 15


@dataclass(frozen=True)
class OpTime:
    """One op's totals over the profiled calls."""

    name: str
    self_s: float
    share: float
    flops: int
    calls: int


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto logs every profiler start and stop (and, without a GPU, a device-count error) from C++ to
    fd 2; in a sweep that is a console line per point. Python's own errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_ops(call: Callable[[], object], device: torch.device, calls: int = 3) -> list[OpTime]:
    """Every op's self time (on CUDA: device time), share, FLOPs and calls over ``calls`` calls, slowest first."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    call()  # outside the profile: lazy initialisation and first-touch are not the op's cost
    with _native_stderr_silenced(), profile(activities=activities, with_flops=True) as profiler:
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = [event for event in profiler.key_averages() if event.key]

    def self_us(event: Any) -> float:
        return float(event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total)

    total = sum(self_us(event) for event in events) or 1.0
    ops = [
        OpTime(event.key, self_us(event) / 1e6 / calls, self_us(event) / total, int(event.flops or 0) // calls,
               event.count // calls)
        for event in events
        if self_us(event) > 0
    ]
    return sorted(ops, key=lambda op: op.self_s, reverse=True)


def profile_name(row: dict[str, Any]) -> str:
    """The profile's path relative to the parquet's folder, from the row's identity."""
    return f"{PROFILES_DIR}/{row['layer']}_{row['mode']}_k{row['window']}_{row['point_key']}.md"


def render_profile(ops: list[OpTime], title: str, top: int = TOP_OPS) -> str:
    """Markdown: the ``top`` ops by self time per call, then what the rest add up to."""
    lines = [
        f"# {title}",
        "",
        "Per call, from torch.profiler after the timed calls; self time excludes the ops each op calls.",
        "",
        "| op | self ms | share | GFLOP | calls |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{op.name}` | {op.self_s * 1e3:.3f} | {op.share:.1%} | {op.flops / 1e9:.3f} | {op.calls} |"
        for op in ops[:top]
    ]
    rest = ops[top:]
    if rest:
        lines.append(
            f"| {len(rest)} other ops | {sum(op.self_s for op in rest) * 1e3:.3f} | "
            f"{sum(op.share for op in rest):.1%} | {sum(op.flops for op in rest) / 1e9:.3f} | "
            f"{sum(op.calls for op in rest)} |"
        )
    return "\n".join(lines) + "\n"


def write_profile(call: Callable[[], object], device: torch.device, row: dict[str, Any], results_dir: str | Path) -> str:
    """Profile ``call`` and write the breakdown for ``row``'s point under ``results_dir``; its relative path."""
    name = profile_name(row)
    title = (
        f"{row['layer']} {row['mode']}, k={row['window']}: B={row['batch']}, {row['height']}×{row['width']}, "
        f"C={row['channels']}, {row['heads']} heads, {row['dtype']} on {row['device']}"
    )
    path = Path(results_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_profile(profile_ops(call, device), title), encoding="utf-8")
    return name
