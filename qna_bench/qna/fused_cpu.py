"""The fused CPU form of QnA's core (``fused_cpu.h``, ``fused_cpu_forward.cpp``, ``fused_cpu_backward.cpp``):
each window's denominators, numerators and gradients in direct loops over its taps, with no per-tap
temporaries, in vectors as wide as the compiler targets (64, 32 or 16 bytes), or as narrow as a call asks.

Every ``fused_cpu*.cpp`` here is compiled on first use by the machine's C++ compiler (``$CXX``, else
``g++``) for the CPU it runs on (``-march=native``, then the flags of ``$QNA_BENCH_CXXFLAGS``, read once at
import: e.g. ``-mno-avx512f`` builds the loops for a CPU without AVX-512), with OpenMP, within
`COMPILE_TIMEOUT_S`, and kept in the disk cache (``$QNA_BENCH_CACHE_DIR``, readable by its group) under a
name that hashes every source and header here, the compiler, the flags and the CPU's flags; processes
that need it at once compile it once, under a lock beside it. A cached library that does not load is
rebuilt once. A machine without a compiler, or whose compile fails or
times out, lists no fused plan (`fused_unavailable` says why; a failure is retried after
`RETRY_AFTER_S`).

The custom ops check every tensor at the door (`check_forward_args`, `check_backward_args`): a wrong
device, dtype, shape or layout is a one-line error naming the argument, never a raw pointer into C++.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from qna_bench import disk_cache
from qna_bench.environment import cpuinfo_field
from qna_bench.qna.shapes import STRIDES, qna_output_size

KERNELS_SUBDIR = "kernels"  # the compiled libraries' folder in the disk cache
HERE = Path(__file__).parent
CXXFLAGS_ENV = "QNA_BENCH_CXXFLAGS"
# Read once: the flags are part of the library's name, and of what a run records (`compile_flags`).
EXTRA_FLAGS: tuple[str, ...] = tuple(shlex.split(os.environ.get(CXXFLAGS_ENV, "")))
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-std=c++20", *EXTRA_FLAGS)
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# Both sources compile side by side in about 40 s on an idle 2-core EPYC; a busy machine takes a few times that.
COMPILE_TIMEOUT_S = 600.0
RETRY_AFTER_S = 600.0
LIBRARY_MODE = 0o644  # mkstemp makes 0600: other users of a shared cache could not load it
VECTOR_BYTES = (0, 16, 32, 64)  # a call's widest vectors (0: the widest compiled), capped at the compiled width

_P = ctypes.c_void_p
ARGTYPES = {
    "qna_forward": [_P, _P, _P, _P, _P, ctypes.c_double, _P, _P, _P, ctypes.c_int],
    "qna_backward": [_P] * 9 + [ctypes.c_int] + [_P] * 5 + [ctypes.c_int],
}


def sources() -> tuple[list[Path], list[Path]]:
    """The C++ sources and headers of the fused loops: every ``fused_cpu*.cpp`` and ``*.h`` here."""
    return sorted(HERE.glob("fused_cpu*.cpp")), sorted(HERE.glob("*.h"))


def compile_flags() -> str:
    """The compiler flags of the fused loops, as a run records them."""
    return " ".join(FLAGS)


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` compiles for them), or its architecture's name."""
    return cpuinfo_field("flags") or platform.machine()


