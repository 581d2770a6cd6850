"""Machine probes: this device's peak compute and the bandwidth of each memory level, measured once per
machine and settings, in the sweep process, and cached on disk (`qna_bench.disk_cache`).

Peak compute is the highest of a large GEMM, a compute-bound depthwise convolution and a dense 3×3
convolution (oneDNN's convolution kernels beat the GEMM on some CPUs). Bandwidth is measured per level,
after the Empirical Roofline Toolkit and cache-aware rooflines: a copy and a triad over a working set
that fits the L2 caches of the measuring threads, one that fits the last-level cache (LLC) and one that
does not, each sized from the cache sizes and never more than a small share of the memory there is
(`DRAM_MAX_SHARE` of what is available, `DRAM_MAX_BYTES` at most). Each probe keeps the fastest of a few
timed calls: a peak is the best the machine did.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TextIO

import torch
import torch.nn.functional as F

from qna_bench.disk_cache import JsonStore
from qna_bench.environment import device_name, utc_now
from qna_bench.measure.caches import LLC_OVERRIDE_ENV, CacheSizes, cache_sizes
from qna_bench.measure.caches import parse_size as parse_size  # re-exported: probes.parse_size reads the same
from qna_bench.memcap import available_bytes
from qna_bench.text import MIB

# Probe sizes at scale 1; each doubling of the scale doubles the work.
GEMM_ROWS, GEMM_INNER = 256, 2048
CONV_BATCH, CONV_CHANNELS, CONV_SIZE, CONV_WINDOW = 1, 128, 56, 31
# A dense 3×3 convolution, oneDNN's best-tuned kernel: at 1 thread it ran 12% above the GEMM probe
# (dense 3×3, 56², C=64: 79.7 against 71.1 GFLOP/s, 2026-11-30), so the GEMM alone is no peak.
DENSE_CHANNELS, DENSE_WINDOW = 128, 3
MAX_SCALE = 1024
# Bumped when a probe measures differently: cached probes of an older method are measured again.
PROBE_METHOD_VERSION = 2
# A cache level's working set is this share of its size (the rest holds code, stack, page tables).
CACHE_SHARE = 0.5
# The DRAM working set: this many times the LLC, at least DRAM_MIN_BYTES, and never more than
# DRAM_MAX_SHARE of available memory nor DRAM_MAX_BYTES. A VM that reports a 480 MiB L3 once made the
# probes hold 11 GiB per worker, and parallel workers died of it (2026-12-05). At 256 MiB, a tiny sweep's
# process peaked at 1.66 GB resident under a 480 MiB LLC (its imports alone hold about 1.1 GB).
DRAM_CACHE_MULTIPLE, DRAM_MIN_BYTES, DRAM_MAX_BYTES, DRAM_MAX_SHARE = 4, 64 * 2**20, 128 * 2**20, 1 / 8
# One timed bandwidth sample loops its call until it takes this long (small buffers copy in microseconds).
SAMPLE_S = 0.002
# A cached probe older than this is measured again.
MAX_AGE_S = 24 * 3600
PROBE_MODES = ("cached", "fresh", "off")
# A nearer memory level this many times slower than a farther one marks probes measured while other work
# held the cores (an L2 copy at 0.1 GB/s against DRAM's 11.2); nearby levels may measure alike (an L2
# copy at 145 GB/s and an LLC triad at 155 on an EPYC), so a small inversion is no sign.
OUT_OF_ORDER_FACTOR = 2.0


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
    """Peak FLOP/s and the bandwidth of each memory level (bytes/s; None where not measured) of this
    device, dtype and thread count, the cache sizes they assumed, and what achieved them."""

    peak_flops: float | None
    peak_bytes_per_s: float | None  # past the last-level cache (DRAM, or GPU memory)
    peak_bytes_per_s_l2: float | None
    peak_bytes_per_s_llc: float | None
    l2_bytes: int | None
    llc_bytes: int | None
    method: str | None

    @classmethod
    def none(cls) -> MachineProbes:
        """No probes: a run with ``measure.probes=off``, or whose probes failed."""
        return cls(None, None, None, None, None, None, None)

    def columns(self) -> dict[str, object]:
        """The result-row columns that carry the probes."""
        return {
            "peak_flops_probe": self.peak_flops,
            "peak_bytes_per_s_probe": self.peak_bytes_per_s,
            "peak_bytes_per_s_l2_probe": self.peak_bytes_per_s_l2,
            "peak_bytes_per_s_llc_probe": self.peak_bytes_per_s_llc,
            "l2_bytes_probe": self.l2_bytes,
            "llc_bytes_probe": self.llc_bytes,
            "probe_method": self.method,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest(call: Callable[[], object], device: torch.device, repeats: int, loops: int = 1) -> float:
    """Seconds of one call at its fastest over ``repeats`` samples of ``loops`` calls each."""
    call()  # warm-up: first-touch of the buffers, kernel selection
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            call()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def _loops_for(call: Callable[[], object], device: torch.device) -> int:
    """Calls per timed sample so that one sample takes about `SAMPLE_S`."""
    call()
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return max(1, math.ceil(SAMPLE_S / max(time.perf_counter() - start, 1e-7)))


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


def copy_probe(device: torch.device, dtype: torch.dtype, working_set_bytes: int, repeats: int = 3) -> Timed:
    """``dst.copy_(src)`` over two buffers of half the working set: each byte read once and written once."""
    numel = max(1, working_set_bytes // 2 // dtype.itemsize)
    src = torch.ones(numel, device=device, dtype=dtype)
    dst = torch.zeros_like(src)

    def call() -> None:
        dst.copy_(src)

    seconds = _fastest(call, device, repeats, _loops_for(call, device))
    return Timed(2 * numel * dtype.itemsize, seconds, f"copy {_mib(2 * numel * dtype.itemsize)}")


def triad_probe(device: torch.device, dtype: torch.dtype, working_set_bytes: int, repeats: int = 3) -> Timed:
    """``a = b + 2c`` over three buffers of a third of the working set: two read, one written."""
    numel = max(1, working_set_bytes // 3 // dtype.itemsize)
    b = torch.ones(numel, device=device, dtype=dtype)
    c = torch.ones_like(b)
    a = torch.empty_like(b)

    def call() -> None:
        torch.add(b, c, alpha=2, out=a)

    seconds = _fastest(call, device, repeats, _loops_for(call, device))
    return Timed(3 * numel * dtype.itemsize, seconds, f"triad {_mib(3 * numel * dtype.itemsize)}")


def _mib(size: int) -> str:
    return f"{size / MIB:.3g} MiB"


def memory_budget_bytes(device: torch.device, cap_bytes: int | None = None) -> int:
    """The most a DRAM probe may hold: `DRAM_MAX_SHARE` of the memory available (of the device's free
    memory on a GPU; of ``cap_bytes`` too where a cap applies), `DRAM_MAX_BYTES` at most."""
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = available_bytes() or DRAM_MIN_BYTES
    if cap_bytes:
        available = min(available, cap_bytes)
    return int(min(DRAM_MAX_BYTES, DRAM_MAX_SHARE * available))


@dataclass(frozen=True)
class WorkingSets:
    """The working set (bytes) each bandwidth level is probed with; 0: that level is not probed."""

    l2: int
    llc: int
    dram: int
    note: str


def working_sets(caches: CacheSizes, budget_bytes: int) -> WorkingSets:
    """L2: half the L2 of the threads; LLC: half the LLC, where it is a level of its own (at least 4× the
    L2); DRAM: `DRAM_CACHE_MULTIPLE` × the LLC, within ``budget_bytes``. A DRAM working set the budget
    holds under that multiple is said in ``note``: its roof may then be read partly from cache."""
    l2 = int(CACHE_SHARE * caches.l2_bytes)
    llc = int(CACHE_SHARE * caches.llc_bytes) if caches.llc_bytes >= 4 * caches.l2_bytes else 0
    wanted = max(DRAM_MIN_BYTES, DRAM_CACHE_MULTIPLE * caches.llc_bytes)
    dram = min(wanted, budget_bytes)
    note = ""
    if dram < wanted:
        note = (f"DRAM working set {_mib(dram)} held to the memory budget, under {DRAM_CACHE_MULTIPLE}x the "
                f"{_mib(caches.llc_bytes)} LLC: its roof may be read partly from cache")
    return WorkingSets(min(l2, budget_bytes), min(llc, budget_bytes), dram, note)


def grown(probe: Callable[[int], Timed], target_s: float) -> Timed:
    """The fastest rate of ``probe(scale)`` over the doublings of the scale up to the first whose call
    takes at least ``target_s``. A size that fits the caches can run faster than the large one a long
    call needs: on a 2-core AVX-512 EPYC the dense 3x3 probe read 504 GFLOP/s at scale 4 and 410 at 32,
    while the benchmark's dense convolutions reached 505-556."""
    scale = 1
    tried: list[Timed] = []
    while True:
        tried.append(probe(scale))
        if tried[-1].seconds >= target_s or scale >= MAX_SCALE:
            return max(tried, key=lambda t: t.rate)
        scale *= 2


