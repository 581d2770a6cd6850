"""The one tuner (`qna_bench.tuner`) and the forms it chooses for every layer (`qna_bench.forms`): proof
before time, warm calls, interleaved rounds, the canary, the disk cache; with stubbed timers, never a
timed assertion."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qna_bench import forms, tuner
from qna_bench.problem import Problem
from qna_bench.qna import QnA
from qna_bench.qna import tuning as qna_tuning
from qna_bench.registry import get_layer, list_layers


class ScriptedTimer:
    """Seconds per candidate name (1.0 unless given), without running anything; records its calls."""

    def __init__(self, steady: dict[str, float]) -> None:
        self.steady = steady
        self.calls: list[str] = []

    def __call__(self, candidate: tuner.Candidate, call: object) -> float:
        self.calls.append(candidate.name)
        return self.steady.get(candidate.name, 1.0)


class CountedCalls:
    """A candidate's calls, counted; a timer that runs the call and bills it by its index (the first call
    of ``compiled`` 10x its steady cost, as a compiling or autotuning first call is)."""

    def __init__(self, steady: dict[str, float]) -> None:
        self.steady, self.count = steady, dict.fromkeys(steady, 0)

    def candidate(self, name: str) -> tuner.Candidate:
        def run() -> list[torch.Tensor]:
            self.count[name] += 1
            return [torch.ones(3)]
        return tuner.Candidate(name, run)

    def timer(self, candidate: tuner.Candidate, call) -> float:
        call()
        first = candidate.name == "compiled" and self.count[candidate.name] == 1
        return self.steady[candidate.name] * (10 if first else 1)


def test_a_candidate_slow_only_on_its_first_call_wins() -> None:
    """Compilation, primitive creation, autotuning: a first call 10x slower says nothing of the steady one."""
    calls = CountedCalls({"shipped": 1.0, "compiled": 0.5, "other": 0.8})
    outcome = tuner.tune([calls.candidate(name) for name in calls.steady], torch.float32, timer=calls.timer)
    assert outcome.winner == "compiled" and dict(outcome.medians_s)["compiled"] == 0.5
    assert calls.count["compiled"] >= 1 + tuner.ROUNDS  # proved (untimed), then every round (the first prunes)


def test_candidates_are_timed_in_rotated_interleaved_rounds() -> None:
    candidates = [tuner.Candidate(name, lambda: [torch.ones(1)]) for name in "abc"]
    timer = ScriptedTimer({"a": 0.3, "b": 0.3, "c": 0.3})
    tuner.tune(candidates, torch.float32, timer=timer)
    rounds = timer.calls[-len(candidates) * tuner.ROUNDS:]  # one call a block: each lasts over BLOCK_S
    assert rounds == ["a", "b", "c", "b", "c", "a", "c", "a", "b"][: len(rounds)]


def test_a_form_that_gives_a_different_output_is_refused_before_it_is_timed(caplog) -> None:
    wrong = tuner.Candidate("wrong", lambda: [torch.ones(4) * 1.01])
    raises = tuner.Candidate("raises", lambda: (_ for _ in ()).throw(RuntimeError("no kernel for this shape")))
    timer = ScriptedTimer({"wrong": 0.01, "raises": 0.01, "right": 0.5})
    with caplog.at_level("WARNING", logger="qna_bench.tuner"):
        outcome = tuner.tune([tuner.Candidate("shipped", lambda: [torch.ones(4)]), wrong, raises,
                              tuner.Candidate("right", lambda: [torch.ones(4) * (1 + 1e-6)])], torch.float32, timer=timer)
    assert "wrong" not in timer.calls and "raises" not in timer.calls
    assert outcome.winner == "right"
    refused = dict(outcome.refused)
    assert "differs from the form as built by 0.01" in refused["wrong"] and "no kernel" in refused["raises"]
    assert "form wrong refused" in caplog.text


def test_a_tuning_with_a_slow_canary_is_done_again_and_kept_only_when_the_machine_was_quiet() -> None:
    candidates = [tuner.Candidate(name, lambda: [torch.ones(1)]) for name in ("a", "b")]
    canaries = itertools.cycle([1.0e-3, 1.6e-3])
    noisy = tuner.tune(candidates, torch.float32, timer=ScriptedTimer({}), canary=lambda: next(canaries),
                       usual_canary_s=1.0e-3)
    assert not noisy.keep and noisy.canary_s == (1.6e-3, 1.0e-3)
    # slow; back to usual on the second poll (the first is still slow); quiet the second time
    canaries = iter([1.0e-3, 1.6e-3, 1.6e-3, 1.0e-3, 1.0e-3, 1.1e-3])
    timer = ScriptedTimer({})
    again = tuner.tune(candidates, torch.float32, timer=timer, canary=lambda: next(canaries), usual_canary_s=1.0e-3)
    assert again.keep and again.canary_s == (1.0e-3, 1.1e-3) and timer.calls.count("a") == 2 * tuner.ROUNDS
    assert again.seconds >= tuner.QUIET_POLL_S  # the wait for quiet counts as tuning time
    quiet = tuner.tune(candidates, torch.float32, timer=ScriptedTimer({}), canary=lambda: 1.1e-3, usual_canary_s=1.0e-3)
    assert quiet.keep


def test_qna_does_not_cache_a_tuning_whose_canary_ran_slow(qna_plan_cache: Path) -> None:
    module = QnA(8, 8, 2, window=5)
    x = torch.randn(2, 9, 9, 8)
    key = qna_tuning.plan_key(x, 8, 2, 2, 5, 1, False)
    canaries = itertools.cycle([1e-3, 5e-3])
    choice = qna_tuning.choose_plan(key, x.device, 1, False, "cached", module._timed_call(module._values_and_scores(x)),
                                    ScriptedTimer({}), canary=lambda: next(canaries))
    assert choice.source == "tuned"
    assert not list((qna_plan_cache / qna_tuning.CACHE_SUBDIR).glob("*.json"))


def test_a_changed_candidate_set_tunes_again(qna_plan_cache: Path, monkeypatch) -> None:
    x = torch.randn(2, 9, 9, 8)
    before = qna_tuning.plan_key(x, 8, 2, 2, 5, 1, True)
    full = qna_tuning.candidate_plans
    monkeypatch.setattr(qna_tuning, "candidate_plans", lambda *a, **k: full(*a, **k)[:-1])
    after = qna_tuning.plan_key(x, 8, 2, 2, 5, 1, True)
    assert after != before and tuner.key_file(after.as_dict()) != tuner.key_file(before.as_dict())
    problem = Problem(batch=1, height=6, width=6, channels=8, heads=2, window=3)
    captured = forms.captured_products(nn.Linear(8, 8), torch.randn(36, 8))
    assert forms.form_key("v", problem, captured, ["linear", "conv1x1"]) != forms.form_key("v", problem, captured, ["linear"])


def test_qna_decides_train_on_every_train_plan_not_the_forward_winner(qna_plan_cache: Path) -> None:
    """The forward's winner does not bound the train candidates: every plan runs its whole train step."""
    timer = ScriptedTimer({"fft": 0.1, "fused": 0.5, "direct": 0.4})
    module = QnA(8, 8, 2, window=5)
    module.timer = timer
    module(torch.randn(2, 9, 9, 8, requires_grad=True)).sum().backward()
    timed = set(timer.calls)
    assert {p.name for p in qna_tuning.ordered_candidates("cpu", 5, 1, True)} <= timed
    assert module.plan_flags()["plan_name"] == "fft"


