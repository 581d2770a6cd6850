"""The model-level entries: QnA-ViT tiny (3×3, 7×7), Swin-T, ConvNeXt-T and NAT-Tiny.

Parameters and multiply-adds at 224² against the published figures (FLOPs counted with
`FlopCounterMode` on one forward, divided by 2; NAT's analytically, as the counter cannot see flex
attention), the official QnA-ViT layout, and a forward / train step of each on small images.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from timm.layers import DropPath

import qna_bench.models  # noqa: F401  (registers the models)
from qna_bench.environment import read_environment
from qna_bench.measure.flops import count_flops
from qna_bench.measure.params import count_parameters
from qna_bench.models.nat import NAT_TINY, nat_macs
from qna_bench.models.qna_vit import (
    QNA_VIT_TINY,
    QNA_VIT_TINY_7X7,
    QnAViT,
    StridedSkip,
    WindowSelfAttention,
    WindowStage,
    qna_vit_macs,
)
from qna_bench.problem import Problem
from qna_bench.qna import QnA
from qna_bench.registry import get_layer, list_layers
from qna_bench.runner import MeasureSettings, SweepPoint, run_point

MODELS = ("qna_vit_tiny", "qna_vit_tiny_7x7", "swin_tiny", "convnext_tiny", "nat_tiny")
TRAINABLE_ON_CPU = tuple(name for name in MODELS if name != "nat_tiny")
IMAGENET = Problem(batch=1, height=224, width=224, channels=3, heads=1, window=7)
SMALL = Problem(batch=2, height=64, width=64, channels=3, heads=1, window=7)

# Published (params in millions, GMACs at 224², which the papers call GFLOPs). QnA-ViT: arXiv
# 2112.11435 Table 1 (the 7×7 variant has no published figures; it differs only in QnA window
# tables and taps); Swin-T and ConvNeXt-T: their papers and timm; NAT-Tiny: arXiv 2204.07143.
PUBLISHED = {
    "qna_vit_tiny": (16.0, 2.5),
    "qna_vit_tiny_7x7": (16.0, 2.5),
    "swin_tiny": (28.3, 4.5),
    "convnext_tiny": (28.6, 4.5),
    "nat_tiny": (28.0, 4.3),
}
TOLERANCE = 0.05


def _build(name: str, problem: Problem) -> torch.nn.Module:
    return get_layer(name).build(problem)


def _forward_macs(name: str, problem: Problem) -> tuple[int | None, str]:
    """Multiply-adds of one forward counted by `FlopCounterMode` (FLOPs / 2), and the count's method.
    QnA layers run their default plan (``tune=off``: direct windowed sums, as the published
    figures count them), chosen before the counted call."""
    spec = get_layer(name)
    model = spec.build(problem)
    images = problem.make_input(spec.layout)
    if spec.prepare is not None:
        spec.prepare(model, images, problem, MeasureSettings(threads=torch.get_num_threads(), tune="off"))

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    stats = count_flops(forward, spec.flop_formulas)
    return (stats.flops // 2 if stats.flops is not None else None), stats.method


# --------------------------------------------------------------------------------------------------
# Registration


def test_models_are_registered_as_models_not_layers():
    assert set(MODELS) <= set(list_layers(kind="model"))
    assert not set(MODELS) & set(list_layers())  # the default listing (and `layers=all`) is layers only
    for name in MODELS:
        spec = get_layer(name)
        assert (spec.kind, spec.family, spec.layout, spec.uses_window) == ("model", "model", "nchw", False)
        assert spec.input_errors(IMAGENET) == []


@pytest.mark.parametrize("name", MODELS)
def test_constraints_name_the_field(name):
    spec = get_layer(name)
    (message,) = spec.input_errors(IMAGENET.replace(channels=128))
    assert message.startswith("problem.channels=128") and "3" in message
    assert any(m.startswith("problem.height=100") for m in spec.input_errors(IMAGENET.replace(height=100)))
    assert spec.input_errors(SMALL) == []
    assert spec.input_errors(IMAGENET.replace(window=3)) == []  # ignored by models


@pytest.mark.parametrize("name", ["qna_vit_tiny", "qna_vit_tiny_7x7"])
def test_qna_vit_refuses_images_its_windows_do_not_tile(name):
    (message,) = get_layer(name).input_errors(IMAGENET.replace(height=256, width=256))[:1]
    assert message.startswith("problem.height=256") and "14×14 windows" in message


def test_nat_cannot_train_on_cpu_and_says_why():
    reason = get_layer("nat_tiny").unsupported_reason(SMALL.replace(mode="train"))
    assert "FlexAttention does not support backward on CPU" in reason
    for name in TRAINABLE_ON_CPU:
        assert get_layer(name).unsupported_reason(SMALL.replace(mode="train")) is None


def test_nat_reason_is_natten_own_error():
    model = _build("nat_tiny", SMALL.replace(mode="train"))
    with pytest.raises(NotImplementedError, match="FlexAttention does not support backward on CPU"):
        model(SMALL.make_input("nchw").requires_grad_(True))


# --------------------------------------------------------------------------------------------------
# The official QnA-ViT layout


@pytest.mark.parametrize("config", [QNA_VIT_TINY, QNA_VIT_TINY_7X7], ids=["tiny", "tiny_7x7"])
def test_qna_vit_follows_the_official_layout(config):
    model = QnAViT(config)
    qnas = [m for m in model.modules() if isinstance(m, QnA)]
    # Stride-1 QnA blocks 2 / 3 / 2 / 0 at widths 64 / 128 / 256, then a downsampling QnA per stage.
    stride1 = [(q.in_channels, q.heads) for q in qnas if q.stride == 1]
    assert stride1 == [(64, 8)] * 2 + [(128, 16)] * 3 + [(256, 32)] * 2
    down = [(q.in_channels, q.features, q.heads) for q in qnas if q.stride == 2]
    assert down == [(64, 128, 16), (128, 256, 32), (256, 512, 64)]
    window = config.qna_window[0]
    assert all(q.head_dim == 8 and q.window == window and q.num_queries == 2 for q in qnas)
    assert all(q.value_proj.bias is None and q.out_proj.bias is None for q in qnas)
    skips = [m.proj for m in model.modules() if isinstance(m, StridedSkip)]
    assert [(s.in_features, s.out_features) for s in skips] == [(64, 128), (128, 256), (256, 512)]
    attention = [m for m in model.modules() if isinstance(m, WindowSelfAttention)]
    assert [(a.window, a.heads, a.head_dim) for a in attention] == [(14, 8, 32)] * 4 + [(7, 16, 32)] * 2
    # Within a stage the window-attention blocks come before the QnA blocks.
    stage3 = list(model.stages[2])
    assert isinstance(stage3[0], WindowStage) and all(isinstance(b.mixer, QnA) for b in stage3[1:])
    # MLP ratio 4 of the block's output width, also in the downsampling blocks.
    for block in (stage3[-1], stage3[-2]):
        assert block.mlp[0].out_features == 4 * block.mlp[0].in_features


def test_window_stage_attends_within_each_window_only():
    torch.manual_seed(0)
    stage = WindowStage(dim=16, depth=2, heads=2, window=4, mlp_ratio=4, fused=False).eval()
    with torch.no_grad():
        stage.blocks[0].mixer.relative_position_bias.normal_()
        x = torch.randn(2, 4, 8, 16)
        whole = stage(x)
        halves = torch.cat([stage(x[:, :, :4]), stage(x[:, :, 4:])], dim=2)
    torch.testing.assert_close(whole, halves)


def test_window_attention_fused_and_explicit_agree():
    torch.manual_seed(0)
    attention = WindowSelfAttention(dim=32, heads=4, window=7)
    with torch.no_grad():
        attention.relative_position_bias.normal_()
        x = torch.randn(3, 7, 5, 32)  # a window clamped to a 7×5 map
        explicit = attention(x)
        attention.fused = True
        fused = attention(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Parameters and multiply-adds at 224² against the published figures


@pytest.mark.parametrize("name", MODELS)
def test_parameters_match_the_published_count(name):
    params = count_parameters(_build(name, IMAGENET)) / 1e6
    published = PUBLISHED[name][0]
    assert math.isclose(params, published, rel_tol=TOLERANCE), f"{name}: {params:.2f}M vs published {published}M"


@pytest.mark.parametrize("name", ["qna_vit_tiny", "qna_vit_tiny_7x7", "swin_tiny", "convnext_tiny"])
def test_counted_multiply_adds_match_the_published_figure(name):
    macs, method = _forward_macs(name, IMAGENET)
    published = PUBLISHED[name][1]
    assert method.startswith("flop_counter")
    assert math.isclose(macs / 1e9, published, rel_tol=TOLERANCE), f"{name}: {macs / 1e9:.3f} vs published {published}"
    spec = get_layer(name)
    if spec.analytic_flops is not None:  # the closed form counts exactly what the counter counts
        assert spec.analytic_flops(IMAGENET) == 2 * macs


def test_fused_window_attention_is_counted_like_the_explicit_one():
    """With timm's fused-attention switch on, QnA-ViT's window attention runs SDPA, whose CPU kernel
    the counter knows only through the entry's formulas: the count must not change."""
    model = QnAViT(QNA_VIT_TINY, fused_attention=True).eval()
    images = IMAGENET.make_input("nchw")

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    stats = count_flops(forward, get_layer("qna_vit_tiny").flop_formulas)
    assert stats.flops == 2 * qna_vit_macs(QNA_VIT_TINY, 224, 224)