def _bandwidth(device: torch.device, dtype: torch.dtype, working_set: int) -> Timed | None:
    if working_set <= 0:
        return None
    return max((copy_probe(device, dtype, working_set), triad_probe(device, dtype, working_set)),
               key=lambda t: t.rate)


def measure_machine(
    device: str | torch.device, dtype: str | torch.dtype, threads: int, target_s: float = 0.05,
    cap_bytes: int | None = None, environ: dict[str, str] | None = None,
) -> MachineProbes:
    """Peak compute and each level's bandwidth on ``device`` in ``dtype`` with ``threads`` torch threads
    (0: leave as is)."""
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if threads > 0:
        torch.set_num_threads(threads)
    caches = cache_sizes(device, torch.get_num_threads(), environ)
    sets = working_sets(caches, memory_budget_bytes(device, cap_bytes))
    with torch.inference_mode():
        compute = [
            grown(lambda s: gemm_probe(device, dtype, s), target_s),
            grown(lambda s: depthwise_probe(device, dtype, s), target_s),
            grown(lambda s: dense_conv_probe(device, dtype, s), target_s),
        ]
        l2, llc, dram = (_bandwidth(device, dtype, size) for size in (sets.l2, sets.llc, sets.dram))
    best_compute = max(compute, key=lambda t: t.rate)
    described = "; ".join(
        f"{label}{t.size}: {t.rate / 1e9:.1f} G/s"
        for label, t in (*(("", t) for t in compute), ("L2 ", l2), ("LLC ", llc), ("DRAM ", dram)) if t is not None
    )
    caches_text = f"L2 {_mib(caches.l2_bytes)}, LLC {_mib(caches.llc_bytes)} ({caches.source})"
    return MachineProbes(
        peak_flops=best_compute.rate,
        peak_bytes_per_s=dram.rate,
        peak_bytes_per_s_l2=l2.rate if l2 else None,
        peak_bytes_per_s_llc=llc.rate if llc else None,
        l2_bytes=caches.l2_bytes or None,
        llc_bytes=caches.llc_bytes or None,
        method="; ".join(filter(None, [f"{dtype}, {torch.get_num_threads()} threads; {caches_text}; {described}",
                                       sets.note])),
    )


