"""QnA's fused CPU loops (`qna_bench.qna.fused_cpu`): exact against the reference form on every code path
of the compiled source (heads that span whole vectors, several heads a vector, plain scalars, query
groups with a remainder, strides, windows larger than the map, underflowed windows), bit-identical kernel
gradients call after call, every wrong argument refused at the door, counted by the FLOP counter,
compiled once per machine into the disk cache (and healed: a timeout, an unloadable library, a failed
build), and absent, with a reason, where no compiler is."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from qna_bench.qna import QnA, available_plans, fused_cpu, qna_attention, qna_attention_reference
from tests.test_qna import (
    compare_core_with_fp64_reference,
    compare_forms,
    make_qna,
    qna_counted_and_closed_form_flops,
    recomputed_pixels,  # noqa: F401  (a fixture)
    split_image,
)

REPO = Path(__file__).resolve().parent.parent
FUSED_PLANS = ("fused", "fused_32")  # the registered plans that run the fused loops
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
        (torch.float64, 3, 5, 1),  # no vector fits: plain scalars
        (torch.float32, 2, 16, 2),  # fp32, one vector
        (torch.float32, 2, 32, 4),  # fp32, two vectors, two full query groups
        (torch.float32, 4, 8, 2),  # two heads a 64-byte vector (one a 32-byte one)
        (torch.float32, 4, 4, 3),  # four heads a 64-byte vector; three queries: two shares kept
        (torch.float32, 3, 8, 2),  # 24 channels: 32-byte vectors under AVX-512
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


# Tests of the build pipeline, not of the loops' speed: -O0 compiles in a quarter of -O3's ~30 s.
QUICK_COMPILE = {"QNA_BENCH_CXXFLAGS": "-O0"}


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


def test_two_processes_that_start_at_once_compile_one_cached_library(tmp_path: Path) -> None:
    """Both find the loops available, and the compiler (a wrapper that logs its calls) linked one library:
    the second process waited on the lock and loaded what the first compiled. The cache holds that library,
    its lock and no half-written file; a third process loads it without compiling (its modification time
    does not change)."""
    log, compiler = tmp_path / "compiler.log", tmp_path / "logged-g++"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {shutil.which("g++")} "$@"\n')
    compiler.chmod(0o755)
    code = "from qna_bench.qna.fused_cpu import fused_unavailable; assert fused_unavailable() is None"
    environment = {**os.environ, "QNA_BENCH_CACHE_DIR": str(tmp_path / "cache"), "CXX": str(compiler), **QUICK_COMPILE}
    processes = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=environment) for _ in range(2)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    assert sum(" -shared " in line for line in log.read_text().splitlines()) == 1
    lock, library = sorted((tmp_path / "cache" / "kernels").iterdir(), key=lambda p: p.suffix)
    assert (library.suffix, lock.name) == (".so", library.name + ".lock") and not library.name.startswith(".")
    assert library.stat().st_mode & stat.S_IRGRP  # others sharing the cache can load it
    compiled_at = library.stat().st_mtime_ns
    assert "fused" in run_probe(tmp_path / "cache", {**QUICK_COMPILE, "CXX": str(compiler)})["plans"]
    assert library.stat().st_mtime_ns == compiled_at


def test_without_a_compiler_no_fused_plan_is_listed_and_the_reason_names_it(tmp_path: Path) -> None:
    probe = run_probe(tmp_path, {"CXX": "no-such-compiler"})
    assert probe["why"] == "no C++ compiler (no-such-compiler) on PATH"
    assert not set(FUSED_PLANS) & set(probe["plans"]) and "direct" in probe["plans"]


def test_kernel_gradients_are_bit_identical_call_after_call_with_four_threads() -> None:
    """Each thread sums its rows' kernel gradients apart; the sums are added in thread order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        torch.manual_seed(0)
        inputs = [torch.randn(2, 12, 10, 8), torch.randn(2, 12, 10, 32), torch.randn(2, 4, 5, 5) * 0.5,
                  torch.randn(2, 4, 5, 5)]
        grads = []
        for _ in range(4):
            leaves = [t.clone().requires_grad_() for t in inputs]
            qna_attention(*leaves, plan="fused").square().sum().backward()
            grads.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later, strict=True))