def _compiler_identity(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout


@functools.cache
def _build_target() -> tuple[str, Path] | str:
    """The compiler and the cached library's path (named by the hash of what builds it), or why there is
    no compiler."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
    try:
        identity = _compiler_identity(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{compiler} --version failed: {error}"
    digest = hashlib.sha1()
    cpp, headers = sources()
    for path in (*headers, *cpp):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (identity, " ".join(FLAGS), _cpu_flags()):
        digest.update(part.encode() + b"\0")
    return compiler, disk_cache.cache_dir() / KERNELS_SUBDIR / f"qna_fused_cpu-{digest.hexdigest()[:16]}.so"


# What this process has loaded, and the failures it will not retry before `RETRY_AFTER_S` (by library path).
_loaded: dict[Path, ctypes.CDLL] = {}
_failed: dict[Path, tuple[str, float]] = {}


def _library() -> ctypes.CDLL | str:
    """The compiled library, or why there is none."""
    build = _build_target()
    if isinstance(build, str):
        return build
    compiler, target = build
    if target in _loaded:
        return _loaded[target]
    failure = _failed.get(target)
    if failure is not None and time.monotonic() - failure[1] < RETRY_AFTER_S:
        return failure[0]
    library = _load_or_build(compiler, target)
    if isinstance(library, str):
        _failed[target] = (library, time.monotonic())
        return library
    _failed.pop(target, None)
    _loaded[target] = library
    return library


@contextlib.contextmanager
def _compiling(target: Path) -> Iterator[None]:
    """Holds the lock of ``target``'s compile: processes that need the same library at once (the workers
    of a test run, the jobs of a sweep) compile it one at a time, and the others then load it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load_or_build(compiler: str, target: Path) -> ctypes.CDLL | str:
    """Loads ``target``, compiling it first where it is missing, and once more where it does not load."""
    for attempt in range(2):
        if attempt or not target.exists():
            try:
                with _compiling(target):
                    error = _compile(compiler, target) if attempt or not target.exists() else None
            except OSError as failure:
                error = f"no folder to compile into ({target.parent}): {failure}"
            if error:
                return error
        try:
            library = ctypes.CDLL(str(target))
        except OSError as error:
            if attempt:
                return f"loading {target} failed: {error}"
            continue
        for name, argtypes in ARGTYPES.items():
            for suffix in SUFFIX.values():
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, None
        library.qna_vector_bytes.argtypes, library.qna_vector_bytes.restype = [], ctypes.c_int
        library.qna_sweep_bytes.argtypes, library.qna_sweep_bytes.restype = [_P, ctypes.c_int], ctypes.c_int
        return library
    raise AssertionError("unreachable")


def _first_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    causes = [line for line in lines if any(word in line for word in ("error", "undefined", "multiple definition"))]
    return (causes or lines or ["(no message)"])[0]


def _compile(compiler: str, target: Path) -> str | None:
    """Compiles the sources side by side and links them to ``target`` through a temporary file renamed into
    place (a process loading it never reads half a library), all within `COMPILE_TIMEOUT_S`; an error
    message, or None. Callers hold `_compiling`."""
    folder = target.parent  # made by `_compiling`
    try:
        work = Path(tempfile.mkdtemp(dir=folder, prefix=".qna_fused_cpu."))
    except OSError as error:
        return f"no folder to compile into ({folder}): {error}"
    cpp, _ = sources()
    deadline = time.monotonic() + COMPILE_TIMEOUT_S
    try:
        objects = [work / f"{path.stem}.o" for path in cpp]
        steps = [[[compiler, *FLAGS, "-c", str(path), "-o", str(obj)] for path, obj in zip(cpp, objects)],
                 [[compiler, *FLAGS, "-shared", *map(str, objects), "-o", str(work / "library.so")]]]
        for commands in steps:
            processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                         for c in commands]
            try:
                errors = [p.communicate(timeout=max(deadline - time.monotonic(), 0.0))[1] for p in processes]
            except subprocess.TimeoutExpired:
                for p in processes:
                    p.kill()
                    p.wait()
                return f"compiling the fused loops timed out after {COMPILE_TIMEOUT_S:.0f} s"
            for process, stderr in zip(processes, errors):
                if process.returncode != 0:
                    return f"compiling the fused loops failed: {_first_error(stderr)}"
        os.chmod(work / "library.so", LIBRARY_MODE)
        os.replace(work / "library.so", target)
        return None
    except OSError as error:
        return f"compiling the fused loops failed: {error}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fused_unavailable() -> str | None:
    """Why the fused CPU form cannot run here, or None when it can (compiles on the first call)."""
    library = _library()
    return library if isinstance(library, str) else None