def probe_key(device: str, dtype: str, threads: int, environ: dict[str, str] | None = None) -> str:
    """What a cached probe is valid for: the machine (host, device name with its instruction set),
    dtype, threads, torch version and the LLC override."""
    environ = os.environ if environ is None else environ
    override = environ.get(LLC_OVERRIDE_ENV, "")
    return "|".join([socket.gethostname(), device_name(device), dtype, str(threads), torch.__version__,
                     f"llc={override}", f"method={PROBE_METHOD_VERSION}"])


def machine_probes(
    device: str, dtype: str, threads: int, mode: str = "cached", *, store: JsonStore | None = None,
    cap_bytes: int | None = None, stream: TextIO | None = None, now: Callable[[], float] = time.time,
) -> MachineProbes:
    """The probes of this machine and settings: from the disk cache when ``mode`` is ``cached`` and an
    entry younger than `MAX_AGE_S` is there, else measured (and cached); ``off``: none. A probe that fails
    gives no probes and one warning line; it never stops the sweep."""
    if mode == "off":
        return MachineProbes.none()
    store = store if store is not None else JsonStore("probes")
    key = probe_key(device, dtype, threads)
    entry = store.get(key) if mode == "cached" else None
    if isinstance(entry, dict):
        try:
            if now() - float(entry["measured_at_s"]) < MAX_AGE_S:
                cached = MachineProbes(**entry["probes"])
                return MachineProbes(**{**asdict(cached), "method": f"{cached.method}; cached, measured {entry['measured_at']}"})
        except (KeyError, TypeError, ValueError):
            pass  # a foreign or older entry: measured again and replaced
    try:
        measured = measure_machine(device, dtype, threads, cap_bytes=cap_bytes)
    except Exception as exc:  # a probe that fails must not stop the sweep
        print(f"warning: the machine probes failed ({type(exc).__name__}: {exc}); rows carry no probes "
              "and no roofline", file=stream or sys.stderr)
        return MachineProbes.none()
    doubt = levels_out_of_order(measured)
    if doubt is not None:
        # A cache level slower than memory past it: the probe ran while other work held the cores (each
        # small copy then waits for its threads). Its cache roofs would judge points against nonsense.
        print(f"warning: the machine probes look wrong ({doubt}): this run uses DRAM's roof for every point, "
              "and the disk cache does not keep them", file=stream or sys.stderr)
        return replace(measured, peak_bytes_per_s_l2=None, peak_bytes_per_s_llc=None,
                       method=f"{measured.method}; cache roofs dropped, not cached: {doubt}")
    store.put(key, {"probes": asdict(measured), "measured_at_s": now(), "measured_at": utc_now()})
    return measured


def levels_out_of_order(measured: MachineProbes) -> str | None:
    """Why the bandwidths are implausible — a nearer memory level measured `OUT_OF_ORDER_FACTOR` times
    slower than a farther one — or None when they are in order (or absent)."""
    levels = [("L2", measured.peak_bytes_per_s_l2), ("LLC", measured.peak_bytes_per_s_llc),
              ("DRAM", measured.peak_bytes_per_s)]
    levels = [(name, rate) for name, rate in levels if rate]
    for (near, near_rate), (far, far_rate) in zip(levels, levels[1:]):
        if near_rate * OUT_OF_ORDER_FACTOR < far_rate:
            return f"the {near} copy ran at {near_rate / 1e9:.1f} GB/s, below the {far} copy's {far_rate / 1e9:.1f} GB/s"
    return None
