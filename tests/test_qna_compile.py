"""QnA under torch.compile: its forward and train step trace whole (no graph break), and the compiled
form computes what the eager form does, gradients and the underflowed windows included."""

from __future__ import annotations

import pytest
import torch

from qna_bench.qna import QnA, available_plans
from qna_bench.qna.attention import _fast_core_backward_op, _fast_core_op
from qna_bench.qna.plans import get_plan
from tests.test_qna import make_qna, split_image


def prepared(plan: str | None, train: bool, dtype: torch.dtype = torch.float64, **kwargs: object) -> tuple[QnA, torch.Tensor]:
    """A QnA and an input, its plan chosen before any trace (as the harness's prepare step does)."""
    module = make_qna(dtype, in_channels=8, features=8, heads=2, window=5, plan=plan, tune="off", **kwargs)
    module.train(train)
    x = torch.randn(2, 11, 10, 8, dtype=dtype, requires_grad=train)
    module.choose_plan(x, train)
    return module, x


@pytest.mark.parametrize("train", [False, True], ids=["forward", "train"])
@pytest.mark.parametrize(("plan", "stride"), [(None, 2), ("fft", 1)])
def test_qna_compiles_without_a_graph_break(plan: str | None, train: bool, stride: int) -> None:
    module, x = prepared(plan, train, stride=stride)
    torch._dynamo.reset()
    with torch.set_grad_enabled(train):
        explained = torch._dynamo.explain(module)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def outputs_and_grads(module: QnA, x: torch.Tensor) -> list[torch.Tensor]:
    out = module(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = [x, *module.parameters()]
    return [out, *torch.autograd.grad(out, params, grad_out)]


FUSED = [("fused", "linear")] if "fused" in available_plans("cpu") else []


@pytest.mark.parametrize(("plan", "projections"), [("direct", "linear"), ("fft", "linear"), ("direct", "conv1x1"), *FUSED])
@pytest.mark.parametrize("spread", [0.0, 150.0], ids=["normal", "underflowing"])
def test_compiled_qna_matches_eager_with_gradients(plan: str, projections: str, spread: float) -> None:
    """Through AOTAutograd (the custom ops' fake kernels and autograd formulas), fp32: a spread of 150
    underflows half the image's windows, which are recomputed with their own max, gradients included."""
    module, x = prepared(plan, True, torch.float32, projections=projections)
    x = split_image(x.detach(), module, spread).requires_grad_()
    eager = outputs_and_grads(module, x)
    torch._dynamo.reset()
    compiled_module = torch.compile(module, backend="aot_eager", fullgraph=True)
    compiled = outputs_and_grads(compiled_module, x)
    for want, got in zip(eager, compiled, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_qna_forward_and_train() -> None:
    """The default backend end to end on a small problem: forward, then a train step."""
    module, x = prepared("direct", True, torch.float32)
    eager = outputs_and_grads(module, x)
    torch._dynamo.reset()
    compiled = outputs_and_grads(torch.compile(module, fullgraph=True), x)
    for want, got in zip(eager, compiled, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("plan", ["fft", *(plan for plan, _ in FUSED)])
def test_the_core_ops_pass_torch_library_opcheck(plan: str) -> None:
    """Schema, fake kernels and autograd registration agree with the real kernels (`torch.library.opcheck`);
    the compiled graph runs them below the lazy-conjugation dispatch key, so the FFT passes conjugate
    physically (a lazy ``.conj()`` there was silently ignored). On the FFT plan: the direct plan's passes
    run through the same ops in the compiled-against-eager tests. The fused plan's forward keeps the
    queries' shares of z for its backward (a sixth output that the other plans leave empty)."""
    module, x = prepared(plan, True)
    packed = module._values_and_scores(x).detach()
    spec = get_plan(plan, "cpu").resolved(1, True).spec()
    args = (packed.requires_grad_(), module.rpe_bias.detach().requires_grad_(),
            module.query_mixing.detach().requires_grad_(), 1, spec)
    torch.library.opcheck(_fast_core_op, args)
    z, exp_scores, den, underflow, fell_back, shares = _fast_core_op(*args)
    backward_args = (torch.randn_like(z), *(a.detach() for a in args[:3]), exp_scores.detach(), den.detach(),
                     underflow, fell_back, z.detach(), shares.detach(), 1, spec, True)
    torch.library.opcheck(_fast_core_backward_op, backward_args)


def test_the_triton_ops_fake_kernels_give_the_real_outputs_layouts() -> None:
    """What torch.compile sees of the Triton core (`qna_bench::triton_forward` / `triton_backward`) without
    running it: z in the inputs' promoted dtype, the statistics in fp32 (fp64 for fp64), gradients like
    their inputs. The interpreter's tests run the ops themselves (opcheck, graph breaks)."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qna_bench.qna.triton_core import triton_backward, triton_forward

    for dtype, stats_dtype in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        with FakeTensorMode():
            scores, values = torch.empty(3, 9, 11, 4, dtype=dtype), torch.empty(3, 9, 11, 8, dtype=dtype)
            bias, mixing = torch.empty(2, 2, 5, 5, dtype=dtype), torch.empty(2, 2, 5, 5, dtype=dtype)
            z, stats = triton_forward(scores, values, bias, mixing, 2)
            grads = triton_backward(torch.empty_like(z), scores, values, bias, mixing, stats, 2)
            assert (z.shape, z.dtype) == ((3, 5, 6, 8), dtype)
            assert (stats.shape, stats.dtype) == ((2, 3, 5, 6, 4), stats_dtype)
            for grad, like in zip(grads, (scores, values, bias, mixing), strict=True):
                assert (grad.shape, grad.dtype) == (like.shape, like.dtype)
