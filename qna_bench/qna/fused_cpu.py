"""The fused CPU form of QnA's core (``fused_cpu.h``, ``fused_cpu_forward.cpp``, ``fused_cpu_backward.cpp``):
each window's denominators, numerators and gradients in direct loops over its taps, with no per-tap
temporaries.

The sources are compiled on first use by the machine's C++ compiler (``$CXX``, else ``g++``) for the CPU it
runs on (``-march=native``), with OpenMP, and kept in the disk cache (``$QNA_BENCH_CACHE_DIR``) under a
name that hashes the source, the compiler and the CPU's flags. A machine without a compiler, or whose
compile fails, lists no fused plan (`fused_unavailable` says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from qna_bench import disk_cache
from qna_bench.environment import cpuinfo_field
from qna_bench.qna.shapes import qna_output_size

HERE = Path(__file__).parent
SOURCES = (HERE / "fused_cpu_forward.cpp", HERE / "fused_cpu_backward.cpp")
HEADERS = (HERE / "fused_cpu.h",)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20")
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` compiles for them), or its architecture's name."""
    return cpuinfo_field("flags") or platform.machine()


def _compiler_identity(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The compiled library, or why there is none."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
    try:
        identity = _compiler_identity(compiler)
    except (OSError, subprocess.CalledProcessError) as error:
        return f"{compiler} --version failed: {error}"
    digest = hashlib.sha1()
    sources = b"".join(path.read_bytes() for path in (*HEADERS, *SOURCES))
    for part in (sources, identity.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()):
        digest.update(part + b"\0")
    folder = disk_cache.cache_dir() / "kernels"
    target = folder / f"qna_fused_cpu-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        error = _compile(compiler, folder, target)
        if error:
            return error
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        return f"loading {target} failed: {error}"


def _compile(compiler: str, folder: Path, target: Path) -> str | None:
    """Compiles the source to ``target`` through a temporary file (atomic: concurrent workers may both
    compile, and each renames a whole library into place); an error message, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".qna_fused_cpu.", suffix=".so")
        os.close(handle)
    except OSError as error:
        return f"no folder to compile into ({folder}): {error}"
    try:
        result = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", temporary], capture_output=True, text=True
        )
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            causes = [line for line in lines if any(word in line for word in ("error", "undefined", "multiple definition"))]
            first = (causes or lines or ["(no message)"])[0]
            return f"compiling the fused loops failed: {first}"
        os.replace(temporary, target)
        return None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def fused_unavailable() -> str | None:
    """Why the fused CPU form cannot run here, or None when it can (compiles on the first call)."""
    library = _library()
    return library if isinstance(library, str) else None


def _function(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"the fused CPU form is unavailable: {library}")
    if dtype not in SUFFIX:
        raise TypeError(f"the fused CPU form runs in float32 or float64, not {dtype}")
    function = getattr(library, f"{name}_{SUFFIX[dtype]}")
    function.restype = None
    return function


def _pointer(tensor: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _dims(exp_scores: Tensor, packed: Tensor, window: int, stride: int, partials: int) -> Tensor:
    batch, height, width, queries, heads = exp_scores.shape
    features = packed.shape[-1] - queries * heads
    out_size = (qna_output_size(height, window, stride), qna_output_size(width, window, stride))
    dims = (batch, height, width, queries, heads, features, window, stride, (window - 1) // 2, *out_size,
            packed.shape[-1], partials)
    return torch.tensor(dims, dtype=torch.int64)


def _tap_major(kernel: Tensor, dtype: torch.dtype) -> Tensor:
    """(Q, h, k, k) -> (k, k, Q*h) contiguous: the layout the loops read a tap's factors in."""
    return kernel.to(dtype).permute(2, 3, 0, 1).contiguous()


def _checked(exp_scores: Tensor, packed: Tensor) -> None:
    if exp_scores.device.type != "cpu" or not (exp_scores.is_contiguous() and packed.is_contiguous()):
        raise ValueError("the fused CPU form needs contiguous exp-scores and packed values on the CPU")
    if packed.dtype != exp_scores.dtype:
        raise TypeError(f"the fused CPU form needs packed values in {exp_scores.dtype}, not {packed.dtype}")


# Custom ops: the profiler names them, and FlopCounterMode counts them by the formulas of
# `qna_bench.layers` (it sees nothing inside a foreign call).
@torch.library.custom_op("qna_bench::fused_cpu_forward", mutates_args=())
def fused_forward(
    exp_scores: Tensor, packed: Tensor, den_kernel: Tensor, num_kernel: Tensor, stride: int, threshold: float,
    partials: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """z (B, H', W', F), the denominators (B, H', W', Q, h) and the first ``partials`` queries' shares of z,
    num / den (B, H', W', partials, F), for the backward, from exp_scores (B, H, W, Q, h) and packed
    (B, H, W, F + Q*h) in the same dtype, with the denominators' kernel exp(b) and the numerators' exp(b) *
    mixing (both (Q, h, k, k)). Each share divides by its denominator, or by 1 where that lies below
    ``threshold`` (an underflowed window, recomputed afterwards)."""
    _checked(exp_scores, packed)
    dtype = exp_scores.dtype
    dims = _dims(exp_scores, packed, den_kernel.shape[-1], stride, partials)
    batch, _, _, queries, heads = exp_scores.shape
    out_h, out_w, features = int(dims[9]), int(dims[10]), packed.shape[-1] - queries * heads
    z = exp_scores.new_empty(batch, out_h, out_w, features)
    den = exp_scores.new_empty(batch, out_h, out_w, queries, heads)
    shares = exp_scores.new_empty(batch, out_h, out_w, partials, features)
    rk, wk = _tap_major(den_kernel, dtype), _tap_major(num_kernel, dtype)
    _function("qna_forward", dtype)(
        _pointer(exp_scores), _pointer(packed), _pointer(rk), _pointer(wk), _pointer(dims),
        ctypes.c_double(threshold), _pointer(z), _pointer(den), _pointer(shares),
        ctypes.c_int(torch.get_num_threads()),
    )
    return z, den, shares


@torch.library.custom_op("qna_bench::fused_cpu_backward", mutates_args=())
def fused_backward(
    grad_z: Tensor, exp_scores: Tensor, packed: Tensor, den: Tensor, z: Tensor, partials: Tensor,
    den_kernel: Tensor, num_kernel: Tensor, stride: int, kernel_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of packed (B, H, W, F + Q*h: the values', then the scores' through exp), of the
    denominators' kernel and of the numerators' kernel (both (Q, h, k, k), summed over each head's
    channels; zeros without ``kernel_grads``), from the output's gradient and what the forward kept: the
    denominators (those below the underflow threshold already 1, their gradient 0), z (B, H', W', F, read
    where ``partials`` holds fewer shares than queries) and the shares of `fused_forward`."""
    _checked(exp_scores, packed)
    dtype = exp_scores.dtype
    queries, heads, window, _ = den_kernel.shape
    grad_z = grad_z.to(dtype).contiguous()
    den, partials = den.contiguous(), partials.contiguous()
    z = z.to(dtype).contiguous() if partials.shape[3] < queries else partials
    rk, wk = _tap_major(den_kernel, dtype), _tap_major(num_kernel, dtype)
    dims = _dims(exp_scores, packed, window, stride, partials.shape[3])
    inv_den, grad_den = torch.empty_like(den), torch.empty_like(den)
    grad_rk, grad_wk = torch.empty_like(rk), torch.empty_like(wk)
    grad_packed = exp_scores.new_empty(packed.shape)
    _function("qna_backward", dtype)(
        _pointer(grad_z), _pointer(exp_scores), _pointer(packed), _pointer(den), _pointer(z), _pointer(partials),
        _pointer(rk), _pointer(wk), _pointer(dims), ctypes.c_int(int(kernel_grads)), _pointer(inv_den),
        _pointer(grad_den), _pointer(grad_rk), _pointer(grad_wk), _pointer(grad_packed),
        ctypes.c_int(torch.get_num_threads()),
    )
    back = (2, 3, 0, 1)  # (k, k, Q, h) -> (Q, h, k, k)
    grad_den_kernel = grad_rk.view(window, window, queries, heads).permute(back).contiguous()
    grad_num_kernel = grad_wk.view(window, window, queries, heads).permute(back).contiguous()
    return grad_packed, grad_den_kernel, grad_num_kernel