def forward_args(**changes: object) -> dict[str, object]:
    """Arguments `fused_forward` accepts (2 queries, 2 heads of 4 channels, k=3), with ``changes``."""
    args: dict[str, object] = dict(
        exp_scores=torch.rand(1, 4, 5, 2, 2), packed=torch.randn(1, 4, 5, 12), den_kernel=torch.rand(2, 2, 3, 3),
        num_kernel=torch.randn(2, 2, 3, 3), stride=1, partials=1,
    )
    return {**args, **changes}


def backward_args(**changes: object) -> dict[str, object]:
    """Arguments `fused_backward` accepts, from the forward of `forward_args`, with ``changes``."""
    forward = forward_args()
    z, den, shares = fused_cpu.fused_forward(
        forward["exp_scores"], forward["packed"], forward["den_kernel"], forward["num_kernel"], 1, 0.0, 1
    )
    args: dict[str, object] = dict(
        grad_z=torch.randn_like(z), exp_scores=forward["exp_scores"], packed=forward["packed"], den=den, z=z,
        partials=shares, den_kernel=forward["den_kernel"], num_kernel=forward["num_kernel"], stride=1,
    )
    return {**args, **changes}


WRONG_FORWARD_ARGS: list[tuple[str, Callable[[], dict[str, object]]]] = [
    ("exp_scores", lambda: forward_args(exp_scores=torch.rand(1, 4, 5, 4))),
    ("exp_scores", lambda: forward_args(exp_scores=torch.rand(1, 4, 5, 2, 2, dtype=torch.float16))),
    ("exp_scores", lambda: forward_args(exp_scores=torch.rand(1, 5, 4, 2, 2).transpose(1, 2))),
    ("exp_scores", lambda: forward_args(exp_scores=torch.rand(1, 4, 5, 2, 2, device="meta"))),
    ("packed", lambda: forward_args(packed=torch.randn(1, 4, 5, 12, device="meta"))),
    ("packed", lambda: forward_args(packed=torch.randn(1, 4, 5, 12, dtype=torch.float64))),
    ("packed", lambda: forward_args(packed=torch.randn(1, 4, 6, 12))),
    ("packed", lambda: forward_args(packed=torch.randn(1, 4, 5, 11))),  # 7 features, 2 heads
    ("packed", lambda: forward_args(packed=torch.randn(1, 4, 12, 5).transpose(2, 3))),
    ("den_kernel", lambda: forward_args(den_kernel=torch.rand(2, 2, 4, 4))),
    ("den_kernel", lambda: forward_args(den_kernel=torch.rand(2, 2, 3, 3, device="meta"))),
    ("num_kernel", lambda: forward_args(num_kernel=torch.rand(2, 1, 3, 3))),
    ("num_kernel", lambda: forward_args(num_kernel=torch.rand(2, 2, 3, 3, dtype=torch.float64))),
    ("stride", lambda: forward_args(stride=3)),
    ("partials", lambda: forward_args(partials=3)),
    ("vector_bytes", lambda: forward_args(vector_bytes=24)),
]


@pytest.mark.parametrize(("name", "make"), WRONG_FORWARD_ARGS)
def test_the_forward_refuses_each_wrong_argument_by_name(name: str, make: Callable[[], dict[str, object]]) -> None:
    args = make()
    with pytest.raises((ValueError, TypeError), match=f"^{name}"):
        fused_cpu.check_forward_args(**args)
    if not any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in args.values()):
        with pytest.raises((ValueError, TypeError), match=f"^{name}"):
            fused_cpu.fused_forward(*(args[k] for k in ("exp_scores", "packed", "den_kernel", "num_kernel", "stride")),
                                    0.0, args["partials"], args.get("vector_bytes", 0))