def test_a_skipped_candidate_is_neither_run_nor_timed_and_the_reference_always_runs() -> None:
    def never() -> list[torch.Tensor]:
        raise AssertionError("a skipped candidate ran")
    timer = ScriptedTimer({"reference": 0.2, "other": 0.1})
    outcome = tuner.tune([tuner.Candidate("reference", lambda: [torch.ones(2)]), tuner.Candidate("skipped", never),
                          tuner.Candidate("other", lambda: [torch.ones(2)])], torch.float32, timer=timer,
                         skip={"skipped": "lost before", "reference": "ignored: the reference runs"})
    assert outcome.winner == "other" and outcome.skipped == (("skipped", "lost before"),)
    assert "skipped" not in timer.calls and "reference" in timer.calls


def _train_tuning(window: int, steady: dict[str, float], size: int) -> tuple[ScriptedTimer, dict]:
    timer = ScriptedTimer(steady)
    module = QnA(8, 8, 2, window=window)
    module.timer = timer
    x = torch.randn(2, size, size, 8, requires_grad=True)
    module(x).sum().backward()
    key = qna_tuning.plan_key(x, 8, 2, 2, window, 1, True)
    return timer, tuner.read_choice(qna_tuning.CACHE_SUBDIR, key.as_dict())


def test_qna_does_not_time_a_plan_that_lost_at_a_smaller_window_and_grows_faster(qna_plan_cache: Path) -> None:
    """At window 5 the FFT won by 10x over the plans that run direct what it runs as FFTs: at 7 they are
    neither proved nor timed, the reference (the default plan) still runs; a plan of the same growth as
    the winner (padded against direct) is always timed."""
    _train_tuning(5, {"fft": 0.1, "fused": 0.12}, size=9)
    timer, entry = _train_tuning(7, {"fft": 0.1}, size=9)
    assert {"direct", "padded", "fft_backward"} <= set(entry["skipped"]) and "fused" not in entry["skipped"]
    assert "lost to fft by 10.0x at window 5" in entry["skipped"]["direct"]
    assert not {"direct", "padded", "fft_backward"} & set(timer.calls)
    assert {"fft", "fused", qna_tuning.default_plan("cpu", 7, 1, True).name} <= set(timer.calls)
    timer, entry = _train_tuning(9, {"fft": 0.1}, size=9)  # carried on from the window that skipped them
    assert {"direct", "padded"} <= set(entry["skipped"]) and "direct" not in timer.calls

    _train_tuning(5, {"direct": 0.1}, size=10)
    timer, entry = _train_tuning(7, {"direct": 0.1}, size=10)
    assert "padded" in timer.calls and "padded" not in entry["skipped"]


