"""The layer registry: name → how to build the layer for a `Problem`, and what it supports.

The CLI validates against it, the runner builds from it, and the correctness tests iterate over it.
Layers register themselves with `register_layer` when their module is imported; `qna_bench.layers`
(the QnA entries) and the `baselines` package (the peers) are imported on first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from qna_bench.labels import ROLES, Role
from qna_bench.problem import DEVICES, DTYPES, MODES, Layout, Problem

LayerFactory = Callable[[Problem], nn.Module]
FlopFormula = Callable[..., int]

_BUILTIN_MODULES = ("qna_bench.layers", "baselines", "qna_bench.models")


class UnsupportedProblem(Exception):
    """A layer cannot run this problem (a capability gap, not bad input): the point becomes an
    ``unsupported`` row carrying this message as its reason."""


@dataclass(frozen=True)
class LayerSpec:
    """What the harness needs to know about one registered layer."""

    name: str
    factory: LayerFactory
    role: Role
    # The peer family group (swin, neighborhood, sasa, halo, global; conv for baselines; qna for QnA).
    family: str
    implementation: str
    # "layer": a token mixer taking the problem's feature map; "model": a whole backbone taking images
    # (B, 3, size, size) through the same harness (problem.channels=3, window ignored).
    kind: Literal["layer", "model"] = "layer"
    layout: Layout = "nhwc"
    modes: tuple[str, ...] = MODES
    devices: tuple[str, ...] = DEVICES
    dtypes: tuple[str, ...] = tuple(DTYPES)
    odd_window: bool = False
    uses_window: bool = True
    window_within_map: bool = False
    # Cost (time and memory) never falls as the window grows, so after an `oom` or `timeout` at one window
    # the sweep records larger windows as `skipped`. False (e.g. Swin, whose padding to whole windows
    # makes some larger windows cheaper): every window runs.
    cost_grows_with_window: bool = False
    # The first call of each point compiles (torch.compile): it is a warm-up only, and the memory pass and
    # the one-call time come from a call after it (a compiling first call took 33 s for a 10 ms layer).
    compiles: bool = False
    description: str = ""
    # Invalid input beyond the generic checks: messages naming the field and what is allowed.
    constraints: Callable[[Problem], list[str]] | None = None
    # A capability gap for this problem (e.g. no backward on CPU): the reason, or None.
    unsupported: Callable[[Problem], str | None] | None = None
    # Layer-specific facts worth recording in every row (backend, fused-attention flag, ...).
    flags: Callable[[nn.Module, Problem], dict[str, Any]] | None = None
    # FLOP formulas for custom ops that FlopCounterMode cannot see (op overload packet → formula).
    flop_formulas: Mapping[Any, FlopFormula] = field(default_factory=dict)
    # The layer is one zero-padded k×k convolution: the roofline credits its useful work, the taps inside
    # the image, where FlopCounterMode counts all k² (oneDNN skips the padded taps on CPU).
    padded_convolution: bool = False
    # Independent closed-form FLOP count, kept as a cross-check of the counter.
    analytic_flops: Callable[[Problem], int] | None = None
    # Closed-form bytes one call moves at minimum (`qna_bench.measure.traffic`), for the roofline.
    analytic_bytes: Callable[[Problem], int] | None = None
    # Once per point, after the build and before the first call, outside every measurement:
    # ``prepare(module, x, problem, settings)`` lets a layer that chooses among its own paths choose
    # (QnA: its plan, under the ``tune`` setting), as cuDNN's benchmark mode does in its first call.
    prepare: Callable[[nn.Module, torch.Tensor, Problem, Any], None] | None = None
    # The axes of the layer's forms that its tuner chooses (`qna_bench.forms`): ``gemm`` for a layer of
    # pointwise products (nn.Linear, 1×1 convolutions), ``plan`` for QnA. A sweep with ``as_shipped``
    # measures such a layer as built beside its tuned form.
    forms: tuple[str, ...] = ()
    # Keyword arguments the closed forms take from the prepared module (QnA: the plan it chose), so
    # that they count what the layer runs: see `closed_form_flops`.
    cost_args: Callable[[nn.Module], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"layer {self.name}: role={self.role!r}; allowed values are {', '.join(ROLES)}")

    def input_errors(self, problem: Problem) -> list[str]:
        """Why this layer cannot be asked for this problem at all (bad input → exit 2)."""
        errors = []
        where = f"layer {self.name}"
        if self.odd_window and self.uses_window and problem.window % 2 == 0:
            errors.append(f"window={problem.window}: {where} needs an odd window (1, 3, 5, 7, ...)")
        if self.window_within_map and self.uses_window:
            reach = problem.dilation * (problem.window - 1) + 1
            if reach > min(problem.height, problem.width):
                errors.append(
                    f"window={problem.window}: {where} needs dilation*(window-1)+1={reach} "
                    f"<= min(problem.height, problem.width)={min(problem.height, problem.width)}"
                )
        if problem.dtype not in self.dtypes:
            errors.append(f"problem.dtype={problem.dtype}: {where} runs {', '.join(self.dtypes)}")
        if self.constraints is not None:
            errors.extend(self.constraints(problem))
        return errors

    def unsupported_reason(self, problem: Problem) -> str | None:
        """Why this layer cannot run this (valid) problem here, or None when it can."""
        if problem.mode not in self.modes:
            return f"{self.name} has no {problem.mode} mode"
        if problem.device not in self.devices:
            return f"{self.name} does not run on {problem.device}"
        if self.unsupported is not None:
            return self.unsupported(problem)
        return None

    def build(self, problem: Problem) -> nn.Module:
        """The layer for this problem, seeded, on the problem's device and dtype, in train/eval mode."""
        torch.manual_seed(problem.seed)
        module = self.factory(problem)
        module = module.to(device=problem.torch_device, dtype=problem.torch_dtype)
        module.train(problem.mode == "train")
        if problem.mode != "train":
            module.requires_grad_(False)
        return module

    def closed_form_flops(self, problem: Problem, module: nn.Module | None = None) -> int | None:
        """`analytic_flops` of ``problem`` for the paths ``module`` (built and prepared) chose."""
        if self.analytic_flops is None:
            return None
        return int(self.analytic_flops(problem, **self._cost_args(module)))

    def closed_form_bytes(self, problem: Problem, module: nn.Module | None = None) -> int | None:
        """`analytic_bytes` of ``problem`` for the paths ``module`` (built and prepared) chose."""
        if self.analytic_bytes is None:
            return None
        return int(self.analytic_bytes(problem, **self._cost_args(module)))

    def _cost_args(self, module: nn.Module | None) -> dict[str, Any]:
        return self.cost_args(module) if module is not None and self.cost_args is not None else {}

    def layer_flags(self, module: nn.Module, problem: Problem) -> dict[str, Any]:
        return dict(self.flags(module, problem)) if self.flags is not None else {}


