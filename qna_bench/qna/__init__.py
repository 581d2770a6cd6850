"""The QnA layer ("Learned Queries for Efficient Local Attention", arXiv 2112.11435) in PyTorch.

One idea a file: the module (`module`), plans and their registry (`plans`), choosing a plan per key
(`tuning`), direct kernels (`direct`), FFT kernels (`fft`), fused CPU loops (`fused_cpu`, with the C++
sources `fused_cpu.h`, `fused_cpu_forward.cpp`, `fused_cpu_backward.cpp`), the underflow recompute (`underflow`), the
fast form's core (`core`), the reference form (`reference`) and the official-params loader
(`official`). This file only re-exports the public names.
"""

from qna_bench.qna.attention import qna_attention
from qna_bench.qna.direct import convolution_window
from qna_bench.qna.fft import FFT_RESOLVED_RATIO, fft_lengths
from qna_bench.qna.module import IMPLS, QnA
from qna_bench.qna.official import load_official_params
from qna_bench.qna.plans import (
    FFT_CHUNK_BYTES,
    Plan,
    available_plans,
    candidate_plans,
    default_plan,
    get_plan,
    plan_names,
    register_plan,
)
from qna_bench.qna.reference import qna_attention_reference
from qna_bench.qna.shapes import STRIDES, qna_output_size
from qna_bench.qna.tuning import TUNES, PlanChoice, PlanKey, choose_plan, code_version
from qna_bench.qna.underflow import UNDERFLOW_DENOMINATOR

__all__ = [
    "FFT_CHUNK_BYTES",
    "FFT_RESOLVED_RATIO",
    "IMPLS",
    "STRIDES",
    "TUNES",
    "UNDERFLOW_DENOMINATOR",
    "Plan",
    "PlanChoice",
    "PlanKey",
    "QnA",
    "available_plans",
    "candidate_plans",
    "choose_plan",
    "code_version",
    "convolution_window",
    "default_plan",
    "fft_lengths",
    "get_plan",
    "load_official_params",
    "plan_names",
    "qna_attention",
    "qna_attention_reference",
    "qna_output_size",
    "register_plan",
]