# --------------------------------------------------------------------------------------------------
# The GEMM form of every layer that declares one


GEMM_LAYERS = [name for name in list_layers() if forms.GEMM in get_layer(name).forms and get_layer(name).prepare is None]


def whole_layer_step(module: nn.Module, x: torch.Tensor, problem: Problem) -> list[torch.Tensor | None]:
    """The output of one call and, in train, the gradients of the input and of every parameter."""
    if problem.mode != "train":
        with torch.inference_mode():
            return [module(x)]
    leaf = x.detach().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    out = module(leaf)
    grads = torch.autograd.grad(out, [leaf, *params], problem.make_output_grad(out), allow_unused=True)
    return [out.detach(), *grads]


def _as_built_and_swapped(name: str, mode: str, form: str):
    spec = get_layer(name)
    dtype = "float64" if "float64" in spec.dtypes else "float32"
    problem = Problem(batch=1, height=7, width=7, channels=8, heads=2, window=3, dtype=dtype, mode=mode)
    if spec.unsupported_reason(problem) is not None:
        pytest.skip(spec.unsupported_reason(problem))
    module = spec.build(problem)
    x = problem.make_input(spec.layout)
    reference = whole_layer_step(module, x, problem)
    forms.set_gemm(module, form)
    return reference, whole_layer_step(module, x, problem), module


def test_every_layer_with_a_gemm_form_declares_pointwise_products() -> None:
    for name in GEMM_LAYERS:
        spec = get_layer(name)
        problem = Problem(batch=1, height=7, width=7, channels=8, heads=2, window=3)
        assert forms.has_pointwise(spec.build(problem)), name


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("name", GEMM_LAYERS)
def test_every_gemm_form_equals_the_layer_as_built(name: str, mode: str) -> None:
    """fp64 (fp32 where the layer runs no fp64), output and every gradient: a swapped library computes
    the same products."""
    for form in forms.GEMM_FORMS:
        reference, swapped, module = _as_built_and_swapped(name, mode, form)
        assert forms.gemm_of(module) == form
        gap = tuner.difference(swapped, reference)
        assert not isinstance(gap, str) and gap < tuner.tolerance(reference[0].dtype) / 10, (name, mode, form, gap)


def test_a_swap_keeps_the_parameters_and_the_originals_come_back() -> None:
    module = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(6, 3, 1), nn.Conv2d(3, 3, 3))
    params = list(module.parameters())
    forms.set_gemm(module, "conv1x1")
    assert isinstance(module[0], forms.PointwiseProduct) and not isinstance(module[1], forms.PointwiseProduct)
    assert not isinstance(module[2], forms.PointwiseProduct)  # a 3x3 convolution is no pointwise product
    assert list(module.parameters()) == params
    forms.set_gemm(module, None)
    assert type(module[0]) is nn.Linear and type(module[1]) is nn.Conv2d


def test_qna_keeps_its_own_projections() -> None:
    """QnA runs its projections through its own plan: the generic GEMM form leaves its Linears alone."""
    assert not forms.has_pointwise(QnA(8, 8, 2))
    outer = nn.Sequential(nn.Linear(8, 8), QnA(8, 8, 2))
    assert [name for _, name, _ in forms.pointwise_slots(outer)] == ["0"]