_REGISTRY: dict[str, LayerSpec] = {}
_loaded = False


def register_layer(name: str, **spec: Any) -> Callable[[LayerFactory], LayerFactory]:
    """Decorator: register ``factory(problem) -> nn.Module`` under ``name`` with its `LayerSpec` fields."""

    def decorate(factory: LayerFactory) -> LayerFactory:
        if name in _REGISTRY:
            raise ValueError(f"layer {name!r} is registered twice")
        _REGISTRY[name] = LayerSpec(name=name, factory=factory, **spec)
        return factory

    return decorate


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def list_layers(family: str | None = None, kind: str | None = "layer") -> list[str]:
    """Registered names, by family and kind (``kind=None``: layers and models)."""
    _ensure_loaded()
    return [
        name
        for name, spec in _REGISTRY.items()
        if (family is None or spec.family == family) and (kind is None or spec.kind == kind)
    ]


def get_layer(name: str) -> LayerSpec:
    spec = find_layer(name)
    if spec is None:
        raise ValueError(f"layers: unknown layer {name!r}; known are {', '.join(_REGISTRY)} (or all)")
    return spec


def resolve_layers(names: list[str]) -> list[LayerSpec]:
    """Registry entries for a list of names; ``all`` expands to every registered layer (not the models)."""
    _ensure_loaded()
    if "all" in names:
        return [spec for spec in _REGISTRY.values() if spec.kind == "layer"]
    return [get_layer(name) for name in names]


def find_layer(name: str) -> LayerSpec | None:
    """The registered entry of ``name``, or None for a name the registry does not know. A name already
    registered is found without loading the others (a worker imports only its own layers' modules)."""
    if name not in _REGISTRY:
        _ensure_loaded()
    return _REGISTRY.get(name)


def role_of(name: str) -> str | None:
    """The declared role of a registered layer, or None for a name the registry does not know."""
    spec = find_layer(name)
    return spec.role if spec is not None else None


def describe_layers() -> str:
    """One line per registered layer: name, role, family, layout, modes, implementation; under it, the
    candidates of each axis of its forms that the tuner chooses among."""
    from qna_bench.forms import axis_candidates

    _ensure_loaded()
    width = max(len(name) for name in _REGISTRY)
    lines = []
    for spec in _REGISTRY.values():
        lines.append(f"{spec.name:<{width}}  {spec.role:<9} {spec.family:<12} {spec.layout}  "
                     f"{'/'.join(spec.modes):<13} {spec.implementation}")
        lines += [f"{'':<{width}}    forms: {axis} = {' | '.join(axis_candidates(axis))}" for axis in spec.forms]
    return "\n".join(lines)


if __name__ == "__main__":
    # Run as a script this file is `__main__`; the layers register into the imported module.
    from qna_bench.registry import describe_layers as describe_registered

    print(describe_registered())
