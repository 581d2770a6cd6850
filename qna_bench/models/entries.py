"""Registry entries for whole backbones (``kind="model"``): QnA-ViT tiny (3×3 and 7×7 QnA windows),
timm's Swin-T and ConvNeXt-T, and NAT-Tiny on natten. Random initialisation, 1000 classes.

A model's problem is a batch of images: ``problem.channels`` must be 3 and ``height``/``width`` are the
image size (224 for the published numbers); ``heads`` and ``window`` are ignored.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import DropPath, use_fused_attn
from torch import nn
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from qna_bench.layers import QNA_FLOP_FORMULAS
from qna_bench.models.nat import CPU_BACKWARD_REASON, NAT, NAT_TINY, nat_macs
from qna_bench.models.qna_vit import (
    QNA_VIT_TINY,
    QNA_VIT_TINY_7X7,
    QnAViT,
    QnAViTConfig,
    image_errors,
    qna_vit_macs,
)
from qna_bench.problem import Problem
from qna_bench.qna import QnA
from qna_bench.registry import Role, register_layer

NUM_CLASSES = 1000
IMAGE_CHANNELS = 3
# Four stages after a stride-4 stem, three of them halving: the last map is 1/32 of the image.
IMAGE_MULTIPLE = 32


def image_constraints(problem: Problem, name: str) -> list[str]:
    """What every backbone needs of its problem: RGB images whose sides divide by 32."""
    errors = []
    if problem.channels != IMAGE_CHANNELS:
        errors.append(
            f"problem.channels={problem.channels}: model {name} takes RGB images, set problem.channels=3"
        )
    for field in ("height", "width"):
        size = getattr(problem, field)
        if size % IMAGE_MULTIPLE:
            errors.append(
                f"problem.{field}={size}: model {name} needs an image side divisible by {IMAGE_MULTIPLE} (e.g. 224)"
            )
    return errors


def _train_factor(problem: Problem) -> int:
    """The usual 3× forward for forward + backward (input and weight gradients of every product)."""
    return 3 if problem.mode == "train" else 1


# torch 2.14 has FLOP formulas for the CUDA SDPA kernels only; on CPU SDPA may run the flash kernel
# below, which FlopCounterMode would count as zero. Used when timm's fused attention is switched on.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}

_MODEL = dict(kind="model", family="model", layout="nchw", uses_window=False)

# Every model is measured with the same regularisation: none. timm's Swin-T defaults to stochastic
# depth (drop_path_rate=0.1), active in every train-mode point; ConvNeXt-T,
# QnA-ViT and NAT have none.
NO_REGULARISATION = {"drop_rate": 0.0, "drop_path_rate": 0.0}


def regularisation(module: nn.Module) -> dict[str, float]:
    """The largest stochastic-depth and dropout probabilities in ``module``, read from the built model."""
    drop_path = [float(m.drop_prob) for m in module.modules() if isinstance(m, DropPath)]
    dropouts = nn.modules.dropout._DropoutNd  # the base of every nn.Dropout*
    dropout = [float(m.p) for m in module.modules() if isinstance(m, dropouts)]
    return {"drop_path_rate": max(drop_path, default=0.0), "dropout": max(dropout, default=0.0)}


# --------------------------------------------------------------------------------------------------
# QnA-ViT


def prepare_qna_layers(module: nn.Module, x: torch.Tensor, problem: Problem, settings: Any) -> None:
    """Every QnA layer of a model chooses its plan under ``tune`` in one untimed call (forward, or
    forward and backward in train mode) before the model's first measured call."""
    for layer in module.modules():
        if isinstance(layer, QnA):
            layer.tune = settings.tune
    if problem.mode != "train":
        with torch.inference_mode():
            module(x)
        return
    out = module(x)
    out.backward(torch.zeros_like(out))
    for t in (x, *module.parameters()):
        t.grad = None


def qna_plan_flags(module: nn.Module) -> dict[str, Any]:
    """The plans a model's QnA layers chose: layers per plan name and source, and the tuning seconds."""
    plans: dict[str, int] = {}
    seconds = 0.0
    for layer in module.modules():
        flags = layer.plan_flags() if isinstance(layer, QnA) else {}
        if flags:
            name = f"{flags['plan_name']} ({flags['plan_source']})"
            plans[name] = plans.get(name, 0) + 1
            seconds += flags["tune_seconds"]
    return {"qna_plans": dict(sorted(plans.items())), "tune_seconds": round(seconds, 4)}