WRONG_BACKWARD_ARGS: list[tuple[str, Callable[[], dict[str, object]]]] = [
    ("grad_z", lambda: backward_args(grad_z=torch.randn(1, 4, 5, 9))),
    ("grad_z", lambda: backward_args(grad_z=torch.randn(1, 4, 5, 8, dtype=torch.float64))),
    ("grad_z", lambda: backward_args(grad_z=torch.randn(1, 4, 8, 5).transpose(2, 3))),
    ("grad_z", lambda: backward_args(grad_z=torch.randn(1, 4, 5, 8, device="meta"))),
    ("den", lambda: backward_args(den=torch.rand(1, 4, 5, 2, 2, dtype=torch.float64))),
    ("den", lambda: backward_args(den=torch.rand(1, 4, 5, 2))),
    ("z", lambda: backward_args(z=torch.randn(1, 4, 5, 7))),
    ("z", lambda: backward_args(z=torch.randn(1, 4, 5, 8, device="meta"))),
    ("partials", lambda: backward_args(partials=torch.randn(1, 4, 5, 1, 8, dtype=torch.float64))),
    ("partials", lambda: backward_args(partials=torch.randn(1, 4, 5, 0, 8))),
    ("partials", lambda: backward_args(partials=torch.randn(1, 4, 4, 1, 8))),
    ("exp_scores", lambda: backward_args(exp_scores=torch.rand(1, 4, 5, 2, 2, device="meta"))),
    ("vector_bytes", lambda: backward_args(vector_bytes=128)),
]


