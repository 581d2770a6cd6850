"""The environment a run measured on, read once per run and recorded in every row."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Environment:
    torch_version: str
    timm_version: str
    natten_version: str
    python_version: str
    device_name: str
    cpu_model: str
    hostname: str
    git_commit: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpuinfo_field(name: str) -> str | None:
    """The first ``name`` line of /proc/cpuinfo ("model name", "flags"), or None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels run with here (e.g. AVX2, AVX512). Machines sold
    under one model name differ in it, and with it by several times in speed: a depthwise 31x31
    convolution (B=8, 56x56, C=128, 2 threads) ran at 179 GFLOP/s on a 2-core "AMD EPYC" with AVX-512
    and at 41 on another with AVX2 (2026-11-30)."""
    return torch.backends.cpu.get_cpu_capability()


def device_name(device: str) -> str:
    """What a row was measured on, as the pairing of rows and the reports see it: the GPU's name, or the
    CPU's model and its instruction set ("cpu: AMD EPYC (AVX2)")."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu: {cpu_model()} ({cpu_capability()})"


def git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if result.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(_REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return result.stdout.strip() + ("-dirty" if dirty else "")


def read_environment(device: str) -> Environment:
    return Environment(
        torch_version=torch.__version__,
        timm_version=package_version("timm"),
        natten_version=package_version("natten"),
        python_version=platform.python_version(),
        device_name=device_name(device),
        cpu_model=cpu_model(),
        hostname=socket.gethostname(),
        git_commit=git_commit(),
    )


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
