"""QnA's plans and their tuner: every plan forced by name against the reference form, the plan
registry's lookups, the tuner with a stubbed timer (which plan wins, when it times again, its disk
cache across processes and after corruption, tune=off), and the plan a harness row records."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qna_bench.environment import read_environment
from qna_bench.identity import module_code_version
from qna_bench.layers import qna_flops
from qna_bench.point import MeasureSettings, SweepPoint, run_point
from qna_bench.problem import Problem
from qna_bench.qna import (
    TUNES,
    QnA,
    available_plans,
    candidate_plans,
    default_plan,
    direct,
    qna_attention,
    qna_attention_reference,
)
from qna_bench.qna.tuning import CACHE_SUBDIR
from qna_bench.registry import get_layer
from qna_bench.tuner import Candidate

REPO = Path(__file__).resolve().parent.parent
CPU_PLANS = available_plans("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny shapes: one thread keeps OpenMP's spin-waiting out of them (as in test_qna)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Every plan, forced


def assert_plan_matches_the_reference(plan: str, stride: int, device: str) -> None:
    """Output and the gradients w.r.t. scores, values, rpe_bias and query mixing, fp64, 2 queries,
    2 heads, windows 3 and 7 (the FFT lengths differ from the map size), a map that is not square."""
    for window in (3, 7):
        torch.manual_seed(window)
        inputs = [
            torch.randn(2, 11, 9, 4, dtype=torch.float64),
            torch.randn(2, 11, 9, 6, dtype=torch.float64),
            torch.randn(2, 2, window, window, dtype=torch.float64) * 0.5,
            torch.randn(2, 2, window, window, dtype=torch.float64),
        ]
        assert_matches_the_reference(inputs, plan, stride, device, torch.float64, f"{plan} k={window}")


def assert_matches_the_reference(inputs: list[torch.Tensor], plan: str, stride: int, device: str, dtype: torch.dtype,
                                 where: str) -> None:
    """``plan`` on ``inputs`` (fp64: scores, values, rpe bias, query mixing) in ``dtype`` on ``device``: its
    output and every gradient against the fp64 reference (gradients relative to their largest value)."""
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    fast = [t.to(device=device, dtype=dtype).clone().requires_grad_() for t in inputs]
    exact = [t.clone().requires_grad_() for t in inputs]
    out = qna_attention(*fast, stride=stride, plan=plan)
    expected = qna_attention_reference(*exact, stride=stride)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out.to(device=device, dtype=dtype))
    expected.backward(grad_out)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol, msg=where)
    for name, a, b in zip(("scores", "values", "rpe_bias", "query_mixing"), fast, exact, strict=True):
        scale = max(b.grad.abs().max().item(), 1.0)
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=tol, atol=tol * scale, msg=f"{where} grad {name}")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("plan", CPU_PLANS)
def test_every_cpu_plan_forced_matches_the_reference_in_fp64(plan: str, stride: int) -> None:
    assert_plan_matches_the_reference(plan, stride, "cpu")


@pytest.mark.parametrize("head_dim", [1, 5, 8, 16, 24, 32, 48])
def test_every_cpu_plan_forced_is_exact_at_every_head_size(head_dim: int) -> None:
    """4 heads of ``head_dim`` channels (in the fused loops: a head spanning whole vectors, several heads
    a vector, or plain scalars), fp64 and fp32, strides 1 and 2, a window wider than the map's height:
    output and every gradient against the fp64 reference."""
    torch.manual_seed(head_dim)
    heads, window = 4, 5
    inputs = [
        torch.randn(1, 4, 6, 2 * heads, dtype=torch.float64),
        torch.randn(1, 4, 6, heads * head_dim, dtype=torch.float64),
        torch.randn(2, heads, window, window, dtype=torch.float64) * 0.5,
        torch.randn(2, heads, window, window, dtype=torch.float64),
    ]
    for plan in CPU_PLANS:
        for dtype in (torch.float64, torch.float32):
            for stride in (1, 2):
                assert_matches_the_reference(inputs, plan, stride, "cpu", dtype, f"{plan} {dtype} stride {stride} d={head_dim}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("plan", ["direct", "fft_kernel_grads", "fft_backward", "fft", "fft_forward"])
def test_every_cuda_plan_forced_matches_the_reference_in_fp64(plan: str, stride: int) -> None:
    """The FFT plans on cuFFT (the Triton plan has its own tests)."""
    assert_plan_matches_the_reference(plan, stride, "cuda")


@pytest.mark.parametrize("plan", CPU_PLANS)
def test_a_forced_plan_is_recorded_as_forced(plan: str) -> None:
    module = QnA(6, 6, 2, window=5, plan=plan).double()
    x = torch.randn(1, 7, 6, 6, dtype=torch.float64, requires_grad=True)
    module(x).sum().backward()
    flags = module.plan_flags()
    assert flags["plan_name"] == plan and flags["plan_source"] == "forced" and flags["tune_seconds"] == 0
    assert set(flags["plan"]) >= {"convolutions", "numerators", "numerator_grads", "kernel_grads"}


def test_available_plans_take_a_device_name_or_a_torch_device() -> None:
    assert available_plans(torch.device("cpu")) == CPU_PLANS
    assert CPU_PLANS[0] == "direct" and {"fft", "fft_kernel_grads", "padded"} <= set(CPU_PLANS)
    cuda = available_plans("cuda")
    assert cuda == available_plans(torch.device("cuda", 0))
    assert {"direct", "fft_kernel_grads", "fft_backward", "fft", "fft_forward"} <= set(cuda)  # cuFFT
    assert "padded" not in cuda and set(cuda) - set(CPU_PLANS) <= {"triton"}


def test_an_unknown_plan_name_is_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"plan='fastest': QnA's plans are direct, padded, .*fft"):
        QnA(4, 4, 2, plan="fastest")
    inputs = [torch.randn(1, 5, 5, 2), torch.randn(1, 5, 5, 4), torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)]
    with pytest.raises(ValueError, match=r"plan='fastest': QnA's plans on cpu are direct, padded"):
        qna_attention(*inputs, plan="fastest")
    with pytest.raises(ValueError, match=r"tune='sometimes': QnA's tune is one of cached, always, off"):
        QnA(4, 4, 2, tune="sometimes")  # type: ignore[arg-type]


FUSED = [name for name in ("fused", "fused_32") if name in CPU_PLANS]  # where a C++ compiler is


def test_candidates_are_one_per_distinct_form_of_the_call() -> None:
    """Forward mode cannot tell plans apart by their backward; stride 2 has no padded or FFT numerators
    (the fused loops run at any stride); k=3 has only the direct and fused forms."""
    forward = candidate_plans("cpu", 9, 1, train=False)
    assert [p.name for p in forward] == ["direct", "padded", "fft", *FUSED]
    strided = candidate_plans("cpu", 9, 2, train=True)
    assert [p.name for p in strided] == ["direct", "fft_kernel_grads", *FUSED]
    assert [p.name for p in candidate_plans("cpu", 3, 1, train=True)] == ["direct", *FUSED]
    assert len({p.forms for p in candidate_plans("cpu", 9, 1, train=True)}) == 6 + len(FUSED)


def test_the_default_plan_is_the_same_on_every_machine() -> None:
    """No instruction set in it: direct, FFT kernel gradients from k=7 (in train mode)."""
    assert default_plan("cpu", 5, 1, train=True).name == "direct"
    assert default_plan("cpu", 7, 2, train=True).kernel_grads == "fft"
    assert default_plan("cpu", 7, 1, train=False) == default_plan("cpu", 3, 1, train=False) == default_plan(
        "cpu", 3, 1, train=True)
    assert default_plan("cuda", 31, 1, train=True).name == "fft_kernel_grads"
    assert default_plan("cuda", 31, 1, train=False).name == "direct"


def test_the_closed_form_counts_the_plan() -> None:
    problem = Problem(batch=2, height=16, width=16, channels=16, heads=2, window=9, mode="train")
    direct, fft = (next(p for p in candidate_plans("cpu", 9, 1, True) if p.name == n) for n in ("direct", "fft"))
    padded = next(p for p in candidate_plans("cpu", 9, 1, True) if p.name == "padded")
    assert qna_flops(problem, plan=direct) != qna_flops(problem, plan=fft)
    assert qna_flops(problem, plan=padded) > qna_flops(problem, plan=direct)
    assert qna_flops(problem) == qna_flops(problem, plan=default_plan("cpu", 9, 1, True))


# ---------------------------------------------------------------------------------------------------
# The tuner, with a stubbed timer


class StubTimer:
    """Seconds per candidate name (a plan, or a projections form; 1.0 unless given), without running
    anything; counts its calls."""

    def __init__(self, costs: dict[str, float] | None = None) -> None:
        self.costs = costs or {}
        self.calls: list[str] = []

    def __call__(self, candidate: Candidate, call: object) -> float:
        self.calls.append(candidate.name)
        return self.costs.get(candidate.name, 1.0)


def quiet_canary() -> float:
    """A canary that says the machine was quiet: a tuning is kept whatever else the machine runs."""
    return 1e-3


def tuned_module(timer: StubTimer, window: int = 5, tune: str = "cached") -> QnA:
    module = QnA(8, 8, 2, window=window, tune=tune)
    module.timer = timer
    module.canary = quiet_canary
    return module


def train_call(module: QnA, size: int = 9) -> None:
    x = torch.randn(2, size, size, 8, requires_grad=True)
    module(x).sum().backward()


def cache_files(folder: Path) -> list[Path]:
    return sorted((folder / CACHE_SUBDIR).glob("*.json"))


def test_the_tuner_picks_the_cheaper_candidate_and_caches_it(qna_plan_cache: Path) -> None:
    """Every train plan is timed on its whole forward and backward call; the cheapest wins and is cached."""
    timer = StubTimer({"fft_backward": 0.2, "fft_kernel_grads": 0.5})
    module = tuned_module(timer)
    train_call(module)
    flags = module.plan_flags()
    assert flags["plan_name"] == "fft_backward" and flags["plan_source"] == "tuned"
    assert flags["plan"]["numerator_grads"] == "fft" and flags["tune_seconds"] >= 0
    assert {"direct", "padded", "fft", "fft_kernel_grads", "padded_fft_kernel_grads", "fft_backward", *FUSED} <= set(timer.calls)
    (entry,) = [json.loads(f.read_text()) for f in cache_files(qna_plan_cache)]
    assert entry["plan"] == "fft_backward" and entry["key"]["mode"] == "train" and entry["key"]["window"] == 5

def test_a_changed_key_tunes_again_and_a_seen_key_does_not(qna_plan_cache: Path) -> None:
    timer = StubTimer({"padded": 0.1})
    module = tuned_module(timer)
    train_call(module)
    timed = len(timer.calls)
    train_call(module)  # same key: remembered
    assert len(timer.calls) == timed
    train_call(module, size=10)  # another shape
    assert len(timer.calls) == 2 * timed
    with torch.no_grad():
        module(torch.randn(2, 9, 9, 8))  # forward mode: another key, its own candidates
    assert len(timer.calls) > 2 * timed and len(cache_files(qna_plan_cache)) == 3
    fresh = tuned_module(timer)  # a new module reads the cache
    train_call(fresh)
    assert fresh.plan_flags()["plan_source"] == "cache" and fresh.plan_flags()["plan_name"] == "padded"


def test_the_cache_survives_a_new_process(qna_plan_cache: Path) -> None:
    """A subprocess on the same cache folder gets the stub's winner (the real timer would not pick it
    reliably) from the cache, without timing."""
    module = tuned_module(StubTimer({"padded": 0.5, "padded_fft_kernel_grads": 0.1}))
    train_call(module)
    assert module.plan_flags()["plan_name"] == "padded_fft_kernel_grads"
    script = (
        "import torch; from qna_bench.qna import QnA\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "m = QnA(8, 8, 2, window=5)\n"
        "m.timer = lambda candidate, call: (_ for _ in ()).throw(AssertionError('timed'))\n"
        "m(torch.randn(2, 9, 9, 8, requires_grad=True)).sum().backward()\n"
        "f = m.plan_flags(); print(f['plan_source'], f['plan_name'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cache", "padded_fft_kernel_grads"]


@pytest.mark.parametrize("content", ["{not json", '{"key": {"device": "another machine"}, "plan": "fft"}',
                                     "KEY_WITH_UNKNOWN_PLAN"])
def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(qna_plan_cache: Path, content: str) -> None:
    train_call(tuned_module(StubTimer({"fft": 0.1})))
    (path,) = cache_files(qna_plan_cache)
    if content == "KEY_WITH_UNKNOWN_PLAN":
        content = json.dumps({**json.loads(path.read_text()), "plan": "retired_plan"})
    path.write_text(content)
    timer = StubTimer({"fft_kernel_grads": 0.1})
    module = tuned_module(timer)
    train_call(module)
    assert timer.calls and module.plan_flags()["plan_source"] == "tuned"
    assert json.loads(path.read_text())["plan"] == "fft_kernel_grads"


def test_train_is_decided_on_train_steps_and_then_the_projections(qna_plan_cache: Path) -> None:
    """No forward stage bounds the train candidates: one stage of train steps, then the projections."""
    timer = StubTimer({"fft": 0.1, "fft_backward": 0.01})
    module = tuned_module(timer)
    train_call(module)
    assert module.plan_flags()["plan_name"] == "fft_backward"
    stages = {label.split()[0] for label, _ in module.plan_choice.timings_s}
    assert stages == {"train", "projections"}

def test_the_tuner_times_the_winners_projections_and_keeps_the_cheaper(qna_plan_cache: Path) -> None:
    """The projections' forms are timed on the winning plan; the cheaper one is recorded and cached,
    and a new module reads both the plan and the form from the cache."""
    calls: list[str] = []

    def timer(candidate: Candidate, call: object) -> float:
        calls.append(candidate.name)
        return {"padded": 0.5, "conv1x1": 0.5}.get(candidate.name, 1.0)

    module = QnA(8, 8, 2, window=5)
    module.timer = timer
    module.canary = quiet_canary
    train_call(module)
    flags = module.plan_flags()
    assert flags["plan_name"] == "padded" and flags["plan"]["projections"] == "conv1x1"
    assert {"linear", "conv1x1"} <= set(calls)
    (entry,) = [json.loads(f.read_text()) for f in cache_files(qna_plan_cache)]
    assert entry["plan"] == "padded" and entry["projections"] == "conv1x1"
    fresh = tuned_module(StubTimer())
    train_call(fresh)
    assert fresh.plan_flags()["plan_source"] == "cache" and fresh.plan_flags()["plan"]["projections"] == "conv1x1"
    forced = QnA(8, 8, 2, window=5, plan="padded")  # a forced plan runs its own (linear) projections
    train_call(forced)
    assert forced.plan_flags()["plan"]["projections"] == "linear"


def test_tune_off_takes_the_default_plan_without_timing(qna_plan_cache: Path) -> None:
    timer = StubTimer()
    module = tuned_module(timer, window=7, tune="off")
    train_call(module)
    flags = module.plan_flags()
    assert timer.calls == [] and cache_files(qna_plan_cache) == []
    assert flags["plan_source"] == "default" and flags["plan_name"] == "fft_kernel_grads"
    assert flags["tune_seconds"] == 0


def test_tune_always_times_again_despite_the_cache(qna_plan_cache: Path) -> None:
    train_call(tuned_module(StubTimer({"fft": 0.1})))
    timer = StubTimer({"padded": 0.1})
    module = tuned_module(timer, tune="always")
    train_call(module)
    assert timer.calls and module.plan_flags()["plan_name"] == "padded"
    (path,) = cache_files(qna_plan_cache)
    assert json.loads(path.read_text())["plan"] == "padded"


# ---------------------------------------------------------------------------------------------------
# The harness: the plan is chosen before the first call and recorded in the row


@pytest.mark.parametrize("tune", TUNES)
def test_a_qna_row_records_its_plan_and_the_tune_setting(tune: str) -> None:
    problem = Problem(batch=1, height=12, width=12, channels=8, heads=2, window=7, mode="train")
    settings = MeasureSettings(threads=1, min_run_time_s=0.01, min_replicates=1, memory=False, tune=tune)
    row = run_point(SweepPoint(get_layer("qna"), problem), settings, read_environment("cpu"), "run")
    assert row["status"] == "ok", row["reason"]
    flags = json.loads(row["layer_flags"])
    assert flags["tune"] == tune and flags["plan_fell_back"] is False
    assert flags["plan_source"] == {"off": "default"}.get(tune, "tuned")
    assert set(flags["plan"]) >= {"convolutions", "numerators", "numerator_grads", "kernel_grads"}
    assert json.loads(row["measure_settings"])["tune"] == tune
    assert row["flops"] == pytest.approx(row["flops_analytic"], rel=0.02)  # the closed form counts the plan


def test_the_reference_form_records_no_plan() -> None:
    problem = Problem(batch=1, height=8, width=8, channels=8, heads=2, window=3)
    settings = MeasureSettings(threads=1, min_run_time_s=0.01, min_replicates=1, memory=False, flops=False)
    row = run_point(SweepPoint(get_layer("qna_reference"), problem), settings, read_environment("cpu"), "run")
    assert row["status"] == "ok" and "plan" not in json.loads(row["layer_flags"])


def test_the_layer_code_version_covers_every_file_of_the_qna_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit to any file of qna_bench/qna (here: one the layer entry does not import by name) is a new
    code version of the QnA layers."""
    import qna_bench.identity as identity

    before = module_code_version("qna_bench.layers")
    package = Path(sys.modules["qna_bench.qna"].__file__).parent
    original = identity._package_sources

    def edited(name: str, module: object) -> dict[str, bytes]:
        sources = original(name, module)
        if name == "qna_bench.qna":
            key = f"qna_bench.qna/{(package / 'official.py').relative_to(package)}"
            sources[key] += b"# edited\n"
        return sources

    module_code_version.cache_clear()
    monkeypatch.setattr(identity, "_package_sources", edited)
    try:
        assert identity.module_code_version("qna_bench.layers") != before
    finally:
        module_code_version.cache_clear()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("plan", ["direct", "padded_fft_kernel_grads"])
def test_a_backward_in_batch_chunks_matches_the_reference_in_fp64(plan: str, stride: int, monkeypatch) -> None:
    """One sample per chunk of the backward's per-query temporaries: the same outputs and gradients."""
    monkeypatch.setattr(direct, "BACKWARD_CHUNK_BYTES", 1)
    assert direct.batch_chunks(3, 100) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert_plan_matches_the_reference(plan, stride, "cpu")
