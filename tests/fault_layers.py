"""Layers that misbehave on purpose, loaded into the CLI with ``plugins=[fault_layers]``."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from qna_bench.problem import Problem
from qna_bench.registry import register_layer


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected failure inside the layer")


class Hog(nn.Module):
    """Asks for 8 GiB per call: more than any memory cap the tests set."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.ones(2**31, dtype=torch.float32)
        return x * self.weight + big[0]


class Sleeps(nn.Module):
    """Takes ``seconds`` per call (window tenths of a second) and otherwise scales its input."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x * self.weight


_FAULT = dict(role="peer", family="fault", implementation="tests/fault_layers.py", layout="nhwc")


@register_layer("fault_raises", **_FAULT)
def build_raises(problem: Problem) -> nn.Module:
    return Raises()


@register_layer("fault_hog", **_FAULT)
def build_hog(problem: Problem) -> nn.Module:
    return Hog()


@register_layer("fault_sleeps", cost_grows_with_window=True, **_FAULT)
def build_sleeps(problem: Problem) -> nn.Module:
    return Sleeps(problem.window / 10)


class NativeHang(nn.Module):
    """Spends a minute inside one native call, where no Python signal handler runs."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctypes.CDLL(None).sleep(60)
        return x * self.weight


class Exits(nn.Module):
    """Ends its process on the spot, as a crash or the kernel's OOM killer would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os._exit(3)


class ProgressThenHang(NativeHang):
    """Opens a tqdm progress bar, as torch.compile does while it compiles, then hangs like `NativeHang`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tqdm import tqdm

        with tqdm(total=1, disable=True):
            pass
        return super().forward(x)


@register_layer("fault_progress_hang", **_FAULT)
def build_progress_hang(problem: Problem) -> nn.Module:
    return ProgressThenHang()


@register_layer("fault_native_hang", **_FAULT)
def build_native_hang(problem: Problem) -> nn.Module:
    return NativeHang()


@register_layer("fault_exits", **_FAULT)
def build_exits(problem: Problem) -> nn.Module:
    return Exits()


class KillsItself(nn.Module):
    """Ends its process with SIGKILL, as the kernel's OOM killer would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGKILL)


@register_layer("fault_kills_itself", **_FAULT)
def build_kills_itself(problem: Problem) -> nn.Module:
    return KillsItself()


@register_layer("fault_sleeps_flat", **_FAULT)
def build_sleeps_flat(problem: Problem) -> nn.Module:
    """`fault_sleeps` without a cost declared monotone in the window: no window of it is skipped."""
    return Sleeps(problem.window / 10)


# Layers that log each build to the file named by $QNA_BENCH_ORDER_LOG: the order points ran in.
ORDER_LOG = "QNA_BENCH_ORDER_LOG"


def _logged(name: str):
    def build(problem: Problem) -> nn.Module:
        with Path(os.environ[ORDER_LOG]).open("a") as log:
            log.write(f"{name} {problem.window} {problem.mode}\n")
        return Sleeps(0.0)

    return build


for _name in ("order_a", "order_b", "order_c"):
    register_layer(_name, **_FAULT)(_logged(_name))
