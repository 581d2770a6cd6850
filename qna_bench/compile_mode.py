"""torch.compile as a form of a layer: the modes a sweep may ask for, and the wrapping of a built module.

``eager`` is the layer as built; every other mode is ``torch.compile(module, mode=...)`` with static
shapes, compiled on the point's first (warm-up) call.
"""

from __future__ import annotations

import torch

from qna_bench.labels import COMPILE_MODES, EAGER, CompileMode, form_label, is_compiled, mode_of

__all__ = ["COMPILE_MODES", "EAGER", "CompileMode", "form_label", "is_compiled", "mode_of"]
# Modes that capture CUDA graphs, which need a CUDA device.
CUDA_GRAPH_MODES = ("reduce-overhead",)
# Where torch.compile's own failures come from (tracing, lowering, code generation).
COMPILER_MODULES = ("torch._dynamo", "torch._inductor")


def compile_module(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``module`` itself for ``eager``, else ``torch.compile(module, mode=mode, dynamic=False)``."""
    if mode == EAGER:
        return module
    return torch.compile(module, mode=mode, dynamic=False)


def start_fresh() -> None:
    """Forget every earlier compilation and graph-break count: each point compiles afresh, with no cache
    entry or recompile count carried over from the point before."""
    from torch._dynamo.utils import counters  # imported on use: ~1 s that an eager sweep's workers skip

    torch._dynamo.reset()
    counters["graph_break"].clear()


def graph_breaks() -> int:
    """The graph breaks dynamo counted since `start_fresh`."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def unsupported_reason(mode: str, device: str) -> str | None:
    """Why ``mode`` cannot run on ``device``, or None."""
    if mode in CUDA_GRAPH_MODES and device != "cuda":
        return f"compile={mode}: CUDA graphs need a CUDA device"
    return None


def is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is torch.compile's own failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__module__.startswith(COMPILER_MODULES):
            return True
        seen = _inner(seen)
    return False


def _inner(exc: BaseException) -> BaseException | None:
    # BackendCompilerFailed holds the backend's exception as ``inner_exception`` (raised ``from None``).
    return exc.__cause__ or getattr(exc, "inner_exception", None)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception ``exc`` was raised from."""
    while (inner := _inner(exc)) is not None and inner is not exc:
        exc = inner
    return exc


def failure_reason(mode: str, one_line: str) -> str:
    return f"torch.compile(mode={mode}) failed: {one_line}"
