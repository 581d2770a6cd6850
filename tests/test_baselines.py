"""The peers' adapters against their libraries and against independent references, on tiny problems."""

from __future__ import annotations

import math
import warnings

import natten.functional
import pytest
import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn
from timm.models.swin_transformer import SwinTransformerBlock
from torch.utils._python_dispatch import TorchDispatchMode

from baselines._common import FLEX_CPU_BACKWARD, na_mask
from baselines.convnext import ConvNeXtMixer
from baselines.flex_na import FLEX_BLOCK, computed_blocks
from baselines.global_attn import GlobalAttention
from baselines.halo import BLOCK_SIZE, HaloAttention
from baselines.natten import NattenNeighborhoodAttention
from baselines.sasa import UnfoldSASA
from baselines.swin import SwinWindowAttention
from baselines.torch_na import MaskedNeighborhoodAttention
from qna_bench.measure.flops import count_flops
from qna_bench.measure.params import count_parameters
from qna_bench.memcap import address_space_cap
from qna_bench.problem import Problem
from qna_bench.registry import get_layer
from qna_bench.runner import is_out_of_memory

# Eager flex attention warns that it is not compiled (the point of the natten row), and NATTEN 0.21
# still passes flex attention's deprecated return_lse.
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.filterwarnings("ignore:return_lse is deprecated"),
]

CHANNELS, HEADS = 16, 2


