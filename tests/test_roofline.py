"""The roofline columns from a results frame: achieved rates, intensity and the fraction of the roof,
computed from stored columns; and no committed point lies more than 10% above its roof."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import committed_results
from test_report import synthetic_row

from qna_bench import results, roofline
from qna_bench.analysis import analyse

PEAK_FLOPS, PEAK_BANDWIDTH = 100e9, 10e9  # ridge at 10 FLOPs per byte
PROBES = dict(peak_flops_probe=PEAK_FLOPS, peak_bytes_per_s_probe=PEAK_BANDWIDTH, probe_method="synthetic")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def frame_of(tmp_path):
    """Rows → the frame `read_results` gives, through a parquet as a run writes it."""

    def make(rows):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.parquet"
        results.append_rows(path, rows)
        return results.read_results(path)

    return make


def test_a_memory_bound_point_is_measured_against_its_bandwidth_roof(frame_of):
    # 2e9 FLOPs over 1e9 bytes (intensity 2) in 0.5 s: 4 GFLOP/s under a 20 GFLOP/s memory roof.
    row = synthetic_row("qna", 3, latency_s=0.5, flops=2_000_000_000, bytes_analytic=1_000_000_000, **PROBES)
    point = roofline.roofline_frame(frame_of([row])).iloc[0]
    assert point["intensity"] == pytest.approx(2.0)
    assert point["achieved_flops_per_s"] == pytest.approx(4e9)
    assert point["achieved_bytes_per_s"] == pytest.approx(2e9)
    assert point["roof_flops_per_s"] == pytest.approx(20e9)
    assert point["roof_fraction"] == pytest.approx(0.2)
    assert point["bound"] == "DRAM" and point["roof_level"] == "DRAM"


CACHE_PROBES = dict(PROBES, peak_bytes_per_s_l2_probe=80e9, peak_bytes_per_s_llc_probe=40e9,
                    l2_bytes_probe=2 * 2**20, llc_bytes_probe=32 * 2**20)


@pytest.mark.parametrize(
    "moved,level,bandwidth",
    [(2**20, "L2", 80e9), (2 * 2**20, "L2", 80e9), (12 * 10**6, "LLC", 40e9), (32 * 2**20 + 1, "DRAM", 10e9)],
)
def test_a_point_is_judged_against_the_roof_of_the_level_its_working_set_fits_in(frame_of, moved, level, bandwidth):
    # intensity 1: memory-bound under every level (ridges at 1.25, 2.5 and 10 FLOP/byte)
    row = synthetic_row("conv_dw", 3, latency_s=moved / 20e9, flops=moved, bytes_analytic=moved, **CACHE_PROBES)
    point = roofline.roofline_frame(frame_of([row])).iloc[0]
    assert point["roof_level"] == level and point["bound"] == level
    assert point["level_bytes_per_s"] == pytest.approx(bandwidth)
    assert point["roof_fraction"] == pytest.approx(20e9 / bandwidth)


def test_a_level_without_a_probe_passes_its_points_to_the_next_level_out(frame_of):
    probes = dict(CACHE_PROBES, peak_bytes_per_s_l2_probe=None)
    row = synthetic_row("conv_dw", 3, latency_s=0.001, flops=2**20, bytes_analytic=2**20, **probes)
    assert roofline.roofline_frame(frame_of([row])).iloc[0]["roof_level"] == "LLC"
    assert roofline.level_roofs(roofline.roofline_frame(frame_of([row]))) == [("LLC", 40e9), ("DRAM", 10e9)]


def test_a_compute_bound_point_is_measured_against_the_peak_and_the_closed_form_stands_in_for_the_counter(frame_of):
    # The counter saw nothing (flex attention): the closed form's 5e10 FLOPs over 1e9 bytes, in 1 s.
    row = synthetic_row(
        "swin", 7, latency_s=1.0, flops=None, flops_analytic=50_000_000_000, bytes_analytic=1_000_000_000, **PROBES
    )
    point = roofline.roofline_frame(frame_of([row])).iloc[0]
    assert point["intensity"] == pytest.approx(50.0) and point["bound"] == "compute"
    assert point["roof_flops_per_s"] == pytest.approx(PEAK_FLOPS)
    assert point["roof_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "size,window,stride,share",
    [(16, 1, 1, 1.0), (16, 3, 1, 46 / 48), (5, 3, 2, 7 / 9), (4, 5, 1, 14 / 20), (28, 21, 1, 1 - 110 / 588)],
)
def test_the_share_of_taps_inside_the_image_is_counted_along_an_axis(size, window, stride, share):
    # 16, k=3: the first and last outputs each lose one tap; 5, k=3, stride 2: outputs 0 and 2 lose one;
    # 4, k=5: 3 + 4 + 4 + 3 of 20; 28, k=21: padding 10 loses 10 + 9 + ... + 1 taps at each end
    assert roofline.in_image_taps(size, window, stride) == pytest.approx(share)


def test_a_padded_convolution_is_credited_only_its_taps_inside_the_image(frame_of):
    # 16×16, k=5: 74 of 80 taps per axis inside (the outputs at each edge lose 2 and 1 taps)
    rows = [synthetic_row(layer, 5, latency_s=0.01, flops=10**9, bytes_analytic=10**8, **PROBES)
            for layer in ("conv_dense", "conv_dw", "qna")]
    points = roofline.roofline_frame(frame_of(rows)).set_index("layer")
    assert points.loc["conv_dense", "work_flops"] == pytest.approx(10**9 * (74 / 80) ** 2)
    assert points.loc["conv_dw", "work_flops"] == points.loc["conv_dense", "work_flops"]
    assert points.loc["qna", "work_flops"] == 10**9  # not one padded convolution: its count stands


def test_points_without_probes_bytes_or_time_are_left_out_and_flagged_points_are_found(frame_of):
    rows = [
        synthetic_row("qna", 3, latency_s=0.01, flops=10**9, bytes_analytic=10**8, **PROBES),  # 1.0 of the roof
        synthetic_row("qna", 5, latency_s=0.001, flops=10**9, bytes_analytic=10**8, **PROBES),  # 10× above
        synthetic_row("qna", 7, latency_s=10.0, flops=10**9, bytes_analytic=10**8, **PROBES),  # 0.001: far below
        synthetic_row("qna", 9, latency_s=0.01, flops=10**9, bytes_analytic=None, **PROBES),
        synthetic_row("qna", 11, latency_s=0.01, flops=10**9, bytes_analytic=10**8),
        synthetic_row("qna", 13, status="oom", flops=10**9, bytes_analytic=10**8, **PROBES),
    ]
    points = roofline.roofline_frame(frame_of(rows))
    assert list(points["window"]) == [3, 5, 7]
    assert list(roofline.above_roof(points)["window"]) == [5]
    assert list(roofline.far_below(points)["window"]) == [7]
    typical = roofline.typical_fractions(points).iloc[0]
    assert typical["points"] == 3 and typical["median"] == pytest.approx(1.0)


def test_a_frame_from_before_the_probes_has_no_roofline(frame_of):
    assert roofline.roofline_frame(frame_of([synthetic_row("qna", 3, latency_s=0.01)])).empty


@pytest.mark.parametrize("path", committed_results(results.RESULTS_FILE), ids=lambda p: str(p.parent.relative_to(REPO)))
def test_no_committed_point_lies_more_than_ten_percent_above_its_roof(path):
    above = roofline.above_roof(analyse(results.read_results(path)).roofline)
    assert above.empty, above[["layer", "mode", "window", "roof_fraction"]].to_string()


def _sweep_rows() -> list[dict]:
    """QnA and Swin at k = 3, 5 in both modes, every point at half its roof but QnA train k=5 (1%),
    which has a profile."""
    rows = []
    for layer in ("qna", "swin"):
        for mode in ("forward", "train"):
            for window in (3, 5):
                fraction = 0.01 if (layer, mode, window) == ("qna", "train", 5) else 0.5
                # intensity 2 → memory roof 20 GFLOP/s; 1e9 FLOPs at fraction f of it take 0.05 / f s
                rows.append(synthetic_row(
                    layer, window, mode, latency_s=0.05 / fraction, flops=10**9, bytes_analytic=5 * 10**8,
                    profile_file="profiles/p.md" if fraction < 0.1 else None, **PROBES,
                ))
    return rows


def test_the_report_section_gives_each_layers_fraction_and_links_the_far_below_points(frame_of):
    from qna_bench import report

    text = report.roofline_section(report.analyse(frame_of(_sweep_rows())))
    assert "100.0 GFLOP/s, DRAM 10.0 GB/s (DRAM ridge at 10.0 FLOP/byte)" in text
    assert "| qna | train | DRAM | 50.0% | 1.0% | 25.5% |" in text
    assert "| qna | train | 16×16, C=8, 2 heads (P1) | 5 | 1.0% | 0.20 | 2.0 | [profile](profiles/p.md) |" in text
    assert "above their roof" not in text
    assert report.roofline_section(report.analyse(frame_of([synthetic_row("qna", 3, latency_s=0.01)]))) == ""


def test_the_roofline_figure_is_log_log_with_both_roofs_units_and_a_legend_outside(frame_of, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from qna_bench import plots

    frame = frame_of(_sweep_rows())
    figure = plots.roofline_figure(frame)
    (ax,) = [ax for ax in figure.axes if ax.has_data()]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert "FLOP/byte" in ax.get_xlabel() and "GFLOP/s" in ax.get_ylabel()
    (roof,) = ax.get_lines()
    assert list(roof.get_ydata())[1:] == [100.0, 100.0]  # the compute roof, from the ridge on
    assert roof.get_xdata()[1] == pytest.approx(10.0)  # the ridge: peak / bandwidth
    assert sum(len(c.get_offsets()) for c in ax.collections) == 8  # a marker per layer, mode and window
    legend = figure.legends[0]
    renderer = FigureCanvasAgg(figure).get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    path = tmp_path / "roofline.png"
    figure.savefig(path, dpi=90)
    assert path.stat().st_size < 200_000
    assert plots.roofline_figure(frame_of([synthetic_row("qna", 3, latency_s=0.01)])) is None


def test_the_roofline_figure_draws_a_roof_per_probed_memory_level(frame_of):
    from qna_bench import plots

    rows = [synthetic_row("conv_dw", k, latency_s=0.001 * k, flops=2**20 * k, bytes_analytic=2**20 * k, **CACHE_PROBES)
            for k in (1, 9, 41)]
    figure = plots.roofline_figure(frame_of(rows))
    (ax,) = [ax for ax in figure.axes if ax.has_data()]
    roofs = ax.get_lines()
    assert [line.get_linestyle() for line in roofs] == [":", "--", "-"]  # L2, LLC, DRAM
    assert [line.get_xdata()[1] for line in roofs] == pytest.approx([1.25, 2.5, 10.0])  # each level's ridge
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert {"L2 roof", "LLC roof", "DRAM roof"} <= set(labels)


def test_a_profiled_sweep_rows_carry_the_probes_bytes_and_profiles_and_draw_the_roofline(tmp_path):
    from test_cli import FAST, run_cli

    done = run_cli("layers=conv_dw", "windows=3", *FAST, "measure.profile=true", f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert "profiler_start" not in done.stderr
    frame = results.read_results(tmp_path / results.RESULTS_FILE)
    assert len(frame) == 2 and (frame["peak_flops_probe"] > 0).all() and (frame["peak_bytes_per_s_probe"] > 0).all()
    assert frame["probe_method"].nunique() == 1  # one probe per run, shared by its points
    assert (frame["bytes_analytic"] > 0).all()
    for name in frame["profile_file"]:
        assert (tmp_path / name).read_text().startswith("# conv_dw")
    assert (tmp_path / "roofline.png").stat().st_size < 200_000
    assert "## Roofline" in (tmp_path / "report.md").read_text()
