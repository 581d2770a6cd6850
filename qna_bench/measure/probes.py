"""Machine probes: this device's peak compute and memory bandwidth, timed once per run in the measuring process.

Peak compute is the highest of a large GEMM, a compute-bound depthwise convolution and a dense 3×3
convolution (oneDNN's convolution kernels beat the GEMM on some CPUs); peak bandwidth the higher of a copy and a triad over
buffers far larger than the last-level cache. Each probe grows its size until one call takes
``target_s``, then keeps the fastest of ``repeats`` timed calls: a peak is the best the machine did.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# Probe sizes at scale 1; each doubling of the scale doubles the work.
GEMM_ROWS, GEMM_INNER = 256, 2048
CONV_BATCH, CONV_CHANNELS, CONV_SIZE, CONV_WINDOW = 1, 128, 56, 31
# A dense 3×3 convolution, oneDNN's best-tuned kernel: at 1 thread it ran 12% above the GEMM probe
# (dense 3×3, 56², C=64: 79.7 against 71.1 GFLOP/s, 2026-11-30), so the GEMM alone is no peak.
DENSE_CHANNELS, DENSE_WINDOW = 128, 3
# Bandwidth buffers: at least this many times the last-level cache, and at least this many bytes.
CACHE_MULTIPLE, MIN_STREAM_BYTES = 8, 256 * 2**20
# CUDA L2 caches are tens of MiB; its buffers start at 1 GiB.
CUDA_STREAM_BYTES = 2**30
MAX_SCALE = 1024


@dataclass(frozen=True)
class Timed:
    """One probe: ``work`` (FLOPs or bytes) done by one call that took ``seconds`` at its fastest."""

    work: int
    seconds: float
    size: str

    @property
    def rate(self) -> float:
        return self.work / self.seconds


@dataclass(frozen=True)
class MachineProbes:
    """Peak FLOP/s and bytes/s of this device, dtype and thread count, and what achieved them."""

    peak_flops: float
    peak_bytes_per_s: float
    method: str

    def columns(self) -> dict[str, object]:
        """The result-row columns that carry the probes."""
        return {
            "peak_flops_probe": self.peak_flops,
            "peak_bytes_per_s_probe": self.peak_bytes_per_s,
            "probe_method": self.method,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    call()  # warm-up: first-touch of the buffers, kernel selection
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def gemm_probe(device: torch.device, dtype: torch.dtype, scale: int = 1, repeats: int = 3) -> Timed:
    """(256·scale × 2048) @ (2048 × 2048): 2·m·k·n FLOPs."""
    rows = GEMM_ROWS * scale
    a = torch.randn(rows, GEMM_INNER, device=device).to(dtype)
    b = torch.randn(GEMM_INNER, GEMM_INNER, device=device).to(dtype)
    out = torch.empty(rows, GEMM_INNER, device=device, dtype=dtype)
    seconds = _fastest(lambda: torch.mm(a, b, out=out), device, repeats)
    return Timed(2 * rows * GEMM_INNER * GEMM_INNER, seconds, f"gemm {rows}x{GEMM_INNER}x{GEMM_INNER}")


def depthwise_probe(device: torch.device, dtype: torch.dtype, scale: int = 1, repeats: int = 3) -> Timed:
    """A 31×31 depthwise convolution over (scale, 128, 56, 56) channels_last: 961 multiply-adds per output
    element against 2 elements moved, compute-bound on any machine."""
    batch = CONV_BATCH * scale
    x = torch.randn(batch, CONV_CHANNELS, CONV_SIZE, CONV_SIZE, device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(CONV_CHANNELS, 1, CONV_WINDOW, CONV_WINDOW, device=device).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)

    def call() -> None:
        with torch.inference_mode():
            F.conv2d(x, w, padding=CONV_WINDOW // 2, groups=CONV_CHANNELS)

    seconds = _fastest(call, device, repeats)
    flops = 2 * batch * CONV_CHANNELS * CONV_SIZE * CONV_SIZE * CONV_WINDOW**2
    return Timed(flops, seconds, f"depthwise conv {CONV_WINDOW}x{CONV_WINDOW} over {batch}x{CONV_CHANNELS}x{CONV_SIZE}²")


def copy_probe(device: torch.device, dtype: torch.dtype, buffer_bytes: int, repeats: int = 3) -> Timed:
    """``dst.copy_(src)``: each byte read once and written once."""
    numel = buffer_bytes // dtype.itemsize
    src = torch.ones(numel, device=device, dtype=dtype)
    dst = torch.zeros_like(src)
    seconds = _fastest(lambda: dst.copy_(src), device, repeats)
    return Timed(2 * numel * dtype.itemsize, seconds, f"copy 2x{buffer_bytes / 2**20:.0f} MiB")


def triad_probe(device: torch.device, dtype: torch.dtype, buffer_bytes: int, repeats: int = 3) -> Timed:
    """``a = b + 2c``: two buffers read, one written."""
    numel = buffer_bytes // dtype.itemsize
    b = torch.ones(numel, device=device, dtype=dtype)
    c = torch.ones_like(b)
    a = torch.empty_like(b)
    seconds = _fastest(lambda: torch.add(b, c, alpha=2, out=a), device, repeats)
    return Timed(3 * numel * dtype.itemsize, seconds, f"triad 3x{buffer_bytes / 2**20:.0f} MiB")


def dense_conv_probe(device: torch.device, dtype: torch.dtype, scale: int = 1, repeats: int = 3) -> Timed:
    """A dense 3×3 convolution, 128 → 128 channels over (scale, 128, 56, 56) channels_last."""
    batch = CONV_BATCH * scale
    x = torch.randn(batch, DENSE_CHANNELS, CONV_SIZE, CONV_SIZE, device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(DENSE_CHANNELS, DENSE_CHANNELS, DENSE_WINDOW, DENSE_WINDOW, device=device).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)

    def call() -> None:
        with torch.inference_mode():
            F.conv2d(x, w, padding=DENSE_WINDOW // 2)

    seconds = _fastest(call, device, repeats)
    flops = 2 * batch * DENSE_CHANNELS * DENSE_CHANNELS * CONV_SIZE * CONV_SIZE * DENSE_WINDOW**2
    return Timed(flops, seconds, f"dense conv {DENSE_WINDOW}x{DENSE_WINDOW} over {batch}x{DENSE_CHANNELS}x{CONV_SIZE}²")


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (sysfs), 0 when it reports none."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        factor = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * factor)
        except ValueError:
            continue
    return max(sizes, default=0)


def stream_bytes(device: torch.device) -> int:
    """Bandwidth buffer size: far past the last-level cache."""
    if device.type == "cuda":
        return CUDA_STREAM_BYTES
    return max(MIN_STREAM_BYTES, CACHE_MULTIPLE * last_level_cache_bytes())


def grown(probe: Callable[[int], Timed], target_s: float) -> Timed:
    """``probe(scale)`` at the first doubling of the scale whose call takes at least ``target_s``."""
    scale = 1
    while True:
        timed = probe(scale)
        if timed.seconds >= target_s or scale >= MAX_SCALE:
            return timed
        scale *= 2


def measure_machine(device: str | torch.device, dtype: str | torch.dtype, threads: int, target_s: float = 0.05) -> MachineProbes:
    """Peak compute and bandwidth on ``device`` in ``dtype`` with ``threads`` torch threads (0: leave as is)."""
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if threads > 0:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        compute = [
            grown(lambda s: gemm_probe(device, dtype, s), target_s),
            grown(lambda s: depthwise_probe(device, dtype, s), target_s),
            grown(lambda s: dense_conv_probe(device, dtype, s), target_s),
        ]
        buffer_bytes = stream_bytes(device)
        bandwidth = [copy_probe(device, dtype, buffer_bytes), triad_probe(device, dtype, buffer_bytes)]
    best_compute = max(compute, key=lambda t: t.rate)
    best_bandwidth = max(bandwidth, key=lambda t: t.rate)
    described = "; ".join(f"{t.size}: {t.rate / 1e9:.1f} G/s" for t in (*compute, *bandwidth))
    return MachineProbes(best_compute.rate, best_bandwidth.rate, f"{dtype}, {torch.get_num_threads()} threads; {described}")


@functools.lru_cache(maxsize=8)
def machine_probes(device: str, dtype: str, threads: int) -> MachineProbes:
    """`measure_machine` once per process and (device, dtype, threads): the points of a run share it."""
    return measure_machine(device, dtype, threads)
