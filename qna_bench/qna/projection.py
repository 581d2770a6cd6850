"""QnA's two pointwise projections (input to values and scores, attention output to the output), in the
form a plan names: ``linear`` (``F.linear``: the BLAS GEMM, MKL's sgemm on x86 CPUs) or ``conv1x1``
(a 1x1 convolution on the channels-last view: oneDNN on CPU, cuDNN on CUDA). The same products.

Which library runs a GEMM faster depends on the machine: on a 2-core AMD EPYC with AVX-512 (fp32, 2
threads, 2026-12-06) a (25088 x 128) @ (128 x 128) product took 4.6 ms through ``F.linear`` and 1.7 ms
as a 1x1 convolution, and QnA's input projection forward and backward 16.1 against 9.3 ms. So the tuner
times both (`qna_bench.qna.tuning`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor

Projection = Literal["linear", "conv1x1"]
PROJECTIONS: tuple[str, ...] = get_args(Projection)


def project(x: Tensor, weight: Tensor, bias: Tensor | None, form: Projection) -> Tensor:
    """``x @ weight.T + bias`` over the last dimension of a (B, H, W, C) tensor, in ``form``."""
    if form == "linear":
        return F.linear(x, weight, bias)
    if form == "conv1x1":
        out = F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias)
        return out.permute(0, 2, 3, 1).contiguous()  # a no-op where the convolution kept channels last
    raise ValueError(f"projections={form!r}: QnA's projection forms are {', '.join(PROJECTIONS)}")
