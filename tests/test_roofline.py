"""The roofline columns from a results frame: achieved rates, intensity and the fraction of the roof,
computed from stored columns; and no committed point lies more than 10% above its roof."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_report import synthetic_row

from qna_bench import results, roofline

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
    assert point["bound"] == "memory"


def test_a_compute_bound_point_is_measured_against_the_peak_and_the_closed_form_stands_in_for_the_counter(frame_of):
    # The counter saw nothing (flex attention): the closed form's 5e10 FLOPs over 1e9 bytes, in 1 s.
    row = synthetic_row(
        "swin", 7, latency_s=1.0, flops=None, flops_analytic=50_000_000_000, bytes_analytic=1_000_000_000, **PROBES
    )
    point = roofline.roofline_frame(frame_of([row])).iloc[0]
    assert point["intensity"] == pytest.approx(50.0) and point["bound"] == "compute"
    assert point["roof_flops_per_s"] == pytest.approx(PEAK_FLOPS)
    assert point["roof_fraction"] == pytest.approx(0.5)


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


@pytest.mark.parametrize("path", sorted(REPO.glob("results/**/results.parquet")), ids=lambda p: p.parent.name)
def test_no_committed_point_lies_more_than_ten_percent_above_its_roof(path):
    frame = results.read_results(path)
    points = roofline.roofline_frame(frame)
    above = roofline.above_roof(points)
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
    assert "100.0 GFLOP/s, 10.0 GB/s (ridge at 10.0 FLOP/byte)" in text
    assert "| qna | train | memory | 50.0% | 1.0% | 25.5% |" in text
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