def test_nat_multiply_adds_are_analytic_and_match_the_published_figure():
    macs = get_layer("nat_tiny").analytic_flops(IMAGENET) // 2
    assert math.isclose(macs / 1e9, PUBLISHED["nat_tiny"][1], rel_tol=TOLERANCE), macs
    # Eager flex attention on CPU computes every score of the map: about twice the paper's work.
    assert nat_macs(NAT_TINY, 224, 224, dense_attention=True) > 2 * macs


def test_nat_is_invisible_to_the_flop_counter():
    macs, method = _forward_macs("nat_tiny", SMALL)
    assert macs is None and method == "unavailable"


def test_analytic_counts_scale_with_batch_and_mode():
    for name in ("qna_vit_tiny", "nat_tiny"):
        spec = get_layer(name)
        one = spec.analytic_flops(IMAGENET)
        assert spec.analytic_flops(IMAGENET.replace(batch=4)) == 4 * one
        assert spec.analytic_flops(IMAGENET.replace(mode="train")) == 3 * one
    assert qna_vit_macs(QNA_VIT_TINY_7X7, 224, 224) > qna_vit_macs(QNA_VIT_TINY, 224, 224)


# --------------------------------------------------------------------------------------------------
# Running: forward logits, train steps, rows


@pytest.mark.parametrize("name", MODELS)
def test_forward_gives_finite_logits(name):
    model = _build(name, SMALL)
    with torch.inference_mode():
        logits = model(SMALL.make_input("nchw"))
    assert logits.shape == (SMALL.batch, 1000)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TRAINABLE_ON_CPU)
