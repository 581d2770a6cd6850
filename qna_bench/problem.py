"""The problem spec: one frozen description of a benchmark point, and the tensors it builds.

Every layer of a sweep point receives the same `Problem`; the layer's adapter decides only which
layout it takes — ``nhwc`` (B, H, W, C), ``nchw`` (B, C, H, W) contiguous, or ``nchw_channels_last``
(B, C, H, W) shape over channels-last memory, what PyTorch's fast CPU convolutions want — and the
conversion happens here, outside any timed region. The spec itself imports no torch (the results side
reads its fields); torch is imported where a tensor or a dtype is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

Mode = Literal["forward", "train"]
Layout = Literal["nhwc", "nchw", "nchw_channels_last"]
Device = Literal["cpu", "cuda"]

MODES: tuple[str, ...] = get_args(Mode)
LAYOUTS: tuple[str, ...] = get_args(Layout)
DEVICES: tuple[str, ...] = get_args(Device)
# The dtypes a problem may name: each is torch's dtype of that name.
DTYPES: tuple[str, ...] = ("float32", "float64", "float16", "bfloat16")

POSITIVE_FIELDS = ("batch", "height", "width", "channels", "heads", "window", "stride", "dilation")


@dataclass(frozen=True)
class Problem:
    """One benchmark point's shape, numerics and mode.

    ``window`` is the k×k neighbourhood for QnA, neighbourhood attention, SASA and convolutions and the
    M×M window for Swin; layers that ignore it (global attention) say so in their registry entry.
    """

    batch: int = 8
    height: int = 56
    width: int = 56
    channels: int = 128
    heads: int = 4
    window: int = 3
    stride: int = 1
    dilation: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "forward"
    seed: int = 0

    def errors(self) -> list[str]:
        """Everything wrong with this spec on its own (layer constraints live in the registry)."""
        problems = []
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"problem.{name}={value!r}: must be a positive integer")
        if self.dtype not in DTYPES:
            problems.append(f"problem.dtype={self.dtype!r}: allowed values are {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            problems.append(f"problem.device={self.device!r}: allowed values are {', '.join(DEVICES)}")
        elif self.device == "cuda" and not _torch().cuda.is_available():
            problems.append("problem.device='cuda': no CUDA device is available on this machine (use cpu)")
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r}: allowed values are {', '.join(MODES)}")
        if not problems and self.channels % self.heads:
            problems.append(
                f"problem.heads={self.heads}: must divide problem.channels={self.channels} "
                f"(e.g. {', '.join(str(h) for h in _divisors(self.channels)[:6])})"
            )
        return problems

    def validate(self) -> Problem:
        errors = self.errors()
        if errors:
            raise ValueError(errors[0])
        return self

    def replace(self, **changes) -> Problem:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(_torch(), self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return _torch().device(self.device)

    @property
    def input_shape_nhwc(self) -> tuple[int, int, int, int]:
        return (self.batch, self.height, self.width, self.channels)

    @property
    def output_hw(self) -> tuple[int, int]:
        """Output height and width of a "same"-padded k×k window (padding dilation·(k−1)/2) at this stride."""
        pad = self.dilation * (self.window - 1) // 2
        reach = self.dilation * (self.window - 1) + 1
        return tuple((size + 2 * pad - reach) // self.stride + 1 for size in (self.height, self.width))

    def input_bytes(self) -> int:
        return self.batch * self.height * self.width * self.channels * self.torch_dtype.itemsize

    def make_input(self, layout: Layout) -> torch.Tensor:
        """A fresh, seeded input in the layer's layout, with gradients on in train mode."""
        torch = _torch()
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        x = torch.randn(self.input_shape_nhwc, generator=generator, dtype=torch.float32)
        x = x.to(device=self.torch_device, dtype=self.torch_dtype)
        if layout == "nchw":
            x = x.permute(0, 3, 1, 2).contiguous()
        elif layout == "nchw_channels_last":
            x = x.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: torch.channels_last, no copy
        elif layout != "nhwc":
            raise ValueError(f"layout={layout!r}: allowed values are {', '.join(LAYOUTS)}")
        return x.requires_grad_(self.mode == "train")

    def make_output_grad(self, output: torch.Tensor) -> torch.Tensor:
        """The upstream gradient of the train-mode loss ``<g, output>``: random, fixed, made before timing."""
        torch = _torch()
        generator = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        g = torch.randn(output.shape, generator=generator, dtype=torch.float32)
        return torch.empty_like(output, requires_grad=False).copy_(g)


def _torch():
    import torch

    return torch


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
