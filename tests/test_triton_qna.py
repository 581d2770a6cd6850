"""The Triton QnA kernels against the reference: in Triton's CPU interpreter (a subprocess) and on CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None

# One subprocess runs every case (about 30 s on 2 cores); keep its tests on one xdist worker.
pytestmark = [
    pytest.mark.xdist_group("triton_interpret"),
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
]

BASE = dict(batch=2, height=9, width=11, queries=2, heads=2, head_dim=4)


def _case(dtype: str, window: int, stride: int, scale: float, no_grad: bool = False, **shape: int) -> dict:
    name = f"{dtype}-k{window}-s{stride}-x{scale:g}" + "".join(f"-{k}{v}" for k, v in shape.items())
    seed = zlib.crc32(name.encode())
    return dict(BASE, id=name, dtype=dtype, window=window, stride=stride, scale=scale, seed=seed, no_grad=no_grad,
                **shape)


CASES = [
    *(_case("float32", 3, s, scale) for s in (1, 2) for scale in (1.0, 50.0)),
    *(_case("float32", 5, s, 50.0) for s in (1, 2)),
    *(_case("float64", k, s, 50.0) for k in (3, 5) for s in (1, 2)),
    # Half types: loaded, accumulated in fp32, stored back; logits that overflow exp in fp16.
    _case("float16", 3, 2, 30.0),
    _case("bfloat16", 3, 1, 30.0),
    # Several pixel tiles (the interpreter's tile is 128 pixels), Nq, h, d that are not powers of two, and
    # the forward without autograd.
    *(_case("float32", 3, s, 10.0, True, batch=1, height=13, width=12, queries=3, heads=3, head_dim=3)
      for s in (1, 2)),
]


def _tolerance(case: dict) -> float:
    # Measured: at most 2.1e-6 (fp32) and 2.9e-15 (fp64), logits up to about 150 included; the fp32
    # reference itself misses its fp64 self by 1.5e-6 on such logits. Half types: the results' own
    # rounding (measured 4e-4 for fp16; 4.9e-3 for bf16, whose fp32 -> bf16 the interpreter truncates
    # where the GPU rounds to nearest: up to one bf16 ulp, 7.8e-3).
    return {"float64": 1e-13, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[case["dtype"]]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(TESTS / "triton_interpret_check.py")], input=json.dumps(CASES),
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_the_interpreter_runs_the_kernels_on_cpu(interpreted: dict) -> None:
    assert interpreted["interpret_env"] == "1"
    assert interpreted["cpu_available"] is True


@pytest.mark.slow
@pytest.mark.parametrize("stride", [1, 2])
def test_the_interpreter_offers_the_triton_plan_and_a_forced_qna_layer_matches_its_reference(interpreted, stride):
    assert "triton" in interpreted["cpu_plans"] and "direct" in interpreted["cpu_plans"]
    errors = dict(interpreted["forced"][str(stride)])
    assert errors.pop("plan") == "triton"
    assert errors and all(error < 1e-12 for error in errors.values()), errors


def test_without_the_interpreter_the_cpu_has_no_triton_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from qna_bench.qna import available_plans

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in available_plans("cpu")
    from qna_bench.qna import QnA

    module = QnA(8, 8, heads=2, window=3, plan="triton")  # a name some device runs: checked at the call
    with pytest.raises(ValueError, match="plan='triton': QnA's plans on cpu are direct"):
        module(torch.randn(1, 5, 5, 8))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_interpreted_output_and_every_gradient_match_the_reference(interpreted: dict, case: dict) -> None:
    errors = interpreted["cases"][case["id"]]
    assert "error" not in errors, errors["error"]
    tolerance = _tolerance(case)
    for name, error in errors.items():
        assert isinstance(error, float), f"{name}: {error}"
        assert error < tolerance, f"{case['id']} {name}: relative error {error:.2e} >= {tolerance:.0e}"


def test_cpu_needs_the_interpreter_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from qna_bench.qna.triton_core import triton_available

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")


def test_bad_shapes_are_refused_with_what_is_allowed() -> None:
    from qna_bench.qna.triton_core import triton_qna_attention

    scores, values = torch.zeros(1, 5, 5, 4), torch.zeros(1, 5, 5, 8)
    with pytest.raises(ValueError, match="k odd"):
        triton_qna_attention(scores, values, torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="stride=3"):
        triton_qna_attention(scores, values, torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 3), stride=3)
    with pytest.raises(ValueError, match=r"needs \(B, H, W, 6\)"):
        triton_qna_attention(scores, values, torch.zeros(3, 2, 3, 3), torch.zeros(3, 2, 3, 3))


def test_autotuning_keeps_only_configs_whose_tiles_fit_in_registers() -> None:
    triton = pytest.importorskip("triton")
    from qna_bench.qna.triton_kernels import _fitting

    wide, narrow = triton.Config({"BLOCK_P": 256}, num_warps=8), triton.Config({"BLOCK_P": 32}, num_warps=4)
    assert _fitting([wide, narrow], {}, BLOCK_D=8) == [wide, narrow]
    assert _fitting([wide, narrow], {}, HEAD_D=64) == [narrow]
    assert _fitting([wide], {}, HEAD_D=128) == [wide]  # none fits: the least pixels per warp


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_an_h100_without_a_gpu(dtype: str) -> None:
    """The interpreter runs Python: a kernel that it accepts may still not compile (a name bound only in a loop)."""
    compiler = pytest.importorskip("triton.compiler")
    target = pytest.importorskip("triton.backends.compiler").GPUTarget("cuda", 90, 32)
    import triton
    import triton.language as tl

    from qna_bench.qna import triton_kernels as kernels

    if kernels.INTERPRETED:
        pytest.skip("this process imported the kernels for the interpreter (TRITON_INTERPRET=1)")
    stats = {"max_ptr", "inv_ptr", "delta_ptr", "part_ptr"}
    for name, width in [("qna_forward_kernel", "BLOCK_D"), ("qna_backward_delta_kernel", "HEAD_D"),
                        ("qna_backward_kernel", "HEAD_D")]:
        jitted = getattr(kernels, name).fn  # the autotuner wraps the JITFunction
        constants = dict(K=3, STRIDE=2, NQ_P=2, BLOCK_P=32, ACC=tl.float32, **{width: 8})
        signature = {
            arg: "constexpr" if arg in constants else ("*fp32" if arg in stats else f"*{dtype}")
            if arg.endswith("_ptr") else "i32"
            for arg in jitted.arg_names
        }
        source = compiler.ASTSource(
            jitted, signature, constexprs={(jitted.arg_names.index(c),): v for c, v in constants.items()}
        )
        assert triton.compile(source, target=target, options={"num_warps": 4}).asm["cubin"], name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_cuda_output_and_every_gradient_match_the_reference(dtype: torch.dtype, stride: int, scale: float) -> None:
    from qna_bench.qna import qna_attention_reference
    from qna_bench.qna.triton_core import triton_available, triton_qna_attention

    assert triton_available("cuda")
    gen = torch.Generator(device="cuda").manual_seed(stride)
    batch, height, width, queries, heads, head_dim, window = 2, 23, 19, 2, 4, 16, 7
    shapes = [(batch, height, width, queries * heads), (batch, height, width, heads * head_dim),
              (queries, heads, window, window), (queries, heads, window, window)]
    inputs = [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in shapes]
    inputs[0] = inputs[0] * scale
    reference_inputs = [t.double().requires_grad_() for t in inputs]
    expected = qna_attention_reference(*reference_inputs, stride=stride)
    grad_out = torch.randn(expected.shape, generator=gen, device="cuda", dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out)
    ours = [t.clone().requires_grad_() for t in inputs]
    out = triton_qna_attention(*ours, stride=stride)
    grads = torch.autograd.grad(out, ours, grad_out.to(dtype))
    # bf16: the output and gradients are rounded to 8 bits once; fp32 as in the interpreter.
    tolerance = 2e-2 if dtype == torch.bfloat16 else (1e-5 if scale <= 1 else 1e-4)
    for name, got, want in zip(("output", "scores", "values", "rpe_bias", "query_mixing"), (out, *grads),
                               (expected, *expected_grads)):
        assert got.dtype == dtype, name
        error = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert error < tolerance, f"{dtype} stride {stride} {name}: relative error {error:.2e}"
