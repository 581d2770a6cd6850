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
    # A map of one row at stride 2: the parity classes of odd rows hold no pixel.
    _case("float64", 3, 2, 1.0, batch=2, height=1, width=5),
    # Half types: loaded, accumulated in fp32, stored back; logits that overflow exp in fp16.
    _case("float16", 3, 2, 30.0),
    _case("bfloat16", 3, 1, 30.0),
    # Several pixel tiles (the interpreter's tile is 128 pixels), Nq, h, d that are not powers of two, and
    # the forward without autograd.
    *(_case("float32", 3, s, 10.0, True, batch=1, height=13, width=12, queries=3, heads=3, head_dim=3)
      for s in (1, 2)),
]


# The checks beyond the cases, last in the list the subprocess reads.
LARGE_BATCH = _case("float32", 3, 1, 1.0, batch=16385, height=2, width=2, queries=1, heads=4, head_dim=4)
CHECKS = dict(offsets=dict(image=16384, pixel=3, pixels=2**20, channels=256),
              partials=_case("float64", 3, 2, 1.0), large_batch=LARGE_BATCH)
CUDA_AXIS_CAP = 65535  # grid axes 1 and 2; axis 0 takes up to 2^31 - 1


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
        [sys.executable, str(TESTS / "triton_interpret_check.py")], input=json.dumps([*CASES, CHECKS]),
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


@pytest.mark.slow
def test_a_batch_times_heads_past_cudas_axis_cap_matches_the_reference(interpreted: dict) -> None:
    """B * heads = 65 540 on a 2 x 2 map: every launch's grid keeps its capped axes small, and the output
    and gradients match the fp64 reference. (The interpreter caps no axis: the grids are read, not run
    into CUDA's limit; tiles of 16 384 pixels keep the interpreter's programs few.)"""
    large = interpreted["large_batch"]
    assert large["programs_of_old_axis_1"] > CUDA_AXIS_CAP
    grids = [grid for name, grid in large["launched"] if name != "partial_rows"]
    assert len(grids) == 3
    assert all(grid[0] < 2**31 and all(axis <= CUDA_AXIS_CAP for axis in grid[1:]) for grid in grids), grids
    for name, error in large["errors"].items():
        assert error < _tolerance(LARGE_BATCH), f"{name}: {error:.2e}"


@pytest.mark.parametrize(("batch", "heads", "pixels"), [(16385, 4, 4), (2**20, 64, 1), (1, 1, 4096**2)])
@pytest.mark.parametrize("block_p", [32, 256])
def test_grids_put_batch_and_heads_on_the_one_uncapped_axis(batch: int, heads: int, pixels: int, block_p: int) -> None:
    pytest.importorskip("triton")
    from qna_bench.qna.triton_core import grid

    for second in (1, 4):
        launch = grid(batch, pixels, heads, second)({"BLOCK_P": block_p})
        assert launch == (heads * -(-batch * pixels // block_p), second)
        assert launch[0] < 2**31


@pytest.mark.slow
def test_flat_offsets_are_64_bit_where_32_bits_wrap(interpreted: dict) -> None:
    """`_flat` in a probe kernel on 32-bit arguments (image 16 384 of 2^20 pixels, 256 channels): exact at
    2^42; the same sum written in 32 bits wraps in the interpreter, so the probe tells the two apart.
    Proves the helper's arithmetic, not a kernel run on a tensor past 2^31 elements (none fits here)."""
    args = CHECKS["offsets"]
    exact = (args["image"] * args["pixels"] + args["pixel"]) * args["channels"]
    assert exact > 2**32
    assert interpreted["offsets"]["flat"] == exact
    assert interpreted["offsets"]["int32"] != exact


def test_every_product_by_a_channel_count_in_the_kernels_goes_through_flat() -> None:
    """Read from the kernels' source: no product by CS or F (channels of scores, values) outside `_flat`,
    save with the window size (a row of the partials). With the probe above: every address is 64-bit."""
    import ast
    import inspect

    from qna_bench.qna import triton_kernels as kernels

    tree = ast.parse(inspect.getsource(kernels))
    flat_calls = 0
    for function in tree.body:
        if not isinstance(function, ast.FunctionDef) or function.name == "_flat":
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_flat":
                flat_calls += 1
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
                continue
            for side, other in ((node.left, node.right), (node.right, node.left)):
                if isinstance(side, ast.Name) and side.id in ("CS", "F"):
                    names = {n.id for n in ast.walk(other) if isinstance(n, ast.Name)}
                    assert names <= {"K"}, f"{function.name} line {node.lineno}: {ast.unparse(node)}"
    assert flat_calls >= 15


@pytest.mark.slow
def test_the_backward_partials_have_a_row_per_tile_of_the_config_that_ran(interpreted: dict) -> None:
    """Tiles of 16 and 128 pixels on B = 2, 9 x 11, stride 2: the largest parity class holds 5 x 6 pixels,
    so 4 classes x ceil(60 / tile) rows, 16 and 4; the gradients match the reference with either."""
    for block_p, rows in (("16", 16), ("128", 4)):
        run = interpreted["partials"][block_p]
        assert run["rows"] == [rows]
        assert all(error < 1e-13 for error in run["errors"].values()), run["errors"]


def test_the_partials_pre_hook_resizes_and_zeroes_the_buffer_for_its_tile() -> None:
    pytest.importorskip("triton")
    from qna_bench.qna.triton_kernels import _size_partials, partial_rows, qna_backward_kernel

    assert all(config.pre_hook is _size_partials for config in qna_backward_kernel.configs)
    part = torch.full((3, 2, 2, 2, 3, 3), 7.0)
    nargs = dict(part_ptr=part, B=2, H=9, W=11, STRIDE=2)
    for block_p, rows in ((16, 16), (32, 8), (256, 4)):
        _size_partials({**nargs, "BLOCK_P": block_p})
        assert part.shape == (rows, 2, 2, 2, 3, 3) and rows == partial_rows(2, 9, 11, 2, block_p)
        assert not part.any()


@pytest.mark.slow
@pytest.mark.parametrize("stride", ["1", "2"])
def test_a_qna_forced_to_triton_compiles_without_a_graph_break(interpreted: dict, stride: str) -> None:
    """torch._dynamo.explain on QnA(plan="triton"), forward and train: one graph, the kernels in it as
    the custom op `qna_bench::triton_forward`; a compiled train step (aot_eager, fullgraph) equals eager."""
    report = interpreted["compiled"][stride]
    for mode in ("forward", "train"):
        assert report[mode]["breaks"] == 0, report[mode]["reasons"]
        assert report[mode]["graphs"] == 1
        assert report[mode]["ops"] == ["qna_bench.triton_forward.default"]
    assert report["compiled_error"] < 1e-12


@pytest.mark.slow
def test_the_triton_custom_ops_pass_opcheck(interpreted: dict) -> None:
    """torch.library.opcheck on `triton_forward` and `triton_backward`, fp64, strides 1 and 2."""
    assert interpreted["opcheck"] == {f"{op}-{s}": "" for s in (1, 2) for op in ("forward", "backward")}


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
        # fp32: a batch of 1, which Triton specialises to a constant.
        constants = dict(K=3, STRIDE=2, NQ_P=2, BLOCK_P=32, ACC=tl.float32, **{width: 8},
                         **({"B": 1} if dtype == "fp32" else {}))
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
