"""The figures, drawn from a synthetic results file: every figure written and non-empty, one line per
layer, the Pareto view labelled by window, the CLI unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.colors import to_hex
from test_report import claims_rows, power_law_rows, synthetic_row

from qna_bench import plots, results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def claims_frame(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "results.parquet"
    results.append_rows(path, claims_rows())
    return path, results.read_results(path)


def test_cli_writes_every_figure_next_to_the_parquet(claims_frame, capsys):
    path, _ = claims_frame
    plots.main([str(path)])
    written = [Path(p) for p in capsys.readouterr().out.split()]
    assert written == [path.parent / f"{n}.png" for n in ("latency", "memory", "ratio_to_qna", "pareto")]
    for figure in written:
        data = figure.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_pareto_has_one_series_per_layer_labelled_by_window(claims_frame):
    _, frame = claims_frame
    figure = plots.pareto_figure(frame)
    forward, train = [ax for ax in figure.axes if ax.get_visible() and ax.has_data()]
    assert forward.get_xscale() == forward.get_yscale() == "log"
    assert "ms" in forward.get_xlabel() and "MiB" in forward.get_ylabel()
    assert forward.get_title().startswith("forward: B=1, 16×16")
    assert "cpu: synthetic" in figure.get_suptitle()
    labels = [text.get_text() for text in forward.get_legend().get_texts()]
    assert labels == ["conv_dw (baseline)", "qna (under test)", "qna_reference (reference)", "sasa", "swin"]
    assert len(forward.get_lines()) == 5
    assert sorted(t.get_text() for t in forward.texts) == sorted(str(k) for k in range(3, 12, 2) for _ in range(5))
    # In train mode SASA stopped at k=9 (oom) and NA never ran: no point, no label.
    assert "9" in [t.get_text() for t in train.texts] and len(train.get_lines()) == 4


def test_ratio_figure_marks_parity_and_the_claimed_factors(claims_frame):
    _, frame = claims_frame
    figure = plots.ratio_figure(frame)
    latency, memory = figure.axes[0], figure.axes[1]
    assert {line.get_ydata()[0] for line in latency.get_lines() if line.get_linestyle() == "-."} == {5.0}
    assert {line.get_ydata()[0] for line in memory.get_lines() if line.get_linestyle() == "-."} == {10.0}
    sasa = next(line for line in memory.get_lines() if line.get_label() == "sasa")
    assert list(sasa.get_ydata()) == pytest.approx([3, 5, 7, 9, 11])


def test_a_layer_keeps_its_colour_across_figures(claims_frame):
    _, frame = claims_frame
    colours = []
    for figure in (plots.latency_figure(frame), plots.ratio_figure(frame)):
        line = next(line for line in figure.axes[0].get_lines() if line.get_label() == "sasa")
        colours.append(to_hex(line.get_color()))
    pareto = plots.pareto_figure(frame).axes[0]
    colours.append(to_hex(next(c for c in pareto.collections if c.get_label() == "sasa").get_facecolor()[0]))
    assert len(set(colours)) == 1


def test_failed_points_are_marked_not_dropped(claims_frame):
    _, frame = claims_frame
    train = plots.latency_figure(frame).axes[1]
    labels = [text.get_text() for text in train.get_legend().get_texts()]
    assert "na: unsupported (×)" in labels and "sasa: oom (×)" in labels


def test_without_qna_there_is_no_ratio_figure_and_without_ok_rows_no_pareto(tmp_path):
    path = tmp_path / "results.parquet"
    results.append_rows(path, power_law_rows("sasa", "forward", (1e-3, 2.0), (1000, 2.0)))
    assert [p.name for p in plots.draw_figures(path)] == ["latency.png", "memory.png", "pareto.png"]
    failed = tmp_path / "failed" / "results.parquet"
    results.append_rows(failed, [synthetic_row("sasa", 3, status="oom", reason="out of memory"),
                                 synthetic_row("qna", 3, status="error", reason="boom")])
    assert [p.name for p in plots.draw_figures(failed)] == ["latency.png", "memory.png"]


def test_rows_at_another_thread_count_get_their_own_panel_never_a_shared_line(tmp_path):
    path = tmp_path / "results.parquet"
    results.append_rows(path, power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0)))
    results.append_rows(path, [synthetic_row("qna", 3, "forward", 9.0, 10**9, threads=1,
                                             timestamp="2027-01-01T00:00:00+00:00")])
    frame = results.read_results(path)
    figure = plots.latency_figure(frame)
    panels = [ax for ax in figure.axes if ax.has_data()]
    assert len(panels) == 2
    assert sorted(len(ax.get_lines()[0].get_xdata()) for ax in panels) == [1, 5]
