"""The QnA layer ("Learned Queries for Efficient Local Attention", arXiv 2112.11435) as a module.

`QnA` holds the parameters; its ``impl`` attribute picks the fast form (two depthwise convolutions
with a custom backward, `qna_attention`) or the naive reference form that unfolds every window
(`qna_attention_reference`, for tests). Both forms share the same parameters. The fast form runs the
plan its ``plan`` attribute forces, or the one its ``tune`` setting chooses per key
(`qna_bench.qna.tuning`); `QnA.plan_flags` says which ran.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

from qna_bench.forms import GEMM, PLAN, FormChoice
from qna_bench.qna.attention import qna_attention_packed, run_plan, wants_grad
from qna_bench.qna.core import work_dtype
from qna_bench.qna.fused_cpu import compile_flags, sweep_bytes
from qna_bench.qna.official import load_official_params
from qna_bench.qna.plans import Plan, get_plan, plan_names
from qna_bench.qna.projection import PROJECTIONS, Projection, project
from qna_bench.qna.reference import qna_attention_reference
from qna_bench.qna.shapes import STRIDES, qna_output_size
from qna_bench.qna.tuning import (
    TUNES,
    CallWith,
    PlanChoice,
    PlanKey,
    ProjectWith,
    Timer,
    Tune,
    choose_plan,
    plan_key,
    time_call,
)

Impl = Literal["fast", "reference"]
IMPLS: tuple[str, ...] = ("fast", "reference")

# The official query normalisation epsilon.
_QUERY_EPS = 1e-6


def _lecun_normal_(weight: Tensor, fan_in: int) -> Tensor:
    """Flax's default ``lecun_normal``: a normal truncated at +-2 sigma, rescaled to variance 1/fan_in."""
    # 0.8796... is the std of a standard normal truncated to [-2, 2].
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _leaf(t: Tensor | None) -> Tensor | None:
    """``t`` detached from its graph, collecting a gradient of its own (None stays None)."""
    return None if t is None else t.detach().requires_grad_()


