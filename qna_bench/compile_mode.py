"""torch.compile as a form of a layer: the modes a sweep may ask for, and the wrapping of a built module.

``eager`` is the layer as built; every other mode is ``torch.compile(module, mode=...)`` with static
shapes, compiled on the point's first (warm-up) call.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

CompileMode = Literal["eager", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
EAGER = "eager"
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


def mode_of(value: Any) -> str:
    """A row's compile mode: rows written before the column, or with it null, ran eager."""
    return value if isinstance(value, str) and value else EAGER


def is_compiled(value: Any) -> bool:
    return mode_of(value) != EAGER


def form_label(mode: Any) -> str:
    """``compiled:default`` for a compiled form, "" for eager."""
    return f"compiled:{mode_of(mode)}" if is_compiled(mode) else ""


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