def vector_bytes() -> int | None:
    """The width of the vectors the fused loops were compiled for (64, 32 or 16 bytes), or None where
    they are unavailable."""
    library = _library()
    return None if isinstance(library, str) else int(library.qna_vector_bytes())


def sweep_bytes(features: int, heads: int, dtype: torch.dtype, vector_bytes: int = 0) -> int:
    """The width in bytes of the vectors the loops sweep ``features`` channels in ``heads`` heads in, in
    ``dtype`` with vectors of at most ``vector_bytes`` (0: the widest compiled): less than that where the
    head size fills no such vector (down to one element: plain scalars)."""
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"the fused CPU form is unavailable: {library}")
    dims = torch.zeros(14, dtype=torch.int64)
    dims[4], dims[5], dims[13] = heads, features, vector_bytes
    return int(library.qna_sweep_bytes(_pointer(dims), torch.empty(0, dtype=dtype).element_size()))


def _function(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"the fused CPU form is unavailable: {library}")
    return getattr(library, f"{name}_{SUFFIX[dtype]}")


def _pointer(tensor: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _dims(exp_scores: Tensor, packed: Tensor, window: int, stride: int, partials: int, vector_bytes: int) -> Tensor:
    batch, height, width, queries, heads = exp_scores.shape
    features = packed.shape[-1] - queries * heads
    out_size = (qna_output_size(height, window, stride), qna_output_size(width, window, stride))
    dims = (batch, height, width, queries, heads, features, window, stride, (window - 1) // 2, *out_size,
            packed.shape[-1], partials, vector_bytes)
    return torch.tensor(dims, dtype=torch.int64)


def _tap_major(kernel: Tensor) -> Tensor:
    """(Q, h, k, k) -> (k, k, Q*h) contiguous: the layout the loops read a tap's factors in."""
    return kernel.permute(2, 3, 0, 1).contiguous()


def _require(name: str, tensor: object, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise naming ``name`` unless it is a contiguous CPU tensor of ``shape`` and ``dtype``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: the fused CPU form needs a tensor, not {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}: the fused CPU form needs every tensor on the CPU")
    if tensor.dtype != dtype:
        raise TypeError(f"{name}.dtype={tensor.dtype}: the fused CPU form needs {dtype}, exp_scores' dtype")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}.shape={tuple(tensor.shape)}: the fused CPU form needs {shape}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: the fused CPU form needs a contiguous tensor (strides {tensor.stride()})")


def _check_core(exp_scores: Tensor, packed: Tensor, den_kernel: Tensor, num_kernel: Tensor, stride: int,
                partials: int, vector_bytes: int) -> tuple[int, int, int]:
    """The checks both passes share; returns the features and the output's height and width."""
    if not isinstance(exp_scores, Tensor) or exp_scores.dim() != 5:
        shape = tuple(exp_scores.shape) if isinstance(exp_scores, Tensor) else type(exp_scores).__name__
        raise ValueError(f"exp_scores: the fused CPU form needs (B, H, W, Q, h), not {shape}")
    if exp_scores.dtype not in SUFFIX:
        raise TypeError(f"exp_scores.dtype={exp_scores.dtype}: the fused CPU form runs in float32 or float64")
    batch, height, width, queries, heads = exp_scores.shape
    _require("exp_scores", exp_scores, tuple(exp_scores.shape), exp_scores.dtype)
    if not isinstance(den_kernel, Tensor) or den_kernel.dim() != 4 or den_kernel.shape[-1] % 2 == 0:
        shape = tuple(den_kernel.shape) if isinstance(den_kernel, Tensor) else type(den_kernel).__name__
        raise ValueError(f"den_kernel: the fused CPU form needs (Q, h, k, k) with k odd, not {shape}")
    window = den_kernel.shape[-1]
    kernel_shape = (queries, heads, window, window)
    _require("den_kernel", den_kernel, kernel_shape, exp_scores.dtype)
    _require("num_kernel", num_kernel, kernel_shape, exp_scores.dtype)
    if not isinstance(packed, Tensor) or packed.dim() != 4:
        shape = tuple(packed.shape) if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"packed: the fused CPU form needs (B, H, W, F + Q*h), not {shape}")
    features = packed.shape[-1] - queries * heads
    if features <= 0 or features % heads != 0:
        raise ValueError(f"packed.shape={tuple(packed.shape)}: its F = {features} features must be a positive "
                         f"multiple of the {heads} heads (after the Q*h = {queries * heads} scores)")
    _require("packed", packed, (batch, height, width, features + queries * heads), exp_scores.dtype)
    if stride not in STRIDES:
        raise ValueError(f"stride={stride}: the fused CPU form runs at stride {' or '.join(map(str, STRIDES))}")
    if not 0 <= partials <= queries:
        raise ValueError(f"partials={partials}: the fused CPU form keeps 0 to Q = {queries} queries' shares")
    if vector_bytes not in VECTOR_BYTES:
        raise ValueError(f"vector_bytes={vector_bytes}: the fused CPU form's vectors are "
                         f"{', '.join(map(str, VECTOR_BYTES[1:]))} bytes wide at most, or 0 (the widest compiled)")
    return features, qna_output_size(height, window, stride), qna_output_size(width, window, stride)


