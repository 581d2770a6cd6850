"""The figures, drawn from synthetic results files: by default QnA, each family's leader and
the best baseline, the rest in the ``_all`` companions; the headline figure with the claim, parity and the
spread over rounds; legends right of the panels; every PNG under 200 KB; whole models in their own figure."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from test_report import WINDOWS, claims_rows, model_rows, power_law_rows, synthetic_row

from qna_bench import plots, results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 200_000


def family_rows() -> list[dict]:
    """The claims file plus swin_fused, faster than swin at every window but twice its memory, so the
    default latency panels show swin_fused and the default memory panels swin."""
    rows = claims_rows()
    rows += power_law_rows("swin_fused", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("swin_fused", "train", (0.5e-3, 1.0), (2000, 1.0))
    return rows


@pytest.fixture(scope="module")
def claims_frame(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "results.parquet"
    results.append_rows(path, family_rows())
    return path, results.read_results(path)


def _labels(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def _line_labels(ax) -> set[str]:
    return {line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_cli_writes_every_figure_next_to_the_parquet_each_under_200_kb(claims_frame, capsys):
    path, _ = claims_frame
    plots.main([str(path)])
    written = [Path(p) for p in capsys.readouterr().out.split()]
    names = ("headline", "latency", "latency_all", "memory", "memory_all", "ratio_to_qna", "pareto")
    assert written == [path.parent / f"{n}.png" for n in names]
    for figure in written:
        data = figure.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and 5_000 < len(data) < MAX_PNG_BYTES


def test_default_panels_show_qna_each_familys_best_and_the_best_baseline_and_the_companion_the_rest(claims_frame):
    _, frame = claims_frame
    forward = plots.latency_figure(frame).axes[0]
    assert _line_labels(forward) == {"qna (under test)", "sasa", "swin_fused (swin)", "conv_dw (baseline)"}
    memory = plots.memory_figure(frame).axes[0]
    assert _line_labels(memory) == {"qna (under test)", "sasa", "swin", "conv_dw (baseline)"}
    companion = plots.latency_figure(frame, every_layer=True)
    assert "every layer" in companion.get_suptitle()
    assert _line_labels(companion.axes[0]) == {
        "qna (under test)", "qna_reference (reference)", "sasa", "swin", "swin_fused (swin)", "conv_dw (baseline)",
    }


def test_legends_sit_right_of_every_panel(claims_frame):
    _, frame = claims_frame
    for figure in (plots.latency_figure(frame), plots.headline_figure(frame), plots.ratio_figure(frame),
                   plots.pareto_figure(frame)):
        canvas = FigureCanvasAgg(figure)
        canvas.draw()  # the constrained layout places the panels and the legend when drawn
        renderer = canvas.get_renderer()
        (legend,) = figure.legends
        panels = [ax for ax in figure.axes if ax.get_visible() and ax.has_data()]
        assert not any(ax.get_legend() for ax in panels)
        assert legend.get_window_extent(renderer).x0 >= max(ax.get_window_extent(renderer).x1 for ax in panels)


def test_the_headline_figure_draws_the_strongest_peer_over_qna_with_claim_parity_and_round_spread():
    rounds = [1.0, 1.0, 1.0]
    rows = [{**r, "round_medians_s": [r["median_s"] * f for f in rounds], "rounds": 3}
            for r in power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))]
    # Swin is 2× slower than QnA over the rounds (their geometric mean), 1.5× and 8/3× in two of them;
    # SASA is slower still.
    rows += [{**r, "round_medians_s": [r["median_s"] * f for f in (0.75, 1.0, 4 / 3)], "rounds": 3}
             for r in power_law_rows("swin", "forward", (2e-3, 1.0), (3000, 1.0))]
    rows += [{**r, "round_medians_s": [r["median_s"]] * 3, "rounds": 3}
             for r in power_law_rows("sasa", "forward", (1e-2, 1.0), (1500, 1.0))]
    frame = results.rows_to_table(rows).to_pandas(types_mapper=results._PANDAS_TYPES.get)
    latency, memory = plots.headline_figure(frame).axes[:2]
    for ax, claim in ((latency, 5.0), (memory, 10.0)):
        flat = {line.get_ydata()[0]: line.get_linestyle() for line in ax.get_lines() if len(set(line.get_ydata())) == 1}
        assert flat.get(claim) == "-." and flat.get(1.0) == "--"
        assert ax.get_yscale() == "log" and "window k" in ax.get_xlabel()
    assert "swin ×5" in latency.get_xlabel() and "sasa ×5" in memory.get_xlabel()
    (data,) = [line for line in latency.get_lines() if line.get_marker() == plots.MODE_MARKERS["forward"]]
    assert list(data.get_ydata()) == pytest.approx([2.0] * len(WINDOWS))
    (bars,) = [c for c in latency.collections if len(c.get_segments()) == len(WINDOWS)]
    assert [tuple(s[:, 1]) for s in bars.get_segments()] == [pytest.approx((1.5, 8 / 3))] * len(WINDOWS)


def test_ratio_figure_marks_parity_and_the_claimed_factors(claims_frame):
    _, frame = claims_frame
    figure = plots.ratio_figure(frame)
    latency, memory = figure.axes[0], figure.axes[1]
    assert {line.get_ydata()[0] for line in latency.get_lines() if line.get_linestyle() == "-."} == {5.0}
    assert {line.get_ydata()[0] for line in memory.get_lines() if line.get_linestyle() == "-."} == {10.0}
    sasa = next(line for line in memory.get_lines() if line.get_label() == "sasa")
    assert list(sasa.get_ydata()) == pytest.approx([3, 5, 7, 9, 11])


def test_pareto_has_one_series_per_shown_layer_with_its_end_windows_labelled(claims_frame):
    _, frame = claims_frame
    figure = plots.pareto_figure(frame)
    forward, train = [ax for ax in figure.axes if ax.get_visible() and ax.has_data()]
    assert forward.get_xscale() == forward.get_yscale() == "log"
    assert "ms" in forward.get_xlabel() and "MiB" in forward.get_ylabel()
    assert forward.get_title().startswith("forward: B=1, 16×16")
    assert "cpu: synthetic" in figure.get_suptitle()
    assert _labels(figure) == ["qna (under test)", "sasa", "swin_fused (swin)", "conv_dw (baseline)"]
    assert len(forward.get_lines()) == 4
    assert sorted(t.get_text() for t in forward.texts) == sorted(["3", "11"] * 4)
    # In train mode SASA stopped at k=9 (oom): its last label is 9.
    assert "9" in [t.get_text() for t in train.texts] and len(train.get_lines()) == 4


def test_a_layer_keeps_its_colour_across_figures(claims_frame):
    _, frame = claims_frame
    colours = []
    for figure in (plots.latency_figure(frame), plots.latency_figure(frame, every_layer=True), plots.ratio_figure(frame)):
        line = next(line for line in figure.axes[0].get_lines() if line.get_label() == "sasa")
        colours.append(to_hex(line.get_color()))
    pareto = plots.pareto_figure(frame).axes[0]
    colours.append(to_hex(next(c for c in pareto.collections if c.get_label() == "sasa").get_facecolor()[0]))
    assert len(set(colours)) == 1


def test_failed_points_are_marked_not_dropped(claims_frame):
    _, frame = claims_frame
    figure = plots.latency_figure(frame)
    train = figure.axes[1]
    marked = {to_hex(c.get_facecolor()[0]) for c in train.collections if c.get_label() == plots.NO_NUMBER}
    styles = plots._layer_styles(plots.analyse(frame).layers)
    # NA has no number at any window, yet it stands for its family; SASA ran out of memory at k=11.
    assert {to_hex(styles["na"]["color"]), to_hex(styles["sasa"]["color"])} <= marked
    assert any(label.startswith("× on the bottom edge: no number") for label in _labels(figure))


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


def test_a_models_run_draws_only_the_models_figure(tmp_path):
    path = tmp_path / "results.parquet"
    results.append_rows(path, model_rows())
    assert [p.name for p in plots.draw_figures(path)] == ["models.png"]
    throughput, memory = plots.models_figure(results.read_results(path)).axes[:2]
    widths = {round(bar.get_width(), 6) for bar in throughput.patches}
    assert {20.0, 5.0, 10.0} <= widths  # images/s: 4 / 0.2 s forward, 4 / 0.8 s train, 4 / 0.4 s forward
    assert "unsupported" in [t.get_text().strip() for t in throughput.texts]
    assert "MiB" in memory.get_xlabel() and "images/s" in throughput.get_xlabel()