def _qna_vit_entry(name: str, config: QnAViTConfig, description: str) -> None:
    def constraints(problem: Problem) -> list[str]:
        errors = image_constraints(problem, name)
        if not errors:
            errors = [
                f"problem.height={problem.height}, problem.width={problem.width}: model {name}: {e} "
                "(each window-attention map must be at most its window or a multiple of it; 224 works)"
                for e in image_errors(config, problem.height, problem.width)
            ]
        return errors

    def flags(module: nn.Module, problem: Problem) -> dict[str, Any]:
        return {
            "qna_impl": "fast",
            "qna_window": list(config.qna_window),
            "lsa_window": list(config.lsa_window),
            "lsa_fused_attn": use_fused_attn(experimental=True),
            "init": "random",
            **regularisation(module),
            **qna_plan_flags(module),
        }

    def analytic(problem: Problem) -> int:
        macs = qna_vit_macs(config, problem.height, problem.width, NUM_CLASSES)
        return 2 * macs * problem.batch * _train_factor(problem)

    def build(problem: Problem) -> nn.Module:
        # The window attention follows timm's switch for Swin (TIMM_FUSED_ATTN), so both compare alike.
        return QnAViT(config, NUM_CLASSES, fused_attention=use_fused_attn(experimental=True))

    register_layer(
        name,
        role="subject",
        forms=("plan", "gemm"),
        implementation="qna_bench.models.qna_vit.QnAViT: qna_bench.qna.QnA (fast) + window self-attention",
        description=description,
        constraints=constraints,
        flags=flags,
        # its QnA layers' FFTs and fused loops, which the counter cannot see, as the layer `qna` counts them
        flop_formulas={**CPU_SDPA_FLOP_FORMULAS, **QNA_FLOP_FORMULAS},
        analytic_flops=analytic,
        prepare=prepare_qna_layers,
        **_MODEL,
    )(build)


_qna_vit_entry(
    "qna_vit_tiny",
    QNA_VIT_TINY,
    "QnA-ViT tiny (official layout, 3×3 QnA): published 16M params, 2.5 GMACs at 224²",
)
_qna_vit_entry(
    "qna_vit_tiny_7x7",
    QNA_VIT_TINY_7X7,
    "QnA-ViT tiny with 7×7 QnA windows (official qna_vit_tiny_7x7)",
)


# --------------------------------------------------------------------------------------------------
# timm peers


def _timm_entry(
    name: str, timm_name: str, description: str, image_size_arg: bool, attention: bool, role: Role
) -> None:
    def build(problem: Problem) -> nn.Module:
        kwargs: dict[str, Any] = {"num_classes": NUM_CLASSES, **NO_REGULARISATION}
        if image_size_arg:
            kwargs["img_size"] = (problem.height, problem.width)
        return timm.create_model(timm_name, pretrained=False, **kwargs)

    def flags(module: nn.Module, problem: Problem) -> dict[str, Any]:
        out: dict[str, Any] = {"timm_model": timm_name, "init": "random", **regularisation(module)}
        fused = [m.fused_attn for m in module.modules() if hasattr(m, "fused_attn")]
        if fused:
            out["timm_fused_attn"] = bool(fused[0])
        return out

    register_layer(
        name,
        role=role,
        forms=("gemm",),
        implementation=f"timm.create_model({timm_name!r}, pretrained=False, drop_rate=0, drop_path_rate=0)",
        description=description,
        constraints=lambda problem: image_constraints(problem, name),
        flags=flags,
        flop_formulas=CPU_SDPA_FLOP_FORMULAS if attention else {},
        **_MODEL,
    )(build)


_timm_entry(
    "swin_tiny",
    "swin_tiny_patch4_window7_224",
    "Swin-T from timm (shifted 7×7 windows): published 28.3M params, 4.5 GMACs at 224²",
    image_size_arg=True,
    attention=True,
    role="peer",
)
_timm_entry(
    "convnext_tiny",
    "convnext_tiny",
    "ConvNeXt-T from timm (7×7 depthwise convolutions): published 28.6M params, 4.5 GMACs at 224²",
    image_size_arg=False,
    attention=False,
    role="baseline",
)


# --------------------------------------------------------------------------------------------------
# NAT


def _nat_unsupported(problem: Problem) -> str | None:
    if problem.mode == "train" and problem.device == "cpu":
        return CPU_BACKWARD_REASON
    return None


def _nat_flags(module: nn.Module, problem: Problem) -> dict[str, Any]:
    probe = torch.empty(problem.batch, problem.height // 4, problem.width // 4, NAT_TINY.dim, device=problem.device)
    dense = nat_macs(NAT_TINY, problem.height, problem.width, NUM_CLASSES, dense_attention=True)
    return {
        "natten_backend": module.first_mixer().backend(probe),
        "relative_position_bias": False,
        "flops_analytic_attention": "k^2 neighbours per token (NAT paper convention)",
        "flops_executed_dense_attention": 2 * dense * problem.batch * _train_factor(problem),
        "init": "random",
        **regularisation(module),
    }


def _nat_flops(problem: Problem) -> int:
    return 2 * nat_macs(NAT_TINY, problem.height, problem.width, NUM_CLASSES) * problem.batch * _train_factor(problem)


def _build_nat(problem: Problem) -> nn.Module:
    return NAT(NAT_TINY, NUM_CLASSES)


register_layer(
    "nat_tiny",
    role="peer",
    forms=("gemm",),
    implementation="qna_bench.models.nat.NAT: natten.NeighborhoodAttention2D (flex-fna eager on CPU)",
    description=(
        "NAT-Tiny on natten (7×7 neighbourhoods, no rpb in natten 0.21): published 28M params, 4.3 GMACs; "
        "FlopCounterMode cannot see flex attention, FLOPs are analytic (k² neighbours); forward only on CPU"
    ),
    constraints=lambda problem: image_constraints(problem, "nat_tiny"),
    unsupported=_nat_unsupported,
    flags=_nat_flags,
    analytic_flops=_nat_flops,
    **_MODEL,
)(_build_nat)

MODEL_NAMES: tuple[str, ...] = ("qna_vit_tiny", "qna_vit_tiny_7x7", "swin_tiny", "convnext_tiny", "nat_tiny")