class QnA(nn.Module):
    """QnA local attention with learned queries, on channels-last input (B, H, W, C_in) -> (B, H', W', F_out).

    Args:
        in_channels: C_in.
        features: F, the attention's width; split into ``heads`` heads of ``d = F / heads``.
        heads: number of heads h.
        window: odd window size k; windows are zero padded by ``(k - 1) / 2``.
        stride: 1, or 2 for the downsampling block; ``H' = qna_output_size(H, k, stride)``.
        num_queries: Nq learned queries, whose attention outputs are summed.
        out_features: F_out of the output projection (default F).
        normalize_queries: unit-normalise each query head before scaling by 1/sqrt(d) (the default).
        bias: biases on the value and output projections.
        impl: ``"fast"`` (depthwise convolutions, custom backward) or ``"reference"`` (unfolded windows).
            A plain attribute; switch it at any time, the parameters are shared.
        plan: force the fast form's plan by name (`available_plans`), or None to let ``tune`` choose.
        projections: force the form of the two projections (`qna_bench.qna.projection`), or None: the
            tuner's choice with a tuned plan, ``linear`` with a forced plan or ``tune="off"``.
        tune: ``"cached"`` (time the candidate plans on a key's first call unless the disk cache has
            its winner), ``"always"`` (time them for every new key) or ``"off"`` (`default_plan`, no
            timing). Plain attributes, as is ``timer`` (one timed call, `time_call`; tests stub it).

    Attributes:
        query (Nq, h, d), key_weight (C_in, h, d), value_proj (Linear C_in -> F),
        rpe_bias (Nq, h, k, k), query_mixing (Nq, h, k, k), out_proj (Linear F -> F_out), impl,
        plan, tune, timer; plan_choice (the last fast call's `PlanChoice`) and plan_fell_back.
    """

    def __init__(
        self,
        in_channels: int,
        features: int,
        heads: int,
        window: int = 3,
        stride: int = 1,
        num_queries: int = 2,
        out_features: int | None = None,
        normalize_queries: bool = True,
        bias: bool = False,
        impl: Impl = "fast",
        plan: str | None = None,
        tune: Tune = "cached",
        projections: Projection | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("features", features), ("heads", heads)):
            if value < 1:
                raise ValueError(f"{name}={value}: QnA needs a positive integer")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window={window}: QnA needs an odd window (1, 3, 5, ...)")
        if stride not in STRIDES:
            raise ValueError(f"stride={stride}: QnA supports stride 1 or 2")
        if features % heads != 0:
            raise ValueError(f"heads={heads}: must divide features={features}")
        if num_queries < 1:
            raise ValueError(f"num_queries={num_queries}: QnA needs at least 1 query")
        if out_features is not None and out_features < 1:
            raise ValueError(
                f"out_features={out_features}: QnA needs a positive integer (or None for features)"
            )
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r}: QnA's impl is one of {IMPLS}")
        if plan is not None and plan not in plan_names():
            raise ValueError(f"plan={plan!r}: QnA's plans are {', '.join(plan_names())} (or None: tuned)")
        if tune not in TUNES:
            raise ValueError(f"tune={tune!r}: QnA's tune is one of {', '.join(TUNES)}")
        if projections is not None and projections not in PROJECTIONS:
            raise ValueError(f"projections={projections!r}: QnA's projection forms are {', '.join(PROJECTIONS)} "
                             "(or None: tuned)")
        self.in_channels = in_channels
        self.features = features
        self.heads = heads
        self.head_dim = features // heads
        self.window = window
        self.stride = stride
        self.padding = (window - 1) // 2
        self.num_queries = num_queries
        self.out_features = features if out_features is None else out_features
        self.normalize_queries = normalize_queries
        self.impl: Impl = impl
        self.plan = plan
        self.tune: Tune = tune
        self.projections = projections
        self.timer: Timer = time_call
        # The canary timed around a tuning (None: the real one, `qna_bench.measure.canary`); tests stub it.
        self.canary: Callable[[], float] | None = None
        self.plan_choice: PlanChoice | None = None
        self._fell_back: Tensor | bool = False  # the last fast call's flag, read by `plan_fell_back`
        self._choices: dict[tuple[PlanKey, str | None, str], PlanChoice] = {}

        self.query = nn.Parameter(torch.empty(num_queries, heads, self.head_dim))
        self.key_weight = nn.Parameter(torch.empty(in_channels, heads, self.head_dim))
        self.value_proj = nn.Linear(in_channels, features, bias=bias)
        self.rpe_bias = nn.Parameter(torch.empty(num_queries, heads, window, window))
        self.query_mixing = nn.Parameter(torch.empty(num_queries, heads, window, window))
        self.out_proj = nn.Linear(features, self.out_features, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (Flax ``FusedKQnA`` defaults)."""
        query_std = math.sqrt(1.0 / self.head_dim)
        nn.init.trunc_normal_(self.query, std=query_std, a=-2 * query_std, b=2 * query_std)
        _lecun_normal_(self.key_weight, fan_in=self.in_channels)
        _lecun_normal_(self.value_proj.weight, fan_in=self.in_channels)
        _lecun_normal_(self.out_proj.weight, fan_in=self.features)
        for linear in (self.value_proj, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.rpe_bias)
        nn.init.normal_(self.query_mixing, std=0.02)

    def scaled_queries(self) -> Tensor:
        """``q / (||q|| + 1e-6) / sqrt(d)`` per query and head (without the norm if not normalize_queries)."""
        q = self.query
        if self.normalize_queries:
            q = q / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + _QUERY_EPS)
        return q / math.sqrt(self.head_dim)

    def key_queries(self) -> Tensor:
        """``W_k q_n`` per query and head, (Nq*h, C_in), row ``n*h + head``: the scores are ``x @ this.T``."""
        return torch.einsum("chd,nhd->nhc", self.key_weight, self.scaled_queries()).flatten(0, 1)

    def scores(self, x: Tensor) -> Tensor:
        """Logits ``x . (W_k q_n)`` (B, H, W, Nq*h), channel ``n*h + head``; the keys are never built."""
        return F.linear(x, self.key_queries().to(x.dtype))

    def _packed_projection(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The weight and bias of the values and scores as one projection (F + Nq*h outputs)."""
        weight = torch.cat([self.value_proj.weight, self.key_queries()]).to(dtype)
        bias = self.value_proj.bias
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(self.num_queries * self.heads)]).to(dtype)
        return weight, bias

    def _values_and_scores(self, x: Tensor, form: Projection = "linear") -> Tensor:
        """Values and scores from one matmul in ``form``, packed as (B, H, W, F + Nq*h)."""
        return project(x, *self._packed_projection(x.dtype), form)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"x.dim()={x.dim()}: QnA needs a channels-last (B, H, W, C) input")
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x.shape[-1]={x.shape[-1]}: QnA was built for in_channels={self.in_channels} (input is (B, H, W, C))"
            )

    @torch.compiler.disable  # Python bookkeeping on shapes, run eagerly under torch.compile
    def _choose(self, x: Tensor, train: bool) -> PlanChoice:
        """The plan of this call's key: forced, chosen earlier by this module, or from `choose_plan`;
        with the projections' form ``projections`` forces."""
        choice = self._chosen_plan(x, train)
        if self.projections is None or self.projections == choice.plan.projections:
            return choice
        return dataclasses.replace(choice, plan=dataclasses.replace(choice.plan, projections=self.projections))

    def _chosen_plan(self, x: Tensor, train: bool) -> PlanChoice:
        if self.plan is not None:
            return PlanChoice(get_plan(self.plan, x.device).resolved(self.stride, train), train, "forced")
        key = plan_key(x, self.features, self.heads, self.num_queries, self.window, self.stride, train,
                       bias=self.value_proj.bias is not None)
        remembered = self._choices.get((key, self.plan, self.tune))
        if remembered is None:
            # The candidates' calls are the tuner's work, not the layer's: a FLOP counter or any other
            # dispatch mode around the call that tunes never sees them.
            with _disable_current_modes():
                with torch.no_grad():
                    packed = self._values_and_scores(x)
                remembered = choose_plan(
                    key, x.device, self.stride, train, self.tune, self._timed_call(packed), self.timer,
                    self._timed_projections(x.detach(), packed.shape[:3]), self.canary,
                )
            self._choices[(key, self.plan, self.tune)] = remembered
        return remembered

    def _timed_call(self, packed: Tensor) -> CallWith:
        """``call_with(plan, train)``: one call of the core on copies of this call's inputs, forward only
        or forward and backward (with a fixed random output gradient); it returns the output, and in
        train the gradients of the packed input and the two kernels, for the tuner to check."""
        params = [p.detach().requires_grad_(p.requires_grad) for p in (self.rpe_bias, self.query_mixing)]
        grads: list[Tensor] = []

        def call_with(plan: Plan, train: bool) -> Callable[[], list[Tensor | None]]:
            def call() -> list[Tensor | None]:
                if not train:
                    with torch.no_grad():
                        return [qna_attention_packed(packed, *params, self.stride, plan)[0]]
                with torch.enable_grad():
                    leaf = packed.requires_grad_()
                    z, _ = qna_attention_packed(leaf, *params, self.stride, plan)
                    if not grads:
                        grads.append(torch.randn_like(z))
                    z.backward(grads[0])
                outputs = [z.detach(), *(t.grad for t in (leaf, *params))]
                for t in (leaf, *params):
                    t.grad = None
                return outputs

            return call

        return call_with

    def _timed_projections(self, x: Tensor, size: torch.Size) -> ProjectWith:
        """``project_with(form, train)``: one call of both projections in ``form``, on a copy of ``x`` and
        on an attention output of this call's shape, forward only or forward and backward."""
        height, width = (qna_output_size(n, self.window, self.stride) for n in size[1:])
        z = x.new_empty(size[0], height, width, self.features).normal_()
        with torch.no_grad():
            in_weight, in_bias = self._packed_projection(x.dtype)
            out_bias = None if self.out_proj.bias is None else self.out_proj.bias.to(x.dtype)
            calls = [tuple(_leaf(t) for t in (x, in_weight, in_bias)),
                     tuple(_leaf(t) for t in (z, self.out_proj.weight.to(x.dtype), out_bias))]
        leaves = [t for call in calls for t in call if t is not None]

        def project_with(form: Projection, train: bool) -> Callable[[], list[Tensor | None]]:
            def call() -> list[Tensor | None]:
                with torch.set_grad_enabled(train):
                    outputs = [project(inputs, weight, bias, form) for inputs, weight, bias in calls]
                    if train:
                        torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])
                grads = [leaf.grad for leaf in leaves]
                for leaf in leaves:
                    leaf.grad = None
                return [out.detach() for out in outputs] + grads

            return call

        return project_with

    @torch.no_grad()
    def choose_plan(self, x: Tensor, train: bool) -> PlanChoice:
        """Choose (timing candidates where ``tune`` says so) the fast form's plan for calls on inputs like
        ``x``, in train (forward and backward) or forward mode, before the first of them: the harness
        calls this outside any measured call. Without it the first call of a key chooses."""
        self._check_input(x)
        self.plan_choice = self._choose(x, train)
        return self.plan_choice

    def form_choice(self) -> FormChoice | None:
        """The form the fast form runs (`qna_bench.forms`): its plan and its projections' GEMM, with where
        they came from; None for the reference form or before any choice."""
        choice = self.plan_choice
        if self.impl != "fast" or choice is None:
            return None
        return FormChoice({PLAN: choice.plan.name, GEMM: choice.plan.projections}, choice.source,
                          choice.tune_seconds, choice.timings_s, choice.refused)

    @property
    def plan_fell_back(self) -> bool:
        """Whether the last fast call's data made its plan's FFT passes give way to direct ones."""
        return bool(self._fell_back)

    def plan_flags(self) -> dict[str, Any]:
        """What the fast form runs, for a row's ``layer_flags``: ``plan`` (the form of each pass that
        runs), ``plan_name``, ``plan_source`` (tuned, cache, default or forced), ``tune_seconds`` (spent
        timing candidates for this key) and ``plan_fell_back`` (the last call's data made its FFT passes
        give way to direct ones). Empty for the reference form or before any choice."""
        choice = self.plan_choice
        if self.impl != "fast" or choice is None:
            return {}
        return {
            "plan": choice.plan.record(choice.train),
            "plan_name": choice.plan.name,
            "plan_source": choice.source,
            "tune_seconds": round(choice.tune_seconds, 4),
            "plan_fell_back": self.plan_fell_back,
            **({"fused_build": f"{compile_flags()}; {self._fused_sweep_bytes(choice.plan)}-byte vectors"}
               if choice.plan.uses_fused else {}),
        }

    def _fused_sweep_bytes(self, plan: Plan) -> int:
        """The width of the vectors the fused loops sweep this layer's channels in under ``plan``."""
        return sweep_bytes(self.features, self.heads, work_dtype(self.query.dtype), plan.fused_vector_bytes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C_in) -> (B, H', W', F_out) with the form ``self.impl`` names."""
        self._check_input(x)
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r}: QnA's impl is one of {IMPLS}")
        if self.impl == "fast":
            core_inputs = (x, self.query, self.key_weight, self.value_proj.weight, self.value_proj.bias,
                           self.rpe_bias, self.query_mixing)
            train = wants_grad(*(t for t in core_inputs if t is not None))
            choice = self.plan_choice
            # Under torch.compile a plan chosen before the trace (`choose_plan`, or an eager call) is
            # used as is: choosing times candidates, which a trace cannot hold (a graph break instead).
            if not (torch.compiler.is_compiling() and choice is not None and choice.train == train):
                choice = self.plan_choice = self._choose(x, train)
            packed = self._values_and_scores(x, choice.plan.projections)
            z, self._fell_back = run_plan(packed, self.rpe_bias, self.query_mixing, self.stride, choice)
            return project(z, self.out_proj.weight, self.out_proj.bias, choice.plan.projections)
        z = qna_attention_reference(
            self.scores(x), self.value_proj(x), self.rpe_bias, self.query_mixing, self.stride
        )
        return self.out_proj(z)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, features={self.features}, heads={self.heads}, "
            f"window={self.window}, stride={self.stride}, num_queries={self.num_queries}, "
            f"out_features={self.out_features}, normalize_queries={self.normalize_queries}, impl={self.impl!r}, "
            f"plan={self.plan!r}, tune={self.tune!r}, projections={self.projections!r}"
        )

    def load_official_params(self, params: Mapping[str, Any]) -> None:
        """Copy the parameters of an official Flax ``FusedKQnA`` into this module
        (`qna_bench.qna.official.load_official_params`)."""
        load_official_params(self, params)
