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
import triton
import triton.language as tl

from qna_bench.qna import available_plans, qna_attention_reference
from qna_bench.qna import triton_kernels as kernels
from qna_bench.qna.triton_core import triton_available, triton_backward, triton_forward, triton_qna_attention

NAMES = ("scores", "values", "rpe_bias", "query_mixing")


def make_inputs(case: dict, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Generator]:
    gen = torch.Generator().manual_seed(case["seed"])
    batch, height, width = case["batch"], case["height"], case["width"]
    queries, heads, head_dim, window = case["queries"], case["heads"], case["head_dim"], case["window"]
    shapes = [(batch, height, width, queries * heads), (batch, height, width, heads * head_dim),
              (queries, heads, window, window), (queries, heads, window, window)]
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes], gen


def run_case(case: dict) -> dict[str, float | str]:
    dtype = getattr(torch, case["dtype"])
    inputs, gen = make_inputs(case, dtype)
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


KERNELS = {kernel: (kernel.configs[0].pre_hook, kernel.fn.run)
           for kernel in (kernels.qna_forward_kernel, kernels.qna_backward_delta_kernel, kernels.qna_backward_kernel)}


def with_tile(block_p: int, launched: list) -> None:
    """Every kernel on one config of ``block_p`` pixels a tile; each launch's grid appended to ``launched``
    (and the backward's partial rows, as its config pre-hook sized them)."""
    for kernel, (pre_hook, run) in KERNELS.items():
        def sized(nargs: dict, pre_hook=pre_hook) -> None:
            pre_hook(nargs)
            launched.append(("partial_rows", nargs["part_ptr"].shape[0]))

        def spied(*args, run=run, name=kernel.fn.__name__, **kwargs):
            launched.append((name, kwargs["grid"](kwargs)))
            return run(*args, **kwargs)

        kernel.configs = [triton.Config({"BLOCK_P": block_p}, num_warps=1, pre_hook=pre_hook and sized)]
        kernel.fn.run = spied


def large_batch(case: dict) -> dict:
    """B * heads past 65 535 (the old grid's axis 1, which CUDA caps there) on a tiny map, tiles of 16 384
    pixels to keep the interpreter's programs few: the errors and the grids launched."""
    launched: list = []
    with_tile(16384, launched)
    errors = run_case(case)
    return {"errors": errors, "launched": launched, "programs_of_old_axis_1": case["batch"] * case["heads"]}


def partials_by_tile(case: dict) -> dict:
    """The backward's partials at two tile sizes: the rows its pre-hook gave them, and the errors."""
    report = {}
    for block_p in (16, 128):
        launched: list = []
        with_tile(block_p, launched)
        report[str(block_p)] = {"errors": run_case(case),
                                "rows": [rows for name, rows in launched if name == "partial_rows"]}
    return report


@triton.jit
def _offset_probe(out_ptr, image, pixel, pixels, channels):
    tl.store(out_ptr, kernels._flat(image, pixel, pixels, channels))


@triton.jit
def _offset_probe_int32(out_ptr, image, pixel, pixels, channels):
    tl.store(out_ptr, (image * pixels + pixel) * channels)


def offsets(image: int, pixel: int, pixels: int, channels: int) -> dict:
    """`_flat` on 32-bit arguments whose offset passes 2^31, and the same sum in 32 bits (the interpreter
    checks every 32-bit integer operation for overflow)."""
    report = {}
    for name, probe in (("flat", _offset_probe), ("int32", _offset_probe_int32)):
        out = torch.zeros(1, dtype=torch.int64)
        try:
            probe[(1,)](out, image, pixel, pixels, channels)
            report[name] = int(out.item())
        except Exception as error:  # noqa: BLE001 - the message is the result
            report[name] = f"{type(error).__name__}: {error}"[:300]
    return report


def compiled(stride: int) -> dict:
    """QnA forced to the Triton plan under torch.compile: dynamo's graphs and breaks, forward and train,
    then a compiled train step (aot_eager: the custom ops' fakes and autograd) against eager, fp64."""
    from qna_bench.qna import QnA

    report: dict = {}
    torch.manual_seed(stride)
    module = QnA(8, 8, heads=2, window=3, stride=stride, plan="triton", tune="off").double()
    x = torch.randn(2, 7, 6, 8, dtype=torch.float64, requires_grad=True)
    for train in (False, True):
        module.train(train)
        module.choose_plan(x, train)
        torch._dynamo.reset()
        with torch.set_grad_enabled(train):
            explained = torch._dynamo.explain(module)(x)
        report["train" if train else "forward"] = {
            "graphs": explained.graph_count, "breaks": explained.graph_break_count,
            "reasons": [str(b.reason)[:300] for b in explained.break_reasons],
            "ops": sorted({str(node.target) for graph in explained.graphs for node in graph.graph.nodes
                           if "triton" in str(node.target)}),
        }

    def step(fn) -> list[torch.Tensor]:
        out = fn(x)
        return [out, *torch.autograd.grad(out, [x, *module.parameters()], torch.ones_like(out))]

    eager = step(module)
    torch._dynamo.reset()
    ours = step(torch.compile(module, backend="aot_eager", fullgraph=True))
    report["compiled_error"] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, eager))
    return report


def opchecks() -> dict:
    """`torch.library.opcheck` on both custom ops (schema, fake kernels, autograd registration, AOT
    dispatch with dynamic shapes), small fp64 inputs at each stride: '' where it passed."""
    report = {}
    case = dict(batch=2, height=5, width=6, queries=2, heads=2, head_dim=3, window=3, seed=7)
    for stride in (1, 2):
        inputs, _ = make_inputs(case, torch.float64)
        args = (*(t.requires_grad_() for t in inputs), stride)
        z, stats = triton_forward(*args)
        backward_args = (torch.randn_like(z), *(t.detach() for t in inputs), stats.detach(), stride)
        for name, op, op_args in (("forward", triton_forward, args), ("backward", triton_backward, backward_args)):
            try:
                torch.library.opcheck(op, op_args)
                report[f"{name}-{stride}"] = ""
            except Exception as error:  # noqa: BLE001 - the message is the result
                report[f"{name}-{stride}"] = f"{type(error).__name__}: {error}"[:2000]
    return report


def main() -> None:
    cases = json.load(sys.stdin)
    extra = cases.pop()  # the cases of the checks below
    report = {
        "opcheck": opchecks(),
        "compiled": {str(stride): compiled(stride) for stride in (1, 2)},
        "offsets": offsets(**extra["offsets"]),
        "interpret_env": os.environ.get("TRITON_INTERPRET"),
        "cpu_available": triton_available("cpu"),
        "cpu_plans": available_plans("cpu"),
        "forced": {str(stride): forced_plan_errors(stride) for stride in (1, 2)},
        "cases": {case["id"]: run_case(case) for case in cases},
        # Last: these swap the kernels' configs.
        "partials": partials_by_tile(extra["partials"]),
        "large_batch": large_batch(extra["large_batch"]),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
