"""Tests of the QnA layer: fast form against the reference form and the official algorithm, gradients,
argument checks, output sizes, the FFT and padded paths forced by plan, torch.compile and half precision."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import qna_bench.qna.core as qna_core
import qna_bench.qna.fft as qna_fft
from qna_bench.qna import (
    FFT_CHUNK_BYTES,
    QnA,
    available_plans,
    get_plan,
    qna_attention,
    qna_attention_reference,
    qna_output_size,
)
from qna_bench.qna.direct import depthwise_conv_input_grad
from qna_bench.qna.plans import _PLANS
from qna_bench.qna.projection import PROJECTIONS


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These shapes are tiny: with two threads on a busy 2-core machine, OpenMP's spin-waiting at every
    small op made gradcheck 50-200x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_fft_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The calls of each FFT path (forward numerators, backward numerators, kernel gradients), updated as
    they run."""
    calls = {"forward": 0, "backward": 0, "kernel_grad": 0}
    for name, path in (
        ("fft_numerators", "forward"),
        ("fft_numerator_grads", "backward"),
        ("depthwise_weight_grad_fft", "kernel_grad"),
    ):
        original = getattr(qna_core, name)

        def counting(*args: object, _original=original, _path=path) -> object:
            calls[_path] += 1
            return _original(*args)

        monkeypatch.setattr(qna_core, name, counting)
    return calls


@pytest.fixture(params=["direct", "fft_kernel_grads"])
def weight_grad_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A plan with each kernel-gradient path (the test forces it); checks that path ran."""
    calls = count_fft_calls(monkeypatch)
    yield request.param
    assert (calls["kernel_grad"] > 0) == (request.param == "fft_kernel_grads")


# The plan that runs the numerators' convolutions as FFTs in the forward, the backward or both.
FFT_CONVOLUTION_PLANS = {(True, True): "fft", (True, False): "fft_forward", (False, True): "fft_backward"}


def make_qna(dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs: object) -> QnA:
    """A QnA with non-trivial bias and mixing weights (their zero / tiny initial values hide bugs)."""
    torch.manual_seed(seed)
    module = QnA(**kwargs).to(dtype)
    with torch.no_grad():
        module.rpe_bias.normal_(0.0, 0.5)
        module.query_mixing.normal_(0.0, 1.0)
    return module


def run_with_grads(module: QnA, x: torch.Tensor, impl: str, grad_out: torch.Tensor | None = None):
    """Output, and the gradients of <output, grad_out> w.r.t. x and every parameter."""
    module.impl = impl
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out.to(out.device, out.dtype))
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def assert_close_to_scale(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str, zero_scale: float = 1.0
) -> None:
    """Max error relative to the largest expected value; ``zero_scale`` stands in for that when the
    expected tensor is exactly zero (at window 1, the softmax over one tap has no query, key or bias
    gradient, and the fast form's rounding leaves a residue of the size of the other gradients' rounding)."""
    scale = expected.abs().max()
    if scale == 0:
        scale = torch.tensor(zero_scale)
    err = (actual - expected).abs().max() / scale
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    assert err <= rtol, f"{what}: max error {err:.2e} relative to scale {scale:.2e} (allowed {rtol:.0e})"


def compare_forms(module: QnA, x: torch.Tensor, rtol: float) -> None:
    out_ref, grads_ref = run_with_grads(module, x, "reference")
    out_fast, grads_fast = run_with_grads(module, x, "fast")
    assert_close_to_scale(out_fast, out_ref, rtol, "output")
    largest_grad = max(g.abs().max().item() for g in grads_ref.values())
    for name, g in grads_ref.items():
        assert_close_to_scale(grads_fast[name], g, rtol, f"grad {name}", zero_scale=largest_grad)


# ---------------------------------------------------------------------------------------------------
# Fast form == reference form


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("projections", PROJECTIONS)
def test_every_projection_form_matches_the_reference_fp64(projections: str, stride: int, bias: bool) -> None:
    """Both forms of the two projections, forced, with and without biases: output and every gradient."""
    module = make_qna(in_channels=6, features=8, heads=2, window=5, stride=stride, bias=bias,
                      plan="direct", projections=projections)
    with torch.no_grad():
        for linear in (module.value_proj, module.out_proj):
            if linear.bias is not None:
                linear.bias.normal_()
    compare_forms(module, torch.randn(2, 9, 7, 6, dtype=torch.float64), rtol=1e-10)
    assert module.plan_flags()["plan"]["projections"] == projections


def test_an_unknown_projection_form_is_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"projections='gemm'.*linear, conv1x1"):
        QnA(8, 8, 2, projections="gemm")


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("num_queries", [1, 2, 4])
@pytest.mark.parametrize("window", [1, 3, 5, 7, 11])
@pytest.mark.parametrize("stride", [1, 2])
def test_fast_matches_reference_fp64(stride: int, window: int, num_queries: int, heads: int) -> None:
    module = make_qna(
        in_channels=6, features=8, heads=heads, window=window, stride=stride, num_queries=num_queries
    )
    x = torch.randn(2, 9, 7, 6, dtype=torch.float64)
    compare_forms(module, x, rtol=1e-10)


# Every window, stride, query count and head count on an odd map (57 x 53: uneven edges at both strides),
# and the benchmark's own 56 x 56 with its 2 queries and 4 heads.
FP32_CASES = [
    (stride, size, window, num_queries, heads)
    for stride in (1, 2)
    for window in (1, 3, 5, 7, 11)
    for size, queries_and_heads in (((57, 53), [(q, h) for q in (1, 2, 4) for h in (1, 4)]), ((56, 56), [(2, 4)]))
    for num_queries, heads in queries_and_heads
]


@pytest.mark.parametrize(("stride", "size", "window", "num_queries", "heads"), FP32_CASES)
def test_fast_matches_reference_fp32(
    stride: int, size: tuple[int, int], window: int, num_queries: int, heads: int
) -> None:
    module = make_qna(
        torch.float32,
        in_channels=8,
        features=8,
        heads=heads,
        window=window,
        stride=stride,
        num_queries=num_queries,
    )
    x = torch.randn(1, *size, 8)
    compare_forms(module, x, rtol=1e-5)


def test_both_weight_grad_paths_match_reference(weight_grad_path: str) -> None:
    for stride in (1, 2):
        for window in (1, 5, 9):
            module = make_qna(in_channels=5, features=8, heads=2, window=window, stride=stride, plan=weight_grad_path)
            compare_forms(module, torch.randn(2, 11, 8, 5, dtype=torch.float64), rtol=1e-10)


@pytest.mark.parametrize(("forward", "backward"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("window", [1, 3, 5, 9])
def test_fft_convolutions_match_reference(
    monkeypatch: pytest.MonkeyPatch, window: int, forward: bool, backward: bool
) -> None:
    """The numerators as FFT convolutions in either pass or both (forced plans): output and every
    gradient equal the reference form's (fp64, several heads, queries and chunks; fp32 on the
    benchmark's map size)."""
    calls = count_fft_calls(monkeypatch)
    plan = FFT_CONVOLUTION_PLANS[forward, backward]
    for num_queries, heads in ((1, 1), (2, 4), (3, 2)):
        module = make_qna(in_channels=6, features=8, heads=heads, window=window, num_queries=num_queries, plan=plan)
        compare_forms(module, torch.randn(2, 9, 7, 6, dtype=torch.float64), rtol=1e-10)
    module = make_qna(torch.float32, in_channels=8, features=8, heads=2, window=window, plan=plan)
    compare_forms(module, torch.randn(1, 56, 56, 8), rtol=1e-5)
    assert (calls["forward"] > 0) == forward and (calls["backward"] > 0) == backward