def check_forward_args(exp_scores: Tensor, packed: Tensor, den_kernel: Tensor, num_kernel: Tensor, stride: int,
                       partials: int, vector_bytes: int = 0) -> None:
    """Raise naming the first argument of `fused_forward` that the loops cannot take."""
    _check_core(exp_scores, packed, den_kernel, num_kernel, stride, partials, vector_bytes)


def check_backward_args(grad_z: Tensor, exp_scores: Tensor, packed: Tensor, den: Tensor, z: Tensor,
                        partials: Tensor, den_kernel: Tensor, num_kernel: Tensor, stride: int,
                        vector_bytes: int = 0) -> None:
    """Raise naming the first argument of `fused_backward` that the loops cannot take."""
    batch, _, _, queries, heads = exp_scores.shape if isinstance(exp_scores, Tensor) else (0,) * 5
    kept = partials.shape[3] if isinstance(partials, Tensor) and partials.dim() == 5 else -1
    features, out_h, out_w = _check_core(exp_scores, packed, den_kernel, num_kernel, stride, max(kept, 0),
                                         vector_bytes)
    if kept not in (queries - 1, queries):
        shape = tuple(partials.shape) if isinstance(partials, Tensor) else type(partials).__name__
        raise ValueError(f"partials.shape={shape}: the fused backward needs (B, H', W', Q-1 or Q, F) "
                         f"= ({batch}, {out_h}, {out_w}, {queries - 1} or {queries}, {features})")
    dtype = exp_scores.dtype
    _require("grad_z", grad_z, (batch, out_h, out_w, features), dtype)
    _require("den", den, (batch, out_h, out_w, queries, heads), dtype)
    _require("partials", partials, (batch, out_h, out_w, kept, features), dtype)
    if kept < queries:  # z is read only where the last query's share is z less the others
        _require("z", z, (batch, out_h, out_w, features), dtype)