def test_train_step_reaches_every_parameter(name):
    problem = SMALL.replace(mode="train")
    model = _build(name, problem)
    images = problem.make_input("nchw")
    logits = model(images)
    logits.backward(problem.make_output_grad(logits))
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("name", MODELS)
def test_every_model_is_built_without_drop_path_or_dropout(name):
    model = _build(name, SMALL)
    assert not [m for m in model.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    flags = get_layer(name).layer_flags(model, SMALL)
    assert (flags["drop_path_rate"], flags["dropout"]) == (0.0, 0.0)


def test_swin_tiny_rows_record_drop_path_rate_0_where_timm_defaults_to_0_1():
    default = max(m.drop_prob for m in timm.create_model("swin_tiny_patch4_window7_224").modules()
                  if isinstance(m, DropPath))
    assert default > 0  # what the registry entry switches off
    problem = Problem(batch=1, height=64, width=64, channels=3, heads=1, window=7)
    settings = MeasureSettings(threads=1, min_run_time_s=0.01, min_replicates=1, point_budget_s=60.0, flops=False)
    row = run_point(SweepPoint(get_layer("swin_tiny"), problem), settings, read_environment("cpu"), run_id="test")
    assert row["status"] == "ok", row["reason"]
    assert json.loads(row["layer_flags"])["drop_path_rate"] == 0.0


@pytest.mark.parametrize(
    ("name", "mode", "status"),
    [("qna_vit_tiny", "forward", "ok"), ("nat_tiny", "forward", "ok"), ("nat_tiny", "train", "unsupported")],
)
def test_runner_rows(name, mode, status):
    problem = Problem(batch=1, height=32, width=32, channels=3, heads=1, window=7, mode=mode)
    settings = MeasureSettings(threads=1, min_run_time_s=0.01, point_budget_s=60.0)
    row = run_point(SweepPoint(get_layer(name), problem), settings, read_environment("cpu"), run_id="test")
    assert row["status"] == status, row["reason"]
    assert row["family"] == "model" and row["layout"] == "nchw" and row["uses_window"] is False
    if status != "ok":
        assert "FlexAttention" in row["reason"]
        return
    assert row["params"] > 1e7 and row["median_s"] > 0 and row["flops_analytic"] > 0
    if name == "nat_tiny":  # flex attention hides from the flop counter; the analytic count stands
        assert row["flops"] is None and row["memory_method"] == "cpu_allocator_events" and row["peak_bytes"] > 0
        assert json.loads(row["layer_flags"])["natten_backend"] == "flex-fna"
    else:
        assert row["flops"] == row["flops_analytic"] and row["peak_bytes"] > 0
        plans = json.loads(row["layer_flags"])["qna_plans"]  # k=3: direct or fused, tuned or cached by a twin layer
        layers = sum(isinstance(m, QnA) for m in get_layer(name).factory(problem).modules())
        assert sum(plans.values()) == layers
        assert set(plans) <= {f"{plan} ({source})" for plan in ("direct", "fused", "fused_32") for source in ("tuned", "cache")}
