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
    points = roofline.roofline_frame(results.read_results(path))
    above = roofline.above_roof(points)
    assert above.empty, above[["layer", "mode", "window", "roof_fraction"]].to_string()
