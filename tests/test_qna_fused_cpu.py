"""QnA's fused CPU loops (`qna_bench.qna.fused_cpu`): exact against the reference form on every code path
of the compiled source (heads that fill whole vectors and heads that do not, query groups with a
remainder, strides, windows larger than the map, underflowed windows), counted by the FLOP counter,
compiled once per machine into the disk cache, and absent, with a reason, where no compiler is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qna_bench.qna import available_plans, qna_attention, qna_attention_reference
from tests.test_qna import (
    compare_core_with_fp64_reference,
    compare_forms,
    make_qna,
    qna_counted_and_closed_form_flops,
    recomputed_pixels,  # noqa: F401  (a fixture)
    split_image,
)

REPO = Path(__file__).resolve().parent.parent
FUSED_PLANS = ("fused",)  # the registered plans that run the fused loops
pytestmark = pytest.mark.skipif("fused" not in available_plans("cpu"), reason="no C++ compiler for the fused loops")


@pytest.fixture(autouse=True, scope="module")
def two_threads() -> Iterator[None]:
    """Two OpenMP threads: the loops split rows between them, and the kernel gradients add up per thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    ("dtype", "heads", "head_dim", "queries"),
    [
        (torch.float64, 2, 8, 2),  # one 64-byte vector a head
        (torch.float64, 1, 16, 3),  # two vectors; a query group of 2 and a remainder of 1
        (torch.float64, 3, 5, 1),  # no whole vector: the loops over channels in memory
        (torch.float32, 2, 16, 2),  # fp32, one vector
        (torch.float32, 2, 32, 4),  # fp32, two vectors, two full query groups
    ],
)
def test_fused_loops_match_the_reference(dtype: torch.dtype, heads: int, head_dim: int, queries: int, stride: int) -> None:
    """Output and every gradient against the fp64 reference: fp64 to 1e-10, fp32 to its rounding. Window 7
    on a 6 x 9 map: windows wider than the map, and every border case of the gather in the backward."""
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for window in (3, 7):
        torch.manual_seed(window + queries)
        inputs = [
            torch.randn(2, 6, 9, queries * heads, dtype=dtype),
            torch.randn(2, 6, 9, heads * head_dim, dtype=dtype),
            torch.randn(queries, heads, window, window, dtype=dtype) * 0.5,
            torch.randn(queries, heads, window, window, dtype=dtype),
        ]
        fast = [t.clone().requires_grad_() for t in inputs]
        exact = [t.double().requires_grad_() for t in inputs]
        out = qna_attention(*fast, stride=stride, plan="fused")
        expected = qna_attention_reference(*exact, stride=stride)
        grad_out = torch.randn_like(expected)
        out.backward(grad_out.to(dtype))
        expected.backward(grad_out)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
        for name, a, b in zip(("scores", "values", "rpe_bias", "query_mixing"), fast, exact, strict=True):
            scale = b.grad.abs().max().item()
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=tol, atol=tol * scale, msg=f"k={window} {name}")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_underflowed_windows_are_recomputed_exactly(dtype: torch.dtype, tol: float, recomputed_pixels: list[int]) -> None:  # noqa: F811
    """Logits spread by 150 between an image's halves: the fused forward divides the underflowed
    windows by 1 and the recompute replaces them; the fused backward gives them no gradient of its own.
    fp16 runs the core in fp32 and keeps every query's share (its z is rounded to fp16)."""
    compare_core_with_fp64_reference(dtype, 150.0, 5, 1, tol, plan="fused")
    assert min(recomputed_pixels) > 0


def test_the_module_with_the_fused_plan_matches_the_reference_form() -> None:
    """The whole layer (projections included), fp64, a split image, both strides."""
    for stride in (1, 2):
        module = make_qna(in_channels=6, features=8, heads=2, window=5, stride=stride, plan="fused")
        compare_forms(module, split_image(torch.randn(2, 9, 10, 6, dtype=torch.float64), module, 3.0), rtol=1e-10)


def test_without_kernel_gradients_the_inputs_gradients_stay_exact() -> None:
    """Frozen rpe_bias and mixing: the fused backward skips the kernel gradients, the rest unchanged."""
    torch.manual_seed(0)
    scores, values = torch.randn(1, 7, 8, 4, dtype=torch.float64), torch.randn(1, 7, 8, 16, dtype=torch.float64)
    rpe, mixing = torch.randn(2, 2, 5, 5, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    grads = []
    for plan in ("fused", "direct"):
        s, v = scores.clone().requires_grad_(), values.clone().requires_grad_()
        qna_attention(s, v, rpe, mixing, plan=plan).square().sum().backward()
        grads.append((s.grad, v.grad))
    for fused, direct in zip(*grads, strict=True):
        torch.testing.assert_close(fused, direct, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_flop_counter_counts_the_fused_loops_as_the_closed_form_does(mode: str, stride: int) -> None:
    counted, expected = qna_counted_and_closed_form_flops(mode, 7, stride, "fused")
    assert counted == pytest.approx(expected, rel=0.02)


def run_probe(cache: Path, env: dict[str, str] | None = None) -> dict:
    """In a fresh process with ``cache`` as the disk cache: why the fused loops cannot run (or None) and
    the CPU plans listed."""
    code = (
        "import json; from qna_bench.qna import available_plans; from qna_bench.qna.fused_cpu import fused_unavailable;"
        "print(json.dumps({'why': fused_unavailable(), 'plans': available_plans('cpu')}))"
    )
    environment = {**os.environ, "QNA_BENCH_CACHE_DIR": str(cache), **(env or {})}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=environment,
                            check=True, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_processes_compile_at_once_into_one_cached_library(tmp_path: Path) -> None:
    """Both find the loops available; the cache holds one library and no half-written file; a third
    process loads it without compiling (its modification time does not change)."""
    code = "from qna_bench.qna.fused_cpu import fused_unavailable; assert fused_unavailable() is None"
    environment = {**os.environ, "QNA_BENCH_CACHE_DIR": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=environment) for _ in range(2)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    (library,) = (tmp_path / "kernels").iterdir()
    assert library.suffix == ".so" and not library.name.startswith(".")
    compiled_at = library.stat().st_mtime_ns
    assert "fused" in run_probe(tmp_path)["plans"]
    assert library.stat().st_mtime_ns == compiled_at


def test_without_a_compiler_no_fused_plan_is_listed_and_the_reason_names_it(tmp_path: Path) -> None:
    probe = run_probe(tmp_path, {"CXX": "no-such-compiler"})
    assert probe["why"] == "no C++ compiler (no-such-compiler) on PATH"
    assert not set(FUSED_PLANS) & set(probe["plans"]) and "direct" in probe["plans"]