@pytest.mark.parametrize(("name", "make"), WRONG_BACKWARD_ARGS)
def test_the_backward_refuses_each_wrong_argument_by_name(name: str, make: Callable[[], dict[str, object]]) -> None:
    args = make()
    with pytest.raises((ValueError, TypeError), match=f"^{name}"):
        fused_cpu.check_backward_args(**args)
    if not any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in args.values()):
        with pytest.raises((ValueError, TypeError), match=f"^{name}"):
            fused_cpu.fused_backward(**args, kernel_grads=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_vector_width_gives_the_widest_ones_results(dtype: torch.dtype) -> None:
    """The loops capped at 16, 32 or 64 bytes (each no wider than compiled), on 4 heads of 8 channels, which
    each width lays out its own way (two heads a vector, one, half of one): the forward's outputs and
    every gradient equal the widest vectors' to rounding."""
    torch.manual_seed(0)
    forward = dict(exp_scores=torch.rand(2, 6, 7, 2, 4, dtype=dtype), packed=torch.randn(2, 6, 7, 40, dtype=dtype),
                   den_kernel=torch.rand(2, 4, 5, 5, dtype=dtype) + 0.5, num_kernel=torch.randn(2, 4, 5, 5, dtype=dtype))
    results = {}
    for width in fused_cpu.VECTOR_BYTES:
        z, den, shares = fused_cpu.fused_forward(*forward.values(), 1, 0.0, 1, width)
        grad_z = torch.randn(z.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        grads = fused_cpu.fused_backward(grad_z, forward["exp_scores"], forward["packed"], den, z, shares,
                                         forward["den_kernel"], forward["num_kernel"], 1, True, width)
        results[width] = (z, den, shares, *grads)
    compiled = fused_cpu.vector_bytes()
    assert fused_cpu.sweep_bytes(32, 4, dtype) == compiled
    for width in fused_cpu.VECTOR_BYTES[1:]:  # each cap is the width swept, where it was compiled
        assert fused_cpu.sweep_bytes(32, 4, dtype, width) == min(width, compiled)
    assert fused_cpu.sweep_bytes(15, 3, dtype) == torch.empty(0, dtype=dtype).element_size()  # heads of 5: scalars
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for width in fused_cpu.VECTOR_BYTES[1:]:
        for capped, widest in zip(results[width], results[0], strict=True):
            torch.testing.assert_close(capped, widest, **tolerance)


def test_the_narrower_fused_plan_is_listed_only_where_it_is_narrower() -> None:
    """`fused_32` runs the loops at 32 bytes where they were compiled for 64 (its rows say so), and is not
    listed where 32 is already their width."""
    compiled = fused_cpu.vector_bytes()
    assert ("fused_32" in available_plans("cpu")) == (compiled > 32)
    if compiled > 32:
        module = QnA(16, 16, 2, window=3, plan="fused_32")
        module(torch.randn(1, 5, 5, 16))
        assert module.plan_flags()["fused_build"].endswith("; 32-byte vectors")


def test_the_loaded_functions_declare_their_argument_types() -> None:
    library = fused_cpu._library()
    for name in ("qna_forward_f32", "qna_forward_f64", "qna_backward_f32", "qna_backward_f64"):
        assert getattr(library, name).argtypes == fused_cpu.ARGTYPES[name.rsplit("_", 1)[0]]
    assert fused_cpu.vector_bytes() in (16, 32, 64)


def test_the_sources_and_headers_are_every_file_of_theirs_in_the_package() -> None:
    cpp, headers = fused_cpu.sources()
    folder = Path(fused_cpu.__file__).parent
    assert set(cpp) == {p for p in folder.iterdir() if p.suffix == ".cpp"}
    assert set(headers) == {p for p in folder.iterdir() if p.suffix == ".h"}


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A library path in an empty cache, with this process's memory of builds set aside."""
    monkeypatch.setenv("QNA_BENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused_cpu, "_loaded", {})
    monkeypatch.setattr(fused_cpu, "_failed", {})
    fused_cpu._build_target.cache_clear()
    yield fused_cpu._build_target()[1]
    fused_cpu._build_target.cache_clear()


def test_a_compile_past_its_timeout_says_so_and_is_tried_again_later(fresh_build: Path, monkeypatch) -> None:
    monkeypatch.setattr(fused_cpu, "COMPILE_TIMEOUT_S", 0.0)
    assert fused_cpu.fused_unavailable() == "compiling the fused loops timed out after 0 s"
    left = [p.name for p in fresh_build.parent.iterdir()]
    assert left == [fresh_build.name + ".lock"]  # its compile's lock, nothing half-written
    monkeypatch.setattr(fused_cpu, "RETRY_AFTER_S", 0.0)
    monkeypatch.setattr(fused_cpu, "_compile", lambda compiler, target: "still failing")
    assert fused_cpu.fused_unavailable() == "still failing"  # tried again, not the remembered reason


@pytest.fixture
def built_library() -> Path:
    """The library this process compiled or loaded (its tests run only where the loops are available)."""
    library = fused_cpu._library()
    assert isinstance(library, ctypes.CDLL)
    return Path(library._name)


def test_an_unloadable_cached_library_is_built_again_once(built_library: Path, fresh_build: Path, monkeypatch) -> None:
    """A truncated library in the cache: loading it fails, it is compiled again (stubbed here by a copy
    of the library this process loaded) and loads."""
    fresh_build.parent.mkdir(parents=True)
    fresh_build.write_bytes(b"not a library")
    compiled = []

    def copy_in(compiler: str, target: Path) -> None:
        compiled.append(target)
        shutil.copy(built_library, target)

    monkeypatch.setattr(fused_cpu, "_compile", copy_in)
    assert fused_cpu.fused_unavailable() is None
    assert compiled == [fresh_build]


def test_a_failed_compile_is_tried_again_after_a_while(fresh_build: Path, monkeypatch) -> None:
    outcomes = ["compiling the fused loops failed: error: boom", "compiling the fused loops failed: error: again"]
    monkeypatch.setattr(fused_cpu, "_compile", lambda compiler, target: outcomes.pop(0))
    assert fused_cpu.fused_unavailable() == "compiling the fused loops failed: error: boom"
    assert fused_cpu.fused_unavailable() == "compiling the fused loops failed: error: boom"  # remembered
    monkeypatch.setattr(fused_cpu, "RETRY_AFTER_S", 0.0)
    assert fused_cpu.fused_unavailable() == "compiling the fused loops failed: error: again"


def test_the_extra_flags_name_another_library_and_a_bad_flag_is_the_reason(tmp_path: Path) -> None:
    """``$QNA_BENCH_CXXFLAGS`` is part of the library's hash and of the recorded flags; a flag the compiler
    refuses makes the loops unavailable, with the compiler's complaint."""
    code = ("import json; from qna_bench.qna import fused_cpu;"
            "print(json.dumps([fused_cpu._build_target()[1].name, fused_cpu.compile_flags()]))")

    def probe(flags: str) -> list[str]:
        environment = {**os.environ, "QNA_BENCH_CACHE_DIR": str(tmp_path), "QNA_BENCH_CXXFLAGS": flags}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                                env=environment, check=True, timeout=120)
        return json.loads(result.stdout.strip().splitlines()[-1])

    plain, extra = probe("-O0"), probe("-O0 -DQNA_PROBE=1 -fno-math-errno")
    assert plain[0] != extra[0] and extra[1].endswith("-O0 -DQNA_PROBE=1 -fno-math-errno")
    why = run_probe(tmp_path, {"QNA_BENCH_CXXFLAGS": "--no-such-flag"})["why"]
    assert why.startswith("compiling the fused loops failed:") and "no-such-flag" in why
