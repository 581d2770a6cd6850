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

from qna_bench.qna import available_plans, qna_attention_reference
from qna_bench.qna.triton_core import triton_available, triton_qna_attention

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


def forced_plan_errors(stride: int) -> dict[str, float]:
    """`QnA(..., plan="triton")` against the same module in its reference form, fp64: the output and the
    gradients of the input and of every parameter (largest relative error)."""
    from qna_bench.qna import QnA

    torch.manual_seed(stride)
    module = QnA(8, 8, heads=2, window=5, stride=stride, plan="triton").double()
    x = torch.randn(2, 9, 10, 8, dtype=torch.float64, requires_grad=True)
    errors = {}
    outputs = {}
    for impl in ("fast", "reference"):
        module.impl = impl
        module.zero_grad()
        x.grad = None
        out = module(x)
        out.backward(torch.ones_like(out))
        outputs[impl] = [out.detach(), x.grad.clone(), *(p.grad.clone() for p in module.parameters())]
    for i, (got, want) in enumerate(zip(outputs["fast"], outputs["reference"])):
        errors[str(i)] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    module.impl = "fast"
    errors["plan"] = module.plan_flags().get("plan_name", "")
    return errors


def main() -> None:
    cases = json.load(sys.stdin)
    report = {
        "interpret_env": os.environ.get("TRITON_INTERPRET"),
        "cpu_available": triton_available("cpu"),
        "cpu_plans": available_plans("cpu"),
        "forced": {str(stride): forced_plan_errors(stride) for stride in (1, 2)},
        "cases": {case["id"]: run_case(case) for case in cases},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
