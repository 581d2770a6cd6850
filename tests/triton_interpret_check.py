"""Runs `triton_qna_attention` in Triton's CPU interpreter against the reference; `test_triton_qna` starts it.

Its own process, because Triton decides whether a kernel is interpreted when the kernel is decorated,
from ``TRITON_INTERPRET``, and the test process may have imported the kernels already. Reads a JSON list
of cases on stdin and prints one JSON object: per case, the largest error of the output and of each
gradient relative to the reference's largest magnitude, the reference in fp64 on the same inputs.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from qna_bench.qna import qna_attention_reference
from qna_bench.triton_qna import triton_available, triton_qna_attention

NAMES = ("scores", "values", "rpe_bias", "query_mixing")


def run_case(case: dict) -> dict[str, float | str]:
    gen = torch.Generator().manual_seed(case["seed"])
    batch, height, width = case["batch"], case["height"], case["width"]
    queries, heads, head_dim, window = case["queries"], case["heads"], case["head_dim"], case["window"]
    dtype = getattr(torch, case["dtype"])
    shapes = [(batch, height, width, queries * heads), (batch, height, width, heads * head_dim),
              (queries, heads, window, window), (queries, heads, window, window)]
    inputs = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]
    inputs[0] = inputs[0] * case["scale"]  # logits spread so wide that one max per image would underflow
    reference_inputs = [t.double().requires_grad_() for t in inputs]
    expected = qna_attention_reference(*reference_inputs, stride=case["stride"])
    grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out)

    ours = [t.clone().requires_grad_() for t in inputs]
    out = triton_qna_attention(*ours, stride=case["stride"])
    if out.dtype != dtype or out.shape != expected.shape:
        return {"error": f"output {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(expected.shape)}"}
    grads = torch.autograd.grad(out, ours, grad_out.to(dtype))

    def relative(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.double() - want).abs().max() / want.abs().max()).item()

    errors: dict[str, float | str] = {"output": relative(out, expected)}
    for name, got, want in zip(NAMES, grads, expected_grads):
        errors[name] = relative(got, want) if got.dtype == dtype else f"grad dtype {got.dtype}"
    if case["no_grad"]:
        with torch.no_grad():
            errors["no_grad_output"] = relative(triton_qna_attention(*inputs, stride=case["stride"]), expected)
    return errors


def main() -> None:
    cases = json.load(sys.stdin)
    report = {
        "interpret_env": os.environ.get("TRITON_INTERPRET"),
        "cpu_available": triton_available("cpu"),
        "cases": {case["id"]: run_case(case) for case in cases},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
