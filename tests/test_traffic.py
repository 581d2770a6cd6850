"""Closed-form bytes moved, against hand counts on a tiny problem (fp32: 4 bytes an element).

The problem: B=1, 4×4 map, C=4, 2 heads; x and a same-size output are 64 elements each. The shell of
the attention peers reads qkv (4·12) and proj (4·4) weights with their biases: 80 elements; it writes
and reads back q/k/v (16·12 = 192) and the attention output (64).
"""

from __future__ import annotations

import pytest

from qna_bench.problem import Problem
from qna_bench.registry import get_layer, list_layers

TINY = Problem(batch=1, height=4, width=4, channels=4, heads=2, window=3)
FP32 = 4


def _bytes(name: str, **change) -> int:
    return get_layer(name).analytic_bytes(TINY.replace(**change))


def test_depthwise_convolution_reads_input_and_weights_and_writes_its_output():
    # x 64 + weights 4·9 + bias 4 + y 64 = 168 elements
    assert _bytes("conv_dw", mode="forward") == 168 * FP32
    # backward: dy 64, x again and dx (2·64), weights again and their gradients (2·40): 272 more
    assert _bytes("conv_dw", mode="train") == (168 + 272) * FP32


def test_dense_convolution_counts_its_full_weight_tensor():
    assert _bytes("conv_dense", mode="forward") == (64 + 4 * 4 * 9 + 4 + 64) * FP32


def test_qna_counts_the_packed_projection_the_exponentials_and_each_querys_numerator():
    params = 16 + 2 * 4 + 32 + 2 * 2 * 2 * 9  # W_k, queries, value and output projections, rpe + mixing
    between = 16 * 8 + 16 * 4 + 16 * 4 + 2 * (16 + 16) * 4 + 64  # packed, exp, den, 2×(E·V, num), z
    forward = 64 + params + 64 + 2 * between
    assert (params, between, forward) == (128, 576, 1408)
    assert _bytes("qna", mode="forward") == forward * FP32
    backward = 64 + 3 * between + 2 * 64 + 2 * params
    assert _bytes("qna", mode="train") == (forward + backward) * FP32 == 14336


def test_fused_swin_forward_writes_no_scores_but_its_train_step_does():
    # window 2 tiles the 4×4 map: 4 windows of 4 tokens; bias table (2·2-1)² · 2 heads = 18
    params = 80 + 18
    between = 192 + 64 + 2 * 4 * 4  # qkv, attention output, gathered (heads, M², M²) bias
    assert _bytes("swin_fused", window=2, mode="forward") == (64 + params + 64 + 2 * between) * FP32 == 3208
    scores = 16 * 2 * 4  # tokens × heads × M²
    between += 2 * scores  # SDPA's math fallback in train: scores and probabilities
    forward = 64 + params + 64 + 2 * between
    backward = 64 + 3 * between + 2 * 64 + 2 * params
    assert _bytes("swin_fused", window=2, mode="train") == (forward + backward) * FP32 == 13336
    assert _bytes("swin", window=2, mode="forward") > _bytes("swin_fused", window=2, mode="forward")


def test_neighbourhood_attention_on_masked_sdpa_reads_the_mask_once():
    mask = 16 * 16
    assert _bytes("na_torch", mode="forward") == (64 + mask + 80 + 64 + 2 * (192 + 64)) * FP32 == 3904


def test_sasa_writes_and_reads_its_unfolded_keys_and_values():
    unfolded = 2 * 16 * 4 * 9  # keys and values, (B, C, k², L)
    logits = 2 * 16 * 2 * 9  # logits and probabilities, (B, heads, k², L)
    between = 192 + 64 + unfolded + 64 + logits  # + the scaled queries
    assert _bytes("sasa", mode="forward") == (64 + 80 + 64 + 2 * between) * FP32 == 17216


@pytest.mark.parametrize("name", list_layers())
def test_every_layer_counts_its_bytes_and_train_moves_more_than_forward(name):
    spec = get_layer(name)
    assert spec.analytic_bytes is not None
    problem = Problem(batch=2, height=16, width=16, channels=16, heads=2, window=5)
    forward = spec.analytic_bytes(problem.replace(mode="forward"))
    assert forward >= 2 * problem.input_bytes()
    assert spec.analytic_bytes(problem.replace(mode="train")) > forward
    assert spec.analytic_bytes(problem.replace(mode="forward", dtype="float64")) == 2 * forward
