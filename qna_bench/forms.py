"""A layer's forms: the ways it can run the same mathematics, chosen per key by the one tuner
(`qna_bench.tuner`) for every layer, so that each side of a comparison runs at its best.

Axes of a form:
- ``gemm``: which library runs the layer's pointwise products (every ``nn.Linear`` and every 1×1
  ``nn.Conv2d``): ``linear`` is ``F.linear``, the BLAS GEMM (MKL's sgemm on x86 CPUs, cuBLAS on CUDA);
  ``conv1x1`` a 1×1 convolution on the channels-last view (oneDNN on CPU, cuDNN on CUDA). Applied to
  the built module by swapping those modules for `PointwiseProduct`s that hold the same parameters; the
  peer library's code is never edited.
- ``plan``: QnA's plans (`qna_bench.qna.plans`), which QnA chooses itself (with its ``gemm``, its
  projections) through the same tuner.
- the ``compile`` axis of a sweep (`qna_bench.compile_mode`): compiled forms are forms too, measured as
  rows of their own.

A layer declares its axes at registration (`LayerSpec.forms`). `prepare_forms` tunes a built layer's
``gemm`` before its first measured call: each form is proved equal to the layer as built (output, and in
train the gradients of the input and every parameter) before it is timed.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qna_bench import tuner
from qna_bench.measure.canary import canary_floor_seconds
from qna_bench.problem import Problem

Gemm = Literal["linear", "conv1x1"]
GEMM_FORMS: tuple[str, ...] = get_args(Gemm)
GEMM = "gemm"
PLAN = "plan"
FORM_AXES: tuple[str, ...] = (PLAN, GEMM)
CACHE_SUBDIR = "layer-forms"


def axis_candidates(axis: str) -> tuple[str, ...]:
    """The values an axis of a form can take (the ``plan``s of this machine's devices)."""
    if axis == GEMM:
        return GEMM_FORMS
    if axis == PLAN:
        from qna_bench.qna.plans import plan_names

        return tuple(plan_names())
    raise ValueError(f"form axis {axis!r}: the axes are {', '.join(FORM_AXES)}")


def gemm(x: Tensor, weight: Tensor, bias: Tensor | None, form: str) -> Tensor:
    """``x @ weight.T + bias`` over the last dimension of ``x`` (..., C), in ``form``.

    ``conv1x1`` views a (B, H, W, C) tensor as the channels-last (B, C, H, W) image it is, and any other
    as one near-square channels-last image of its rows (oneDNN picks a slow algorithm for a 1×L image)."""
    if form == "linear":
        return F.linear(x, weight, bias)
    if form != "conv1x1":
        raise ValueError(f"gemm={form!r}: the GEMM forms are {', '.join(GEMM_FORMS)}")
    out = F.conv2d(channels_last_image(x), weight[:, :, None, None], bias).permute(0, 2, 3, 1)
    return out.contiguous().reshape(*x.shape[:-1], weight.shape[0])  # no copy where oneDNN kept channels last


def channels_last_image(x: Tensor) -> Tensor:
    """``x`` (..., C) as a channels-last (N, C, H, W) image with the strides torch reads as channels last:
    a (B, H, W, C) tensor as itself, any other as one near-square image of its rows. (An image made by
    unsqueezing a 3-d view has an ambiguous batch stride; torch then ran oneDNN's NCHW path, with two
    copies: 2.4x slower than F.linear on fused Swin's windows, where this view is 1.3x faster.)"""
    if x.dim() == 4:
        return x.permute(0, 3, 1, 2)
    rows = x.reshape(-1, x.shape[-1])
    side = _near_square_side(rows.shape[0])
    return rows.view(1, side, rows.shape[0] // side, x.shape[-1]).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=64)
def _near_square_side(rows: int) -> int:
    """The largest divisor of ``rows`` not above its square root."""
    return next(d for d in range(math.isqrt(rows), 0, -1) if rows % d == 0)


def is_pointwise(module: nn.Module) -> bool:
    """An ``nn.Linear``, or an ``nn.Conv2d`` that is one: 1×1, stride 1, no padding, dilation 1, one group."""
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def shipped_gemm(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv1x1"


class PointwiseProduct(nn.Module):
    """An ``nn.Linear`` (channels last in and out) or a 1×1 ``nn.Conv2d`` (NCHW in and out) run in a
    chosen GEMM form, holding the original's parameters (the same tensors)."""

    def __init__(self, original: nn.Module, form: str):
        super().__init__()
        self.original = original
        self.weight = original.weight
        self.bias = original.bias
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.original, nn.Linear):
            return gemm(x, self.weight, self.bias, self.form)
        if self.form == "conv1x1":
            return F.conv2d(x, self.weight, self.bias)
        return gemm(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias, self.form).permute(0, 3, 1, 2)


def _owns_its_forms(module: nn.Module) -> bool:
    # A layer that chooses its own forms through the tuner (QnA: its plan, and its projections' GEMM).
    return callable(getattr(module, "form_choice", None))


def pointwise_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, pointwise module) for every pointwise product of ``module`` that no layer
    owning its forms (QnA) holds."""
    if _owns_its_forms(module):
        return
    for name, child in module.named_children():
        if isinstance(child, PointwiseProduct) or is_pointwise(child):
            yield module, name, child
        elif not _owns_its_forms(child):
            yield from pointwise_slots(child)


def has_pointwise(module: nn.Module) -> bool:
    return next(pointwise_slots(module), None) is not None


def set_gemm(module: nn.Module, form: str | None) -> None:
    """Run every pointwise product of ``module`` in ``form``; None: each as built (the originals back)."""
    for parent, name, child in list(pointwise_slots(module)):
        original = child.original if isinstance(child, PointwiseProduct) else child
        if form is None or form == shipped_gemm(original):
            setattr(parent, name, original)
        else:
            setattr(parent, name, PointwiseProduct(original, form))


def gemm_of(module: nn.Module) -> str | None:
    """The GEMM form ``module``'s pointwise products run: one name, ``mixed``, or None (none)."""
    forms = {child.form if isinstance(child, PointwiseProduct) else shipped_gemm(child)
             for _, _, child in pointwise_slots(module)}
    return None if not forms else forms.pop() if len(forms) == 1 else "mixed"


# --------------------------------------------------------------------------------------------------
# Choosing a layer's form


@dataclass(frozen=True)
class FormChoice:
    """The form a built layer runs, by axis, where it came from, and the tuner's record."""

    form: Mapping[str, str]
    source: tuner.FormSource
    tune_seconds: float = 0.0
    timings_s: tuple[tuple[str, float], ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def record(self) -> str:
        """The ``form`` column: the choices as sorted JSON."""
        return json.dumps(dict(self.form), sort_keys=True)


_CHOICE_ATTRIBUTE = "_bench_form_choice"


def form_key(
    code_version: str, problem: Problem, captured: Sequence[tuple[nn.Module, Tensor]], candidates: Sequence[str]
) -> dict[str, Any]:
    """Everything the speed of a GEMM form depends on: the code, the device with its instruction set,
    threads, torch version, dtype and mode, the candidate set, and each pointwise product the layer runs
    (its module, channels, bias, and its input's shape and strides). Not the layer's name nor its window:
    a form is proved and timed on the products alone, so layers whose products are the same (Swin's four
    paths at one window; a window-free attention at every window) share one tuning."""
    from qna_bench.qna.tuning import device_key

    products = [[type(module).__name__, module.weight.shape[1], module.weight.shape[0], module.bias is not None,
                 list(inputs.shape), list(inputs.stride())] for module, inputs in captured]
    return {"code_version": code_version, "device": device_key(problem.torch_device),
            "threads": torch.get_num_threads(), "torch_version": torch.__version__, "dtype": problem.dtype,
            "mode": problem.mode, "products": products, "candidates": list(candidates)}


def captured_products(module: nn.Module, x: Tensor) -> list[tuple[nn.Module, Tensor]]:
    """Each pointwise product of ``module`` with a copy of the input it gets in a forward call on ``x``."""
    captured: list[tuple[nn.Module, Tensor]] = []
    hooks = [child.register_forward_pre_hook(lambda m, args: captured.append((m, args[0].detach().clone())))
             for _, _, child in pointwise_slots(module)]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def products_in(
    form: str, captured: Sequence[tuple[nn.Module, Tensor]], train: bool
) -> Callable[[], list[Tensor | None]]:
    """One call of every captured product in ``form`` (forward, or forward and backward with a fixed
    upstream gradient), returning the outputs and in train the gradients of the inputs and parameters."""
    runs = [(module if form == shipped_gemm(module) else PointwiseProduct(module, form), inputs)
            for module, inputs in captured]
    leaves = [[inputs, *(p for p in (module.weight, module.bias) if p is not None)] for module, inputs in captured]
    upstream: list[Tensor] = []

    def call() -> list[Tensor | None]:
        if not train:
            with torch.no_grad():
                return [run(inputs) for run, inputs in runs]
        with torch.enable_grad():
            outputs = [run(inputs.requires_grad_()) for run, inputs in runs]
            if not upstream:
                generator = torch.Generator().manual_seed(0)
                upstream.extend(torch.randn(out.shape, generator=generator).to(out) for out in outputs)
            flat = [leaf for group in leaves for leaf in group]
            grads = torch.autograd.grad(outputs, flat, upstream, allow_unused=True)
        return [out.detach() for out in outputs] + list(grads)

    return call


def prepare_forms(
    module: nn.Module, x: Tensor, problem: Problem, code_version: str, tune: str,
    timer: tuner.Timer = tuner.time_call, canary: tuner.Canary | None = None,
) -> FormChoice:
    """Choose and apply ``module``'s GEMM form under ``tune`` (cached, always, off), before its first
    measured call; the choice is kept on the module (`choice_of`). ``canary``: None times the canary on the
    problem's device.

    A GEMM form changes the pointwise products alone, so they are what it is proved and timed on, as
    QnA's projections are: each product on the input it gets in one forward call of the layer (captured
    for the key, `form_key`), in every form, forward or forward and backward."""
    if tune not in tuner.TUNES:
        raise ValueError(f"tune={tune!r}: allowed values are {', '.join(tuner.TUNES)}")
    shipped = gemm_of(module)
    if shipped is None:
        return _keep(module, FormChoice({}, "default"))
    candidates = [shipped, *(f for f in GEMM_FORMS if f != shipped)]
    if tune == "off":
        return _keep(module, FormChoice({GEMM: shipped}, "default"))
    captured = captured_products(module, x)
    key = form_key(code_version, problem, captured, candidates)
    if tune == "cached":
        entry = tuner.read_choice(CACHE_SUBDIR, key)
        if entry is not None and entry.get("form", {}).get(GEMM) in candidates:
            form = entry["form"][GEMM]
            set_gemm(module, None if form == shipped else form)
            return _keep(module, FormChoice({GEMM: form}, "cache",
                                            timings_s=tuple(entry.get("timings_s", {}).items())))
    train = problem.mode == "train"
    device_key = key["device"]
    tuning = tuner.tune(
        [tuner.Candidate(form, products_in(form, captured, train), {GEMM: form}) for form in candidates],
        problem.torch_dtype, timer=timer, canary=canary or functools.partial(canary_floor_seconds, problem.torch_device),
        usual_canary_s=tuner.usual_canary(device_key, key["threads"]))
    del captured
    tuner.note_canary(device_key, key["threads"], tuning)
    set_gemm(module, None if tuning.winner == shipped else tuning.winner)
    choice = FormChoice({GEMM: tuning.winner}, "tuned", tuning.seconds, tuning.medians_s, tuning.refused)
    tuner.write_choice(CACHE_SUBDIR, key, {"form": dict(choice.form), "timings_s": dict(choice.timings_s),
                                           "refused": dict(choice.refused), "tune_s": choice.tune_seconds}, tuning.keep)
    return _keep(module, choice)


def _keep(module: nn.Module, choice: FormChoice) -> FormChoice:
    object.__setattr__(module, _CHOICE_ATTRIBUTE, choice)
    return choice


def choice_of(module: nn.Module) -> FormChoice | None:
    """The form ``module`` runs: its own choice (QnA's plan), else what `prepare_forms` chose, or None."""
    if _owns_its_forms(module):
        return module.form_choice()
    return getattr(module, _CHOICE_ATTRIBUTE, None)


def form_columns(module: nn.Module) -> dict[str, Any]:
    """A row's ``form`` (the choices by axis, as JSON), ``form_source`` and ``tune_s`` (the seconds its
    choices took to time: the layer's own and those of every layer inside it that chooses its own form)."""
    choice = choice_of(module) or FormChoice({}, "default")
    inner = [m.form_choice() for m in module.modules() if m is not module and _owns_its_forms(m)]
    seconds = choice.tune_seconds + sum(c.tune_seconds for c in inner if c is not None)
    return {"form": choice.record(), "form_source": choice.source, "tune_s": round(seconds, 4)}