def test_prepare_forms_tunes_caches_and_reads_the_cache(qna_plan_cache: Path) -> None:
    problem = Problem(batch=1, height=8, width=8, channels=8, heads=2, window=3, mode="train")
    spec = get_layer("swin_fused")

    def prepared(tune: str, timer):
        module = spec.build(problem)
        return module, forms.prepare_forms(module, problem.make_input(spec.layout), problem, "v", tune,
                                           timer=timer, canary=lambda: 1e-3)

    module, choice = prepared("cached", ScriptedTimer({"linear": 0.4, "conv1x1": 0.2}))
    assert choice.form == {"gemm": "conv1x1"} and choice.source == "tuned" and forms.gemm_of(module) == "conv1x1"
    assert json.loads(forms.form_columns(module)["form"]) == {"gemm": "conv1x1"}
    assert len(list((qna_plan_cache / forms.CACHE_SUBDIR).glob("*.json"))) == 1
    refuse = ScriptedTimer({})
    module, choice = prepared("cached", lambda c, call: refuse.calls.append(c.name) or 1.0)
    assert choice.source == "cache" and forms.gemm_of(module) == "conv1x1" and not refuse.calls
    module, choice = prepared("off", refuse)
    assert choice.source == "default" and choice.form == {"gemm": "linear"} and forms.gemm_of(module) == "linear"


@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (12, 49, 8), (35, 8)])
def test_the_conv1x1_form_sees_an_image_whose_strides_torch_reads_as_channels_last(shape) -> None:
    """Strides torch reads otherwise send oneDNN down its NCHW path with a copy each way (measured 2.4x
    slower than F.linear on fused Swin's window rows, where the channels-last view is 1.3x faster)."""
    x = torch.randn(shape)
    image = forms.channels_last_image(x)
    assert image.stride() == image.contiguous(memory_format=torch.channels_last).stride()
    assert image.data_ptr() == x.data_ptr() and image.shape[1] == shape[-1]
    weight, bias = torch.randn(6, shape[-1]), torch.randn(6)
    torch.testing.assert_close(forms.gemm(x, weight, bias, "conv1x1"), F.linear(x, weight, bias))


def test_the_usual_canary_is_the_median_of_the_kept_tunings_and_a_slow_one_does_not_move_it(qna_plan_cache) -> None:
    def noted(*canary_s: float, keep: bool = True) -> None:
        tuner.note_canary("cpu: test", 2, tuner.Tuning("a", (), (), 0.0, canary_s, keep))

    assert tuner.usual_canary("cpu: test", 2) is None
    noted(1.0e-3, 1.2e-3)
    assert tuner.usual_canary("cpu: test", 2) == 1.0e-3  # the fastest seen, before five tunings
    for seconds in (0.6e-3, 0.7e-3, 0.8e-3, 0.9e-3):
        noted(seconds, 2 * seconds)
    assert tuner.usual_canary("cpu: test", 2) == pytest.approx(0.8e-3)
    noted(5e-3, 5e-3, keep=False)
    assert tuner.usual_canary("cpu: test", 2) == pytest.approx(0.8e-3)
    assert tuner.usual_canary("cpu: test", 1) is None  # per thread count


def _form_key(name: str, window: int, mode: str = "forward") -> dict | None:
    problem = Problem(batch=1, height=16, width=16, channels=16, heads=2, window=window, mode=mode)
    spec = get_layer(name)
    if spec.unsupported_reason(problem) is not None:
        return None
    module = spec.build(problem)
    captured = forms.captured_products(module, problem.make_input(spec.layout))
    return forms.form_key("v", problem, captured, ["linear", "conv1x1"])


def test_a_gemm_form_is_keyed_by_the_products_so_layers_with_the_same_products_share_a_tuning() -> None:
    """Swin's four paths run the same products at one window and share a key; timm pads Swin's map to a
    multiple of the window (18² at k=3, 20² at k=5), so its windows do not; a window-free attention's
    products are the same at every window."""
    at_3 = {name: _form_key(name, 3) for name in ("swin_fused", "swin_shifted_fused", "swin", "swin_shifted")}
    assert len({json.dumps(key, sort_keys=True) for key in at_3.values()}) == 1
    assert _form_key("swin_fused", 5) != at_3["swin_fused"]
    assert _form_key("global_attn", 3) == _form_key("global_attn", 5) != _form_key("global_attn", 3, "train")
    assert _form_key("global_attn", 3) != at_3["swin_fused"]