@pytest.mark.parametrize("chunk_bytes", [1, 7000, 1 << 30])
def test_fft_convolution_chunks(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    """Chunks of one channel, of part of a head, of a whole head: the same output and gradients."""
    chunked = dataclasses.replace(get_plan("fft", "cpu"), name="fft_chunked", fft_chunk_bytes=chunk_bytes)
    monkeypatch.setitem(_PLANS, chunked.name, chunked)
    module = make_qna(in_channels=6, features=12, heads=2, window=5, plan=chunked.name)
    compare_forms(module, torch.randn(2, 10, 8, 6, dtype=torch.float64), rtol=1e-10)


def test_fft_convolutions_run_only_with_stride_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced FFT plan at stride 2 runs its numerators directly (the FFT numerators are stride-1
    convolutions) and its kernel gradients as FFTs; the padded-window plans are CPU plans."""
    calls = count_fft_calls(monkeypatch)
    module = make_qna(in_channels=6, features=8, heads=2, window=5, stride=2, plan="fft")
    compare_forms(module, torch.randn(2, 9, 7, 6, dtype=torch.float64), rtol=1e-10)
    assert calls["forward"] == calls["backward"] == 0 and calls["kernel_grad"] > 0
    assert module.plan_flags()["plan"] == {
        "convolutions": "direct", "numerators": "direct", "numerator_grads": "direct", "kernel_grads": "fft",
        "fft_chunk_bytes": str(FFT_CHUNK_BYTES), "projections": "linear",
    }
    assert get_plan("fft", "cuda").name == "fft"
    with pytest.raises(ValueError, match="plan='padded': QnA's plans on cuda are direct, fft_kernel_grads"):
        get_plan("padded", "cuda")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(13, 13), (14, 9), (5, 16)])
@pytest.mark.parametrize("window", [1, 3, 7, 15])
def test_fft_kernel_gradient_matches_convolution_backward(
    window: int, size: tuple[int, int], stride: int
) -> None:
    padding = (window - 1) // 2
    x = torch.randn(3, *size, 7, dtype=torch.float64)
    out_size = [qna_output_size(n, window, stride) for n in size]
    grad_out = torch.randn(3, *out_size, 7, dtype=torch.float64)
    kernel = torch.randn(7, 1, window, window, dtype=torch.float64)
    expected = torch.ops.aten.convolution_backward(
        grad_out.permute(0, 3, 1, 2),
        x.permute(0, 3, 1, 2),
        kernel,
        None,
        [stride] * 2,
        [padding] * 2,
        [1, 1],
        False,
        [0, 0],
        7,
        [False, True, False],
    )[1]
    actual = qna_fft.depthwise_weight_grad_fft(
        x, qna_fft.LazyGrad(grad_out.unsqueeze(-1)), tuple(out_size), window, stride, padding, FFT_CHUNK_BYTES
    )
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_bytes", [1, 7000, 1 << 30])
def test_fft_kernel_gradient_chunks(chunk_bytes: int) -> None:
    """Chunks of one channel, chunks that split heads, one chunk: same kernel gradient, from a lazy a / b."""
    x = torch.randn(2, 12, 10, 6, dtype=torch.float64)
    a, b = (
        torch.randn(2, 6, 5, 2, 3, dtype=torch.float64),
        torch.rand(2, 6, 5, 2, 1, dtype=torch.float64) + 0.5,
    )
    expected = torch.ops.aten.convolution_backward(
        (a / b).flatten(-2).permute(0, 3, 1, 2),
        x.permute(0, 3, 1, 2),
        torch.empty(6, 1, 5, 5, dtype=torch.float64),
        None,
        [2, 2],
        [2, 2],
        [1, 1],
        False,
        [0, 0],
        6,
        [False, True, False],
    )[1]
    actual = qna_fft.depthwise_weight_grad_fft(x, qna_fft.LazyGrad(a, b), (6, 5), 5, 2, 2, chunk_bytes)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def with_large_logits(module: QnA, x: torch.Tensor, logit: float) -> torch.Tensor:
    """``x`` shifted along the first query's key direction so that its logits sit near ``logit``.

    The shift adds one constant to all logits of a query and head (the attention weights stay the same,
    the values move by a constant), but ``exp`` of the logits overflows without the max shift.
    """
    with torch.no_grad():
        key_query = torch.einsum("chd,nhd->cnh", module.key_weight, module.scaled_queries())
        direction = key_query.reshape(module.in_channels, -1)[:, 0].to(x.dtype)
        return x + logit / direction.square().sum() * direction


def compare_with_fp64_reference(module: QnA, x: torch.Tensor, rtol: float) -> None:
    """The fp32 fast form against the reference form evaluated in fp64 on the same parameters."""
    grad_out = torch.randn(module(x).shape, generator=torch.Generator().manual_seed(2))
    module64 = QnA(
        module.in_channels, module.features, module.heads, module.window, module.stride, module.num_queries
    ).double()
    module64.load_state_dict(module.state_dict())
    out64, grads64 = run_with_grads(module64, x.double(), "reference", grad_out.double())
    out, grads = run_with_grads(module, x, "fast", grad_out)
    assert_close_to_scale(out.double(), out64, rtol, "output")
    for name, g in grads64.items():
        assert_close_to_scale(grads[name].double(), g, rtol, f"grad {name}")


def test_large_logits_do_not_overflow() -> None:
    """Logits near 120 overflow exp in fp32 without the max shift; the fast form stays finite and exact.

    fp32 resolves such logits only to ~1e-5, and the gradients of the query and key weights cancel a
    large common input component, so the comparison is with the reference form in fp64.
    """
    module = make_qna(torch.float32, in_channels=8, features=8, heads=2, window=5, num_queries=2)
    x = with_large_logits(module, torch.randn(2, 23, 19, 8), 120.0)
    with torch.no_grad():
        assert torch.isinf(torch.exp(module.scores(x))).any(), "test needs logits that overflow exp in fp32"
    compare_with_fp64_reference(module, x, rtol=1e-4)


def test_large_rpe_bias_does_not_overflow() -> None:
    module = make_qna(torch.float32, in_channels=4, features=4, heads=1, window=3)
    with torch.no_grad():
        module.rpe_bias.add_(150.0)
        assert torch.isinf(torch.exp(module.rpe_bias)).all()
    compare_with_fp64_reference(module, torch.randn(1, 8, 8, 4), rtol=1e-5)


@pytest.fixture
def recomputed_pixels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many output pixels each call of the fast form recomputed with their own max."""
    counts: list[int] = []
    original = qna_core.recompute_windows

    def counting(z: torch.Tensor, underflowed: torch.Tensor, *args: object) -> torch.Tensor:
        counts.append(int(underflowed.sum()))
        return original(z, underflowed, *args)

    monkeypatch.setattr(qna_core, "recompute_windows", counting)
    return counts


def split_image(x: torch.Tensor, module: QnA, spread: float) -> torch.Tensor:
    """``x`` with the first query's logits raised by spread/2 in the left half of every image and lowered
    by spread/2 in the right half: the right half's windows lie ``spread`` below the image's max."""
    half = x.shape[2] // 2
    return torch.cat(
        [with_large_logits(module, x[:, :, :half], spread / 2), with_large_logits(module, x[:, :, half:], -spread / 2)],
        dim=2,
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_fp32_logits_spread_150_within_an_image_match_fp64_reference(
    stride: int, recomputed_pixels: list[int]
) -> None:
    """A spread of 150 underflows every window of the low half (exp(-150) = 0 in fp32): those windows are
    recomputed with their own max, and output and gradients stay within 1e-4 of the fp64 reference."""
    module = make_qna(torch.float32, in_channels=8, features=8, heads=2, window=5, stride=stride)
    x = split_image(torch.randn(2, 11, 16, 8), module, 150.0)
    compare_with_fp64_reference(module, x, rtol=1e-4)
    assert recomputed_pixels and min(recomputed_pixels) > 0


def compare_core_with_fp64_reference(
    dtype: torch.dtype,
    spread: float,
    window: int,
    stride: int,
    tol: float,
    logit_std: float = 1.0,
    plan: str | None = None,
) -> None:
    """`qna_attention` in ``dtype`` with every logit raised by spread/2 in the left half of each image and
    lowered by spread/2 in the right half, against the reference in fp64 on the same, exactly
    representable, inputs: finite, and within ``tol`` of the output and 2 ``tol`` of every gradient.
    Logits and relative position biases are normal with ``logit_std`` around that."""
    torch.manual_seed(0)
    num_queries, heads, features = 2, 2, 8
    scores = torch.randn(2, 11, 16, num_queries * heads) * logit_std
    scores[:, :, :8] += spread / 2
    scores[:, :, 8:] -= spread / 2
    inputs = [
        scores,
        torch.randn(2, 11, 16, features),
        torch.randn(num_queries, heads, window, window) * logit_std,
        torch.randn(num_queries, heads, window, window),
    ]
    low = [t.to(dtype).requires_grad_(True) for t in inputs]
    exact = [t.detach().double().requires_grad_(True) for t in low]
    grad_out = torch.randn(2, qna_output_size(11, window, stride), qna_output_size(16, window, stride), features)
    out = qna_attention(*low, stride=stride, plan=plan)
    out.backward(grad_out.to(dtype))
    expected = qna_attention_reference(*exact, stride=stride)
    expected.backward(grad_out.double())
    assert out.dtype == dtype
    assert_close_to_scale(out.double(), expected, tol, f"{dtype} output")
    for name, a, b in zip(("scores", "values", "rpe_bias", "query_mixing"), low, exact, strict=True):
        assert a.grad.dtype == dtype
        assert_close_to_scale(a.grad.double(), b.grad, 2 * tol, f"{dtype} grad {name}")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("spread", [30.0, 150.0])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_logits_spread_30_within_an_image_match_fp64_reference(
    dtype: torch.dtype, spread: float, tol: float, stride: int, recomputed_pixels: list[int]
) -> None:
    """The core in fp16 / bf16 with logits spread by 30 or 150 between the two halves of an image (exp
    underflows below -17 in fp16, below -104 in bf16): finite, and within the dtype's rounding of the
    fp64 reference. At 150 even the fp32 core underflows, and the low half's windows are recomputed."""
    assert torch.exp(torch.tensor(-spread, dtype=dtype)) == 0 or dtype == torch.bfloat16
    compare_core_with_fp64_reference(dtype, spread, 5, stride, tol)
    assert (min(recomputed_pixels) > 0) == (spread > 100)


@pytest.fixture
def every_fft_path(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The calls of each FFT path, for tests that force the plan "fft" (FFT numerators in both passes
    and FFT kernel gradients)."""
    return count_fft_calls(monkeypatch)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_fft_paths_with_underflowed_windows_match_fp64_reference(
    dtype: torch.dtype, tol: float, every_fft_path: dict[str, int], recomputed_pixels: list[int]
) -> None:
    """A spread of 150 on the FFT paths: the low half's windows underflow and are recomputed; the rest,
    logits and biases spread by ~0.3 around their half's level, lies within `FFT_RESOLVED_RATIO` of its
    image's max, so the FFTs run, and the result stays exact."""
    compare_core_with_fp64_reference(dtype, 150.0, 9, 1, tol, logit_std=0.3, plan="fft")
    assert min(recomputed_pixels) > 0
    assert every_fft_path["forward"] and every_fft_path["backward"] and every_fft_path["kernel_grad"]


@pytest.mark.parametrize("fft_numerators", [True, False])
def test_fft_paths_give_way_to_direct_ones_where_an_image_spreads(
    monkeypatch: pytest.MonkeyPatch, every_fft_path: dict[str, int], fft_numerators: bool
) -> None:
    """Windows 20 below their image's max: an FFT convolution's rounding (relative to the image's largest
    value) would swamp them, so every convolution runs directly and stays within 1e-4 of fp64. With the
    check turned off the FFT paths run and miss by far more: the check is what keeps them exact. The FFT
    kernel gradients alone (as before the FFT numerators) missed too: rpe_bias's gradient by 100%. The
    module says that its plan fell back."""
    plan = "fft" if fft_numerators else "fft_kernel_grads"
    module = make_qna(torch.float32, in_channels=8, features=8, heads=2, window=9, plan=plan)
    x = split_image(torch.randn(2, 11, 16, 8), module, 20.0)
    compare_with_fp64_reference(module, x, rtol=1e-4)
    assert every_fft_path == {"forward": 0, "backward": 0, "kernel_grad": 0}
    assert module.plan_flags()["plan_fell_back"] is True
    monkeypatch.setattr(qna_fft, "FFT_RESOLVED_RATIO", {torch.float32: 0.0, torch.float64: 0.0})
    with pytest.raises(AssertionError, match="max error"):
        compare_with_fp64_reference(module, x, rtol=1e-2)
    assert module.plan_flags()["plan_fell_back"] is False
    assert every_fft_path["kernel_grad"]
    assert bool(every_fft_path["forward"]) == bool(every_fft_path["backward"]) == fft_numerators


@pytest.mark.parametrize("plan", available_plans("cpu"))
def test_split_logits_in_inference_mode_match_grad_mode(plan: str) -> None:
    """With the plan forced: the two modes are different keys, so a tuned module may choose different
    plans for them, whose roundings differ."""
    module = make_qna(torch.float32, in_channels=8, features=8, heads=2, window=3, plan=plan)
    x = split_image(torch.randn(1, 9, 12, 8), module, 150.0)
    with torch.inference_mode():
        out = module(x)
    torch.testing.assert_close(out, module(x).detach(), rtol=1e-6, atol=1e-6 * max(1.0, out.abs().max().item()))


# ---------------------------------------------------------------------------------------------------
# gradcheck of the fast form in fp64


def gradcheck_core(stride: int, window: int, plan: str) -> bool:
    """gradcheck of `qna_attention` in fp64 w.r.t. scores, values, biases and mixing weights, 2 queries, 2 heads."""
    torch.manual_seed(0)
    num_queries, heads, features = 2, 2, 4
    scores = torch.randn(1, 5, 4, num_queries * heads, dtype=torch.float64, requires_grad=True)
    values = torch.randn(1, 5, 4, features, dtype=torch.float64, requires_grad=True)
    rpe = torch.randn(num_queries, heads, window, window, dtype=torch.float64, requires_grad=True)
    mixing = torch.randn(num_queries, heads, window, window, dtype=torch.float64, requires_grad=True)
    return torch.autograd.gradcheck(
        lambda s, v, b, w: qna_attention(s, v, b, w, stride, plan=plan),
        (scores, values, rpe, mixing),
        eps=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize(("stride", "window"), [(1, 1), (1, 3), (2, 3), (1, 5), (2, 5)])
def test_gradcheck_core(stride: int, window: int, weight_grad_path: str) -> None:
    assert gradcheck_core(stride, window, weight_grad_path)


@pytest.mark.parametrize("window", [3, 5])
def test_gradcheck_core_on_fft_convolutions(window: int, every_fft_path: dict[str, int]) -> None:
    assert gradcheck_core(1, window, "fft")
    assert every_fft_path["forward"] and every_fft_path["backward"] and every_fft_path["kernel_grad"]


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_module(stride: int) -> None:
    module = make_qna(in_channels=3, features=4, heads=2, window=3, stride=stride, bias=True)
    names = [name for name, _ in module.named_parameters()]
    x = torch.randn(1, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return functional_call(module, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# The official algorithm and its parameter layout


def official_fused_kqna(
    params: dict[str, np.ndarray], x: np.ndarray, heads: int, window: int, stride: int
) -> torch.Tensor:
    """The official FusedKQnA forward, written out in torch (fp64) on the official parameter layout."""
    p = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in params.items()}
    x = torch.as_tensor(x, dtype=torch.float64)
    num_queries, features = p["query"].shape
    d = features // heads
    q = p["query"].reshape(num_queries, heads, d)
    q = q / (q.norm(dim=-1, keepdim=True) + 1e-6) / math.sqrt(d)
    wk = p["Wk"].reshape(-1, heads, d)
    cost = torch.einsum("byxc,cqh->byxqh", x, torch.einsum("qhd,chd->cqh", q, wk))
    if "Wk_b" in p:  # the key bias (use_bias=True): one constant per query and head
        cost = cost + torch.einsum("hd,qhd->qh", p["Wk_b"], q)
    v = x @ p["to_v/kernel"] + p["to_v/bias"]
    batch, height, width, _ = v.shape
    cost_exp = cost.exp()
    v_cost_exp = (cost_exp[..., None] * v.reshape(batch, height, width, 1, heads, d)).reshape(
        batch, height, width, -1
    )
    rpe_exp = p["rpe_bias"].reshape(window, window, 1, num_queries * heads).exp()
    scale = p["attn_scale_weights"].reshape(window, window, 1, num_queries * heads)
    padding = (window - 1) // 2

    def conv_nhwc_hwio(inp: torch.Tensor, kernel_hwio: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(
            inp.permute(0, 3, 1, 2),
            kernel_hwio.permute(3, 2, 0, 1),
            stride=stride,
            padding=padding,
            groups=inp.shape[-1],
        )
        return out.permute(0, 2, 3, 1)

    num = conv_nhwc_hwio(v_cost_exp, torch.repeat_interleave(rpe_exp * scale, d, dim=-1))
    den = conv_nhwc_hwio(cost_exp.reshape(batch, height, width, -1), rpe_exp)
    out_h, out_w = num.shape[1:3]
    z = num.reshape(batch, out_h, out_w, num_queries, heads, d) / den.reshape(
        batch, out_h, out_w, num_queries, heads, 1
    )
    z = z.sum(3).reshape(batch, out_h, out_w, features)
    return z @ p["to_out/kernel"] + p["to_out/bias"]


@pytest.mark.parametrize("stride", [1, 2])
def test_load_official_params_matches_official_algorithm(stride: int) -> None:
    rng = np.random.default_rng(0)
    c_in, features, heads, window, nq, f_out = 5, 12, 3, 3, 2, 7
    flat = {
        "query": rng.normal(size=(nq, features)),
        "Wk": rng.normal(size=(c_in, features)) * 0.5,
        "Wk_b": rng.normal(size=(heads, features // heads)),
        "to_v/kernel": rng.normal(size=(c_in, features)),
        "to_v/bias": rng.normal(size=(features,)),
        "rpe_bias": rng.normal(size=(window * window, nq * heads)),
        "attn_scale_weights": rng.normal(size=(1, 1, window * window, nq * heads)),
        "to_out/kernel": rng.normal(size=(features, f_out)),
        "to_out/bias": rng.normal(size=(f_out,)),
    }
    nested = {k: v for k, v in flat.items() if "/" not in k}
    nested["to_v"] = {"kernel": flat["to_v/kernel"], "bias": flat["to_v/bias"]}
    nested["to_out"] = {"kernel": flat["to_out/kernel"], "bias": flat["to_out/bias"]}
    module = QnA(
        c_in, features, heads, window=window, stride=stride, num_queries=nq, out_features=f_out, bias=True
    )
    module.double().load_official_params(nested)
    x = rng.normal(size=(2, 9, 8, c_in))
    expected = official_fused_kqna(flat, x, heads, window, stride)
    for impl in ("fast", "reference"):
        module.impl = impl
        with torch.no_grad():
            torch.testing.assert_close(module(torch.as_tensor(x)), expected, rtol=1e-10, atol=1e-10)


def test_load_official_params_rejects_wrong_shapes_and_biases() -> None:
    module = QnA(4, 8, 2, window=3)
    with pytest.raises(ValueError, match="query"):
        module.load_official_params({"query": np.zeros((3, 8))})
    with pytest.raises(ValueError, match="bias=False"):
        module.load_official_params({"to_v": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)}})


def test_initialisation_follows_official_code() -> None:
    torch.manual_seed(0)
    module = QnA(256, 256, 8, window=7, num_queries=4)
    assert module.query.shape == (4, 8, 32)
    assert module.key_weight.shape == (256, 8, 32)
    assert module.rpe_bias.shape == module.query_mixing.shape == (4, 8, 7, 7)
    assert module.value_proj.bias is None and module.out_proj.bias is None
    assert torch.count_nonzero(module.rpe_bias) == 0
    assert module.query_mixing.std().item() == pytest.approx(0.02, rel=0.1)
    # truncated at 2 sigma: the query keeps a std of 0.88 / sqrt(d), lecun_normal reaches 1 / sqrt(fan_in)
    assert module.query.std().item() == pytest.approx(0.8796 / math.sqrt(32), rel=0.1)
    assert module.query.abs().max().item() <= 2 / math.sqrt(32)
    assert module.key_weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert module.value_proj.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)


# ---------------------------------------------------------------------------------------------------
# Shapes, arguments, modes


@pytest.mark.parametrize("window", [1, 3, 5, 7])
@pytest.mark.parametrize("size", [(8, 8), (9, 7), (15, 4), (1, 2)])
def test_output_size_stride_2(size: tuple[int, int], window: int) -> None:
    module = QnA(4, 8, 2, window=window, stride=2, out_features=6)
    out = module(torch.randn(2, *size, 4))
    expected = tuple((n + 2 * ((window - 1) // 2) - window) // 2 + 1 for n in size)
    assert out.shape == (2, *expected, 6)
    assert tuple(qna_output_size(n, window, 2) for n in size) == expected
    assert out.is_contiguous()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"window": 4}, "window"),
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"stride": 3}, "stride"),
        ({"stride": 0}, "stride"),
        ({"heads": 3}, "heads"),
        ({"heads": 0}, "heads"),
        ({"num_queries": 0}, "num_queries"),
        ({"features": 0}, "features"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_features": 0}, "out_features"),
        ({"impl": "slow"}, "impl"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {"in_channels": 4, "features": 8, "heads": 2} | kwargs
    with pytest.raises(ValueError, match=rf"^{name}=") as info:
        QnA(**args)
    assert str(kwargs[name]) in str(info.value)


def test_bad_window_message() -> None:
    with pytest.raises(ValueError, match=r"window=4: QnA needs an odd window \(1, 3, 5, \.\.\.\)"):
        QnA(4, 8, 2, window=4)


@pytest.mark.parametrize(
    ("shape", "name"), [((4, 4, 4), "x.dim()"), ((1, 1, 4, 4, 4), "x.dim()"), ((1, 4, 4, 5), "x.shape[-1]")]
)
def test_bad_input_raises(shape: tuple[int, ...], name: str) -> None:
    module = QnA(4, 8, 2)
    with pytest.raises(ValueError, match=re.escape(name)):
        module(torch.randn(shape))


def test_bad_impl_attribute_raises_at_forward() -> None:
    module = QnA(4, 8, 2)
    module.impl = "fused"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="impl="):
        module(torch.randn(1, 4, 4, 4))


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_convolutions_run_channels_last(stride: int) -> None:
    """The (B, H, W, C) tensors reach the convolutions as channels_last (the fast CPU layout) and come
    back as contiguous (B, H', W', C) without a copy."""
    x = torch.randn(2, 9, 8, 16)
    kernel = torch.randn(16, 1, 5, 5)
    out = F.conv2d(x.permute(0, 3, 1, 2), kernel, stride=stride, padding=2, groups=16)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(out.shape).permute(0, 2, 3, 1)  # (B, H', W', C)
    grad_x = depthwise_conv_input_grad(grad_out, kernel, (9, 8), stride, 2)
    assert grad_x.shape == x.shape and grad_x.is_contiguous()
    x_nchw = x.permute(0, 3, 1, 2).requires_grad_()
    conv = F.conv2d(x_nchw, kernel, stride=stride, padding=2, groups=16)
    (expected,) = torch.autograd.grad(conv, x_nchw, grad_out.permute(0, 3, 1, 2))
    torch.testing.assert_close(grad_x, expected.permute(0, 2, 3, 1))


@pytest.mark.parametrize("plan", available_plans("cpu"))
def test_inference_mode_matches_grad_mode(plan: str) -> None:
    """With the plan forced (a tuned module may choose different plans for the two modes, forward and
    train being different keys): bit for bit, but for the fused loops, whose grad-mode forward sweeps z
    together with the query's share it keeps for the backward (two accumulator sets per block, another
    instantiation of the sweep), so z rounds differently: within fp32's rounding of the output there."""
    module = make_qna(torch.float32, in_channels=8, features=8, heads=2, window=5, stride=2, plan=plan)
    x = torch.randn(2, 11, 10, 8)
    with_graph = module(x)
    assert with_graph.grad_fn is not None
    with torch.inference_mode():
        inference = module(x)
    rounding = 2e-7 * inference.abs().max().item() if _PLANS[plan].uses_fused else 0.0
    torch.testing.assert_close(inference, with_graph.detach(), rtol=0, atol=rounding)


def test_functional_forms_agree_without_module() -> None:
    torch.manual_seed(0)
    scores, values = (
        torch.randn(2, 10, 9, 6, dtype=torch.float64),
        torch.randn(2, 10, 9, 12, dtype=torch.float64),
    )
    rpe, mixing = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for stride in (1, 2):
        torch.testing.assert_close(
            qna_attention(scores, values, rpe, mixing, stride),
            qna_attention_reference(scores, values, rpe, mixing, stride),
        )


# ---------------------------------------------------------------------------------------------------
# Compilers and devices


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    module = make_qna(torch.float32, in_channels=8, features=8, heads=2, window=3, stride=1)
    x = torch.randn(1, 6, 5, 8)
    grad_out = torch.randn(1, 6, 5, 8)
    out_eager, grads_eager = run_with_grads(module, x, "fast", grad_out)
    compiled = torch.compile(module)  # the underflow fallback (data-dependent) runs eagerly
    x = x.requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out_compiled = compiled(x)
    out_compiled.backward(grad_out)
    grads_compiled = {"x": x.grad} | {name: p.grad for name, p in module.named_parameters()}
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)
    for name, g in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype: torch.dtype, weight_grad_path: str) -> None:
    """The fast form in bf16 / fp16 (CPU here; the FFT kernel gradient works in fp32) against the fp32
    reference form."""
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for stride in (1, 2):
        module = make_qna(torch.float32, in_channels=16, features=16, heads=4, window=7, stride=stride)
        x = torch.randn(2, 15, 12, 16)
        out_ref, grads_ref = run_with_grads(module, x, "reference")
        half = QnA(16, 16, 4, window=7, stride=stride, plan=weight_grad_path).to(dtype)
        half.load_state_dict(module.state_dict())
        out, grads = run_with_grads(half, x.to(dtype), "fast")
        assert out.dtype == dtype
        assert_close_to_scale(out.float(), out_ref, tol, f"{dtype} output")
        for name, g in grads_ref.items():
            assert grads[name].dtype == dtype
            assert_close_to_scale(grads[name].float(), g, 2 * tol, f"{dtype} grad {name}")


def _cuda_half_case(dtype: torch.dtype, stride: int) -> None:
    module = make_qna(torch.float32, in_channels=16, features=16, heads=4, window=5, stride=stride).cuda()
    x = torch.randn(2, 21, 17, 16, device="cuda")
    out_ref, grads_ref = run_with_grads(module, x, "reference")
    half = QnA(16, 16, 4, window=5, stride=stride).to("cuda", dtype)
    half.load_state_dict(module.state_dict())
    out, grads = run_with_grads(half, x.to(dtype), "fast")
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert_close_to_scale(out.float(), out_ref, tol, f"{dtype} output")
    for name, g in grads_ref.items():
        assert grads[name].dtype == dtype
        assert_close_to_scale(grads[name].float(), g, tol * 2, f"{dtype} grad {name}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_matches_fp32_reference(dtype: torch.dtype, stride: int) -> None:
    _cuda_half_case(dtype, stride)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_large_logits_stay_finite() -> None:
    module = make_qna(torch.float16, in_channels=8, features=8, heads=2, window=3).cuda()
    x = with_large_logits(module, torch.randn(1, 12, 12, 8, device="cuda", dtype=torch.float16), 30.0)
    with torch.no_grad():
        assert torch.isinf(torch.exp(module.scores(x))).any()  # exp(12) > 65504 already
        out = module(x)
        module.float()
        expected = module(x.float())
    assert_close_to_scale(out.float(), expected, 3e-2, "fp16 output with large logits")


# ---------------------------------------------------------------------------------------------------
# FLOPs: the closed form counts what the fast form runs


def qna_counted_and_closed_form_flops(mode: str, window: int, stride: int, plan: str | None = None) -> tuple[int, int]:
    """FLOPs of one step of the registry's QnA (its plan forced, or tuned) by `FlopCounterMode` with the
    layer's formulas, and by `qna_flops` for the plan the step ran (`LayerSpec.closed_form_flops`)."""
    from qna_bench.measure.flops import count_flops
    from qna_bench.point import MeasureSettings
    from qna_bench.problem import Problem
    from qna_bench.registry import get_layer

    problem = Problem(batch=2, height=15, width=13, channels=16, heads=2, window=window, stride=stride, mode=mode)
    spec = get_layer("qna")
    module = spec.build(problem)
    module.plan = plan
    x = problem.make_input(spec.layout)
    spec.prepare(module, x, problem, MeasureSettings(threads=torch.get_num_threads()))  # the harness's order

    def step() -> None:
        out = module(x)
        if mode == "train":
            out.backward(problem.make_output_grad(out))

    counted = count_flops(step, spec.flop_formulas).flops
    if plan is not None:
        assert module.plan_choice.plan.name == plan
    return counted, spec.closed_form_flops(problem, module)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("window", [3, 7, 13])
def test_flop_counter_agrees_with_closed_form_in_train_mode_on_both_kernel_gradient_paths(
    window: int, stride: int, weight_grad_path: str
) -> None:
    """`FlopCounterMode` (with the layer's FFT formulas) within 2% of `qna_flops` on the direct and on
    the FFT kernel-gradient path."""
    counted, expected = qna_counted_and_closed_form_flops("train", window, stride, weight_grad_path)
    assert counted == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("window", [3, 7, 13])
def test_flop_counter_agrees_with_closed_form_in_forward_mode(window: int, stride: int) -> None:
    counted, expected = qna_counted_and_closed_form_flops("forward", window, stride)
    assert counted == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize(("forward", "backward"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("window", [3, 7, 13])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_flop_counter_agrees_with_closed_form_on_fft_convolutions(
    mode: str, window: int, forward: bool, backward: bool
) -> None:
    counted, expected = qna_counted_and_closed_form_flops(mode, window, 1, FFT_CONVOLUTION_PLANS[forward, backward])
    assert counted == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_padded_convolution_windows_stay_exact_and_counted(mode: str, stride: int) -> None:
    """Windows run through the zero-padded kernel of k + 2 (the plan "padded"): the fast form still
    equals the reference form, and the closed-form FLOPs count the padded convolutions."""
    for window in (3, 7):
        module = make_qna(in_channels=5, features=8, heads=2, window=window, stride=stride, plan="padded")
        compare_forms(module, torch.randn(2, 11, 8, 5, dtype=torch.float64), rtol=1e-10)
        counted, expected = qna_counted_and_closed_form_flops(mode, window, stride, "padded")
        assert counted == pytest.approx(expected, rel=0.02)