# Custom ops: the profiler names them, and FlopCounterMode counts them by the formulas of
# `qna_bench.layers` (it sees nothing inside a foreign call).
@torch.library.custom_op("qna_bench::fused_cpu_forward", mutates_args=())
def fused_forward(
    exp_scores: Tensor, packed: Tensor, den_kernel: Tensor, num_kernel: Tensor, stride: int, threshold: float,
    partials: int, vector_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """z (B, H', W', F), the denominators (B, H', W', Q, h) and the first ``partials`` queries' shares of z,
    num / den (B, H', W', partials, F), for the backward, from exp_scores (B, H, W, Q, h) and packed
    (B, H, W, F + Q*h) in the same dtype, with the denominators' kernel exp(b) and the numerators' exp(b) *
    mixing (both (Q, h, k, k)). Each share divides by its denominator, or by 1 where that lies below
    ``threshold`` (an underflowed window, recomputed afterwards). Every tensor contiguous, on the CPU, in
    exp_scores' dtype (float32 or float64), F a multiple of h (`check_forward_args`). The channel sweeps
    use vectors of at most ``vector_bytes`` (`VECTOR_BYTES`; 0: the widest the loops were compiled for)."""
    check_forward_args(exp_scores, packed, den_kernel, num_kernel, stride, partials, vector_bytes)
    dtype = exp_scores.dtype
    dims = _dims(exp_scores, packed, den_kernel.shape[-1], stride, partials, vector_bytes)
    batch, _, _, queries, heads = exp_scores.shape
    out_h, out_w, features = int(dims[9]), int(dims[10]), packed.shape[-1] - queries * heads
    z = exp_scores.new_empty(batch, out_h, out_w, features)
    den = exp_scores.new_empty(batch, out_h, out_w, queries, heads)
    shares = exp_scores.new_empty(batch, out_h, out_w, partials, features)
    rk, wk = _tap_major(den_kernel), _tap_major(num_kernel)
    _function("qna_forward", dtype)(
        _pointer(exp_scores), _pointer(packed), _pointer(rk), _pointer(wk), _pointer(dims),
        threshold, _pointer(z), _pointer(den), _pointer(shares), torch.get_num_threads(),
    )
    return z, den, shares


@torch.library.custom_op("qna_bench::fused_cpu_backward", mutates_args=())
def fused_backward(
    grad_z: Tensor, exp_scores: Tensor, packed: Tensor, den: Tensor, z: Tensor, partials: Tensor,
    den_kernel: Tensor, num_kernel: Tensor, stride: int, kernel_grads: bool, vector_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of packed (B, H, W, F + Q*h: the values', then the scores' through exp), of the
    denominators' kernel and of the numerators' kernel (both (Q, h, k, k), summed over each head's
    channels; zeros without ``kernel_grads``), from the output's gradient and what the forward kept: the
    denominators (those below the underflow threshold already 1, their gradient 0), z (B, H', W', F, read
    where ``partials`` holds fewer shares than queries) and the shares of `fused_forward`, every tensor
    contiguous, on the CPU, in exp_scores' dtype (`check_backward_args`); ``vector_bytes`` as in
    `fused_forward`."""
    check_backward_args(grad_z, exp_scores, packed, den, z, partials, den_kernel, num_kernel, stride, vector_bytes)
    dtype = exp_scores.dtype
    queries, heads, window, _ = den_kernel.shape
    if partials.shape[3] == queries:
        z = partials  # not read: every query's share is kept
    rk, wk = _tap_major(den_kernel), _tap_major(num_kernel)
    dims = _dims(exp_scores, packed, window, stride, partials.shape[3], vector_bytes)
    inv_den, grad_den = torch.empty_like(den), torch.empty_like(den)
    grad_rk, grad_wk = torch.empty_like(rk), torch.empty_like(wk)
    grad_packed = exp_scores.new_empty(packed.shape)
    _function("qna_backward", dtype)(
        _pointer(grad_z), _pointer(exp_scores), _pointer(packed), _pointer(den), _pointer(z), _pointer(partials),
        _pointer(rk), _pointer(wk), _pointer(dims), int(kernel_grads), _pointer(inv_den),
        _pointer(grad_den), _pointer(grad_rk), _pointer(grad_wk), _pointer(grad_packed), torch.get_num_threads(),
    )
    back = (2, 3, 0, 1)  # (k, k, Q, h) -> (Q, h, k, k)
    grad_den_kernel = grad_rk.view(window, window, queries, heads).permute(back).contiguous()
    grad_num_kernel = grad_wk.view(window, window, queries, heads).permute(back).contiguous()
    return grad_packed, grad_den_kernel, grad_num_kernel