def _seeded_input(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# An independent neighbourhood-attention reference: NATTEN's definition written out per pixel.


def naive_neighbours(length: int, window: int, dilation: int) -> list[list[int]]:
    """Per position: the ``window`` consecutive members of its dilation group centred on it, shifted
    to stay inside the group."""
    neighbours = []
    for i in range(length):
        group = list(range(i % dilation, length, dilation))
        start = min(max(group.index(i) - window // 2, 0), len(group) - window)
        neighbours.append(group[start : start + window])
    return neighbours


def naive_na(q, k, v, window: int, dilation: int) -> torch.Tensor:
    """(B, H, W, heads, d) → same, explicit softmax over each pixel's k×k neighbours."""
    _, height, width, _, dim = q.shape
    rows = torch.tensor(naive_neighbours(height, window, dilation))  # H, k
    cols = torch.tensor(naive_neighbours(width, window, dilation))  # W, k
    keys = k[:, rows[:, :, None, None], cols[None, None, :, :]]  # B, H, k, W, k, heads, d
    values = v[:, rows[:, :, None, None], cols[None, None, :, :]]
    logits = torch.einsum("byxnd,byixjnd->byxnij", q * dim**-0.5, keys)
    attn = logits.flatten(-2).softmax(-1).view_as(logits)
    return torch.einsum("byxnij,byixjnd->byxnd", attn, values)


def naive_projected_na(module, x, window: int, dilation: int) -> torch.Tensor:
    batch, height, width, channels = x.shape
    q, k, v = (
        F.linear(x, module.qkv.weight, module.qkv.bias).view(batch, height, width, 3, HEADS, -1).unbind(3)
    )
    return F.linear(naive_na(q, k, v, window, dilation).flatten(-2), module.proj.weight, module.proj.bias)


NA_CASES = [  # height, width, window, dilation
    (9, 13, 3, 1),
    (9, 13, 7, 1),
    (9, 13, 9, 1),  # window = height: clamped everywhere along that axis
    (12, 14, 5, 2),
    (11, 10, 3, 3),
    (7, 7, 7, 1),  # window = map: NATTEN switches to plain self-attention
]


@pytest.mark.parametrize("height,width,window,dilation", NA_CASES + [(10, 7, 3, 2), (15, 6, 5, 1)])
def test_na_mask_is_the_per_pixel_definition(height, width, window, dilation):
    expected = torch.zeros(height, width, height, width, dtype=torch.bool)
    rows, cols = naive_neighbours(height, window, dilation), naive_neighbours(width, window, dilation)
    for i in range(height):
        for j in range(width):
            expected[i, j, torch.tensor(rows[i])[:, None], torch.tensor(cols[j])[None, :]] = True
    assert torch.equal(na_mask(height, width, window, dilation), expected.view(height * width, -1))


@pytest.mark.parametrize("height,width,window,dilation", NA_CASES)
def test_na_torch_equals_natten_forward(height, width, window, dilation):
    torch.manual_seed(0)
    theirs = NattenNeighborhoodAttention(CHANNELS, HEADS, window, dilation)
    ours = MaskedNeighborhoodAttention(CHANNELS, HEADS, height, width, window, dilation)
    ours.load_state_dict(theirs.attn.state_dict())
    x = _seeded_input(2, height, width, CHANNELS)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_na_torch_gradients_match_an_explicit_softmax_in_fp64():
    height, width, window, dilation = 10, 13, 3, 2
    module = MaskedNeighborhoodAttention(CHANNELS, HEADS, height, width, window, dilation).double()
    x = _seeded_input(2, height, width, CHANNELS, dtype=torch.float64).requires_grad_()
    g = _seeded_input(2, height, width, CHANNELS, dtype=torch.float64)
    wrt = [x, module.qkv.weight, module.qkv.bias, module.proj.weight]

    out = module(x)
    grads = torch.autograd.grad((out * g).sum(), wrt)
    ref = naive_projected_na(module, x, window, dilation)
    ref_grads = torch.autograd.grad((ref * g).sum(), wrt)

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)


def test_na_constraint_is_nattens_own_rule():
    # reach = dilation·(window−1)+1 = 7 fits a 7-wide map, but NATTEN needs window·dilation = 9 ≤ 7.
    problem = Problem(batch=1, height=7, width=12, channels=CHANNELS, heads=HEADS, window=3, dilation=3)
    for name in ("na", "na_torch", "na_flex"):
        assert any("window*dilation=9" in e for e in get_layer(name).input_errors(problem)), name
    with pytest.raises(ValueError, match="kernel size and dilation"):
        NattenNeighborhoodAttention(CHANNELS, HEADS, 3, 3)(_seeded_input(1, 7, 12, CHANNELS))


# --------------------------------------------------------------------------------------------------
# natten: the backend it records is the one it runs; train mode really fails with the recorded reason.


@pytest.mark.parametrize(
    "height,width,window,backend,runner",
    [(9, 11, 3, "flex-fna", "flex_fna_generic"), (7, 7, 7, "flex-fmha", "flex_fmha")],
)
def test_natten_flag_names_the_backend_that_runs(monkeypatch, height, width, window, backend, runner):
    calls = []
    original = getattr(natten.functional, runner)

    def spy(*args, **kwargs):
        calls.append(runner)
        return original(*args, **kwargs)

    monkeypatch.setattr(natten.functional, runner, spy)
    spec = get_layer("na")
    problem = Problem(batch=1, height=height, width=width, channels=CHANNELS, heads=HEADS, window=window)
    module = spec.build(problem)
    with torch.inference_mode():
        module(problem.make_input(spec.layout))
    assert calls == [runner]
    assert spec.layer_flags(module, problem)["natten_backend"] == backend


def test_natten_head_dim_gap_is_unsupported_with_nattens_reason():
    problem = Problem(batch=1, height=9, width=11, channels=8, heads=2, window=3)  # head_dim 4
    reason = get_layer("na").unsupported_reason(problem)
    assert reason is not None and "8 <= head_dim <= 512" in reason
    with pytest.raises(NotImplementedError, match="could not find a suitable backend"):
        NattenNeighborhoodAttention(8, 2, 3, 1)(problem.make_input("nhwc"))
    assert get_layer("na").unsupported_reason(problem.replace(channels=16)) is None


def test_natten_train_on_cpu_raises_the_recorded_reason():
    problem = Problem(batch=1, height=9, width=11, channels=CHANNELS, heads=HEADS, window=3, mode="train")
    spec = get_layer("na")
    assert FLEX_CPU_BACKWARD in spec.unsupported_reason(problem)
    module = NattenNeighborhoodAttention(CHANNELS, HEADS, 3, 1)
    with pytest.raises(NotImplementedError, match=FLEX_CPU_BACKWARD):
        module(problem.make_input("nhwc"))


def test_flex_layers_report_flops_as_unavailable_not_zero():
    problem = Problem(batch=1, height=9, width=11, channels=CHANNELS, heads=HEADS, window=3)
    module = get_layer("na").build(problem)
    x = problem.make_input("nhwc")
    for grad_mode in (torch.inference_mode, torch.no_grad):  # the underlying error differs between them

        def forward(grad_mode=grad_mode):
            with grad_mode():
                module(x)

        stats = count_flops(forward)
        assert stats.flops is None and stats.method == "unavailable"
        assert "pytorch/pytorch#134385" in stats.note


# --------------------------------------------------------------------------------------------------
# na_flex (compiles once: ~10 s; one module shared by the tests below).

FLEX_PROBLEM = Problem(batch=2, height=12, width=20, channels=CHANNELS, heads=HEADS, window=5, dilation=2)


@pytest.fixture(scope="module")
def flex_module():
    return get_layer("na_flex").build(FLEX_PROBLEM)


def test_na_flex_equals_na_torch_and_compiles_once(flex_module):
    p = FLEX_PROBLEM
    oracle = MaskedNeighborhoodAttention(CHANNELS, HEADS, p.height, p.width, p.window, p.dilation)
    oracle.load_state_dict(flex_module.state_dict())
    x = p.make_input("nhwc")
    with torch.inference_mode():
        first = flex_module(x)
        with torch.compiler.set_stance("fail_on_recompile"):
            again = flex_module(x)
            torch.testing.assert_close(
                flex_module(p.make_input("nhwc") * 2), oracle(x * 2), rtol=0, atol=1e-5
            )
        torch.testing.assert_close(first, oracle(x), rtol=0, atol=1e-5)
    assert torch.equal(first, again)


def test_na_flex_flops_count_the_blocks_its_mask_computes(flex_module):
    blocks = math.ceil(FLEX_PROBLEM.height * FLEX_PROBLEM.width / FLEX_BLOCK) ** 2
    density = get_layer("na_flex").layer_flags(flex_module, FLEX_PROBLEM)["flex_block_density"]
    assert computed_blocks(FLEX_PROBLEM) == round(density * blocks)
    # A map several blocks wide with a small window skips most blocks.
    wide = Problem(height=64, width=64, window=3)
    assert computed_blocks(wide) < 0.2 * math.ceil(64 * 64 / FLEX_BLOCK) ** 2


def test_na_flex_train_on_cpu_raises_the_recorded_reason(flex_module):
    assert FLEX_CPU_BACKWARD in get_layer("na_flex").unsupported_reason(FLEX_PROBLEM.replace(mode="train"))
    x = FLEX_PROBLEM.make_input("nhwc").requires_grad_()
    with pytest.raises(Exception, match=FLEX_CPU_BACKWARD):
        flex_module(x)


def test_na_flex_flops_unavailable_under_the_counter(flex_module):
    x = FLEX_PROBLEM.make_input("nhwc")

    def forward():
        with torch.inference_mode():
            flex_module(x)

    stats = count_flops(forward)
    assert stats.flops is None and "pytorch/pytorch#134385" in stats.note


@pytest.mark.parametrize("name", ["na", "na_flex"])
def test_flex_layers_reject_float64_up_front(name):
    assert get_layer(name).input_errors(FLEX_PROBLEM.replace(dtype="float64"))


def test_na_flex_modules_do_not_share_dynamos_recompile_budget(flex_module):
    other = Problem(batch=1, height=9, width=10, channels=CHANNELS, heads=HEADS, window=3)
    with torch._dynamo.config.patch(recompile_limit=1), torch.inference_mode():
        flex_module(FLEX_PROBLEM.make_input("nhwc"))
        get_layer("na_flex").build(other)(other.make_input("nhwc"))


# --------------------------------------------------------------------------------------------------
# SASA


def masked_sdpa_sasa(module: UnfoldSASA, x: torch.Tensor) -> torch.Tensor:
    """Every output pixel's query over all in-image keys within its window, via a boolean SDPA mask."""
    batch, height, width, channels = x.shape
    radius, stride = module.window // 2, module.stride
    q, k, v = module.qkv(x).view(batch, height, width, 3, HEADS, -1).unbind(3)
    q = q[:, ::stride, ::stride]
    out_h, out_w = q.shape[1:3]
    oi, oj = torch.meshgrid(torch.arange(out_h) * stride, torch.arange(out_w) * stride, indexing="ij")
    ki, kj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    near_rows = (oi.reshape(-1, 1) - ki.reshape(1, -1)).abs() <= radius
    near = near_rows & ((oj.reshape(-1, 1) - kj.reshape(1, -1)).abs() <= radius)
    seq = [t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*seq, attn_mask=near)
    return module.proj(out.transpose(1, 2).reshape(batch, out_h, out_w, channels))


@pytest.mark.parametrize("window,stride", [(3, 1), (5, 1), (7, 2), (3, 2)])
def test_sasa_equals_masked_sdpa(window, stride):
    module = UnfoldSASA(CHANNELS, HEADS, window, stride)
    x = _seeded_input(2, 9, 12, CHANNELS)
    with torch.inference_mode():
        out = module(x)
        assert out.shape == (2, math.ceil(9 / stride), math.ceil(12 / stride), CHANNELS)
        torch.testing.assert_close(out, masked_sdpa_sasa(module, x), rtol=0, atol=1e-5)


def test_sasa_large_window_fails_as_an_allocation_error():
    # Unfolded keys alone: 64 channels × 31² offsets × 64² positions × 4 bytes ≈ 1 GB, cap 256 MiB.
    problem = Problem(batch=1, height=64, width=64, channels=64, heads=4, window=31)
    module = get_layer("sasa").build(problem)
    x = problem.make_input("nhwc")
    with pytest.raises(Exception) as failure, address_space_cap(256 << 20), torch.inference_mode():
        module(x)
    assert is_out_of_memory(failure.value), repr(failure.value)


# --------------------------------------------------------------------------------------------------
# Swin: the adapter is timm's block attention path; eager and fused agree.

SWIN_CASES = [  # height, width, window
    (14, 14, 7),  # whole windows
    (10, 13, 4),  # padded on both axes
    (6, 9, 7),  # window larger than the height: timm clamps it to 6 and drops that axis's shift
]


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("height,width,window", SWIN_CASES)
def test_swin_adapter_is_timms_block_attention(height, width, window, shifted):
    eager = SwinWindowAttention(CHANNELS, HEADS, height, width, window, shifted, fused=False)
    fused = SwinWindowAttention(CHANNELS, HEADS, height, width, window, shifted, fused=True)
    fused.load_state_dict(eager.state_dict())
    shift = window // 2 if shifted else 0
    block = SwinTransformerBlock(
        CHANNELS, (height, width), num_heads=HEADS, window_size=window, shift_size=shift
    )
    block.attn.load_state_dict(eager.block.attn.state_dict())
    block.attn.fused_attn = False
    x = _seeded_input(2, height, width, CHANNELS)
    with torch.inference_mode():
        expected = block._attn(x)
        torch.testing.assert_close(eager(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-5)

    problem = Problem(batch=2, height=height, width=width, channels=CHANNELS, heads=HEADS, window=window)
    flags = get_layer("swin_shifted" if shifted else "swin").layer_flags(eager, problem)
    assert flags["window_effective"] == "x".join(map(str, block.window_size))
    assert flags["shift_effective"] == "x".join(map(str, block.shift_size))
    assert flags["timm_fused_attn"] is False
    assert get_layer("swin_fused").layer_flags(fused, problem)["timm_fused_attn"] is True


def test_swin_clamps_the_window_and_drops_the_shift_on_a_covered_axis():
    module = SwinWindowAttention(CHANNELS, HEADS, 6, 9, 7, shifted=True, fused=False)
    assert module.block.window_size == (6, 7) and module.block.shift_size == (0, 3)
    # A map the window covers entirely: the shifted layer is the plain one.
    shifted = SwinWindowAttention(CHANNELS, HEADS, 5, 5, 7, shifted=True, fused=False)
    plain = SwinWindowAttention(CHANNELS, HEADS, 5, 5, 7, shifted=False, fused=False)
    plain.load_state_dict(shifted.state_dict())
    x = _seeded_input(1, 5, 5, CHANNELS)
    with torch.inference_mode():
        torch.testing.assert_close(shifted(x), plain(x), rtol=0, atol=0)


def test_swin_shift_changes_the_output_where_it_applies():
    shifted = SwinWindowAttention(CHANNELS, HEADS, 8, 8, 4, shifted=True, fused=False)
    plain = SwinWindowAttention(CHANNELS, HEADS, 8, 8, 4, shifted=False, fused=False)
    plain.load_state_dict(shifted.state_dict())
    x = _seeded_input(1, 8, 8, CHANNELS)
    with torch.inference_mode():
        assert not torch.allclose(shifted(x), plain(x))


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "mode,kernel_op", [("forward", "_scaled_dot_product_flash_attention_for_cpu"), ("train", "bmm")]
)
def test_swin_fused_sdpa_kernel_flag_is_what_runs(mode, kernel_op):
    spec = get_layer("swin_fused")
    problem = Problem(batch=1, height=8, width=8, channels=CHANNELS, heads=HEADS, window=4, mode=mode)
    module = spec.build(problem)
    x = problem.make_input(spec.layout)
    recorder = _OpRecorder()
    with recorder, torch.set_grad_enabled(mode == "train"):
        module(x).sum().backward() if mode == "train" else module(x)
    flag = spec.layer_flags(module, problem)["sdpa_kernel"]
    assert any(kernel_op in op for op in recorder.ops), recorder.ops
    assert flag == ("flash (cpu)" if mode == "forward" else "math (attn_mask requires grad)")
    if mode == "train":
        assert not any("flash" in op for op in recorder.ops)


# --------------------------------------------------------------------------------------------------
# Global attention, HaloAttn, ConvNeXt mixer


def test_global_attention_equals_a_naive_softmax():
    module = GlobalAttention(CHANNELS, HEADS)
    x = _seeded_input(2, 5, 7, CHANNELS)
    q, k, v = module.qkv(x).view(2, 35, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(CHANNELS // HEADS)).softmax(-1)
    expected = module.proj((attn @ v).transpose(1, 2).reshape(2, 5, 7, CHANNELS))
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window,stride", [(3, 1), (7, 1), (5, 2)])
def test_halo_adapter_is_timm_haloattn_plus_projection(window, stride):
    module = HaloAttention(CHANNELS, HEADS, window, stride)
    reference = HaloAttn(
        CHANNELS,
        CHANNELS,
        stride=stride,
        num_heads=HEADS,
        block_size=BLOCK_SIZE,
        halo_size=(window - 1) // 2,
        qkv_bias=True,
    )
    reference.load_state_dict(module.attn.state_dict())
    x = _seeded_input(2, CHANNELS, 16, 24)
    with torch.inference_mode():
        out = module(x)
        assert out.shape == (2, CHANNELS, 16 // stride, 24 // stride)
        torch.testing.assert_close(out, module.proj(reference(x)), rtol=0, atol=1e-6)


def test_halo_pixels_see_their_block_plus_halo_which_holds_their_window():
    window, size = 5, 16
    halo = (window - 1) // 2
    module = HaloAttention(CHANNELS, HEADS, window, stride=1).double()
    x = _seeded_input(1, CHANNELS, size, size, dtype=torch.float64).requires_grad_()
    out = module(x)
    for i, j in [(0, 0), (9, 9), (7, 12)]:
        (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
        seen = grad[0].abs().sum(0) > 0
        block_i, block_j = i // BLOCK_SIZE * BLOCK_SIZE, j // BLOCK_SIZE * BLOCK_SIZE
        expected = torch.zeros(size, size, dtype=torch.bool)
        rows = slice(max(block_i - halo, 0), block_i + BLOCK_SIZE + halo)
        expected[rows, max(block_j - halo, 0) : block_j + BLOCK_SIZE + halo] = True
        assert torch.equal(seen, expected)
        assert seen[max(i - halo, 0) : i + halo + 1, max(j - halo, 0) : j + halo + 1].all()


def test_halo_zero_padding_takes_part_in_the_softmax_as_flagged():
    # A constant map makes every in-image value equal: any pixel whose output differs from an
    # interior block's has attended to the zero padding.
    module = HaloAttention(CHANNELS, HEADS, window=5, stride=1)
    with torch.inference_mode():
        out = module.attn(torch.ones(1, CHANNELS, 24, 24))
    interior = out[0, :, 10, 10]
    torch.testing.assert_close(out[0, :, 13, 12], interior, rtol=0, atol=1e-5)
    assert not torch.allclose(out[0, :, 3, 3], interior, atol=1e-3)
    problem = Problem(height=24, width=24, window=5)
    assert get_layer("halo").layer_flags(module, problem)["padded_halo_attended"] is True


def test_halo_needs_maps_divisible_by_its_block():
    reason = get_layer("halo").unsupported_reason(Problem(height=14, width=16))
    assert reason is not None and "divisible by its block size 8" in reason and "14x16" in reason
    assert get_layer("halo").unsupported_reason(Problem(height=16, width=24)) is None


def test_convnext_mixer_parameters_and_form():
    module = ConvNeXtMixer(CHANNELS, 5, stride=2, dilation=1)
    assert count_parameters(module) == 2 * CHANNELS**2 + (5 * 5 + 3) * CHANNELS
    x = _seeded_input(2, 9, 10, CHANNELS)
    hidden = module.pw_in(x).permute(0, 3, 1, 2).contiguous()
    mixed = F.conv2d(hidden, module.dw.weight, module.dw.bias, stride=2, padding=2, groups=CHANNELS)
    expected = module.pw_out(mixed.permute(0, 2, 3, 1))
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)


def test_convnext_description_states_both_parameter_counts():
    problem = Problem(channels=128, heads=4, window=7)
    convnext = count_parameters(get_layer("convnext_mixer").build(problem))
    qna = count_parameters(get_layer("qna").build(problem))
    assert f"{convnext:,} vs {qna:,}" in get_layer("convnext_mixer").description


# --------------------------------------------------------------------------------------------------
# Registry entries of these peers: FLOP cross-checks, capability gaps.

COUNTED = [
    "swin",
    "swin_fused",
    "swin_shifted",
    "swin_shifted_fused",
    "na_torch",
    "sasa",
    "global_attn",
    "halo",
    "convnext_mixer",
]
STRIDED = ("sasa", "halo", "convnext_mixer")


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("name", COUNTED)
def test_analytic_flops_equal_the_counter(name, mode):
    spec = get_layer(name)
    stride = 2 if name in STRIDED else 1
    problem = Problem(
        batch=2, height=16, width=24, channels=CHANNELS, heads=HEADS, window=5, stride=stride, mode=mode
    )
    module = spec.build(problem)
    x = problem.make_input(spec.layout)

    def call():
        if mode == "train":
            out = module(x)
            out.backward(problem.make_output_grad(out))
        else:
            with torch.inference_mode():
                module(x)

    stats = count_flops(call, spec.flop_formulas)
    assert stats.flops == spec.analytic_flops(problem) > 0


@pytest.mark.parametrize("name", ["swin_shifted", "swin_fused"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_swin_analytic_flops_follow_timms_clamped_and_padded_window(name, mode):
    spec = get_layer(name)
    problem = Problem(batch=1, height=6, width=11, channels=CHANNELS, heads=HEADS, window=7, mode=mode)
    module = spec.build(problem)
    x = problem.make_input(spec.layout)

    def call():
        with torch.set_grad_enabled(mode == "train"):
            out = module(x)
            if mode == "train":
                out.backward(problem.make_output_grad(out))

    assert spec.layer_flags(module, problem)["padded_map"] == "6x14"
    assert count_flops(call, spec.flop_formulas).flops == spec.analytic_flops(problem)


@pytest.mark.parametrize(
    "name,change,needle",
    [
        ("swin", dict(stride=2), "no strided form"),
        ("swin_fused", dict(dilation=2), "no dilated form"),
        ("global_attn", dict(stride=2), "no strided form"),
        ("global_attn", dict(dilation=2), "no dilated form"),
        ("na", dict(stride=2), "keeps all H×W outputs"),
        ("na_torch", dict(stride=2), "no strided form"),
        ("na_flex", dict(stride=2), "no strided form"),
        ("sasa", dict(dilation=2), "no dilated form"),
        ("halo", dict(dilation=2), "no dilated form"),
    ],
)
def test_capability_gaps_are_unsupported_with_a_reason(name, change, needle):
    problem = Problem(height=16, width=16, window=3).replace(**change)
    assert not get_layer(name).input_errors(problem)
    reason = get_layer(name).unsupported_reason(problem)
    assert reason is not None and needle in reason


def test_supported_variants_need_no_excuse():
    assert get_layer("sasa").unsupported_reason(Problem(stride=2)) is None
    assert get_layer("halo").unsupported_reason(Problem(stride=2)) is None
    assert get_layer("convnext_mixer").unsupported_reason(Problem(stride=2, dilation=2)) is None
    assert get_layer("na").unsupported_reason(Problem(dilation=2)) is None
    assert get_layer("na_torch").unsupported_reason(Problem(dilation=3, mode="train")) is None
    assert get_layer("global_attn").uses_window is False


def test_layers_use_the_problem_heads_and_channels():
    problem = Problem(batch=1, height=8, width=8, channels=24, heads=3, window=3)
    for name in ("swin", "na", "na_torch", "sasa", "global_attn", "halo"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = get_layer(name).build(problem)
        heads = {m.num_heads for m in module.modules() if hasattr(m, "num_heads")} | {
            m.heads for m in module.modules() if hasattr(m, "heads") and isinstance(m.heads, int)
        }
        assert heads == {3}, name
        assert count_parameters(module) >= 4 * 24 * 24, name  # at least qkv and output projections
