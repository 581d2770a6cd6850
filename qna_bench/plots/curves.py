"""The figures against the window: latency and memory curves, each layer's ratio to QnA, and the headline
(QnA against the strongest attention peer).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qna_bench.analysis import (
    CLAIMED_MEMORY_FACTOR,
    CLAIMED_SPEED_FACTOR,
    PEER,
    SETTING_COLUMNS,
    Analysis,
    settings,
    shown_by_default,
    sort_rows,
    strongest,
)
from qna_bench.plots.style import (
    FONT,
    MODE_COLOURS,
    MODE_MARKERS,
    NO_NUMBER,
    _analysed,
    _devices,
    _figure,
    _finish,
    _layer_label,
    _layer_styles,
    _log_ticks,
    _many_contexts,
    _panels,
    _style_axes,
    shape_title,
)
from qna_bench.text import MIB


def _selected(rows: pd.DataFrame, column: str, every_layer: bool, frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ``rows`` a default figure of ``column`` draws: QnA, each family's best and the best baseline,
    chosen over ``frame`` (default: the rows themselves)."""
    if every_layer:
        return rows
    chosen = shown_by_default(rows if frame is None else frame, column)
    return rows.merge(chosen, on=[*SETTING_COLUMNS, "mode", "layer"], how="inner")


def _rest(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Whether a companion figure has anything to add: rows of layers the default figure leaves out."""
    return frame.merge(shown_by_default(frame, column), on=[*SETTING_COLUMNS, "mode", "layer"], how="left",
                       indicator=True).query("_merge == 'left_only'")


def _metric_figure(
    source: Analysis | pd.DataFrame,
    column: str,
    value: Callable[[pd.DataFrame], pd.Series],
    band: Callable[[pd.DataFrame], tuple[pd.Series, pd.Series]] | None,
    ylabel: str,
    title: str,
    every_layer: bool,
) -> Figure | None:
    frame = _analysed(source).layers
    styles = _layer_styles(frame)  # the whole frame, so each layer keeps its colour across figures
    many_devices = _many_contexts(frame)
    panels = _panels(_selected(frame, column, every_layer))
    if not panels:
        return None
    fig, axes = _figure(len(panels), ncols=2)
    for ax, (shape, mode, panel) in zip(axes, panels):
        plotted = False
        for layer, rows in sort_rows(panel, ["role", "layer"]).groupby("layer", sort=False):
            rows = rows.sort_values("window")
            values = value(rows)
            ok = rows[(rows["status"] == "ok") & values.notna()]
            failed = rows[(rows["status"] != "ok") | values.isna()]
            style = styles[layer]
            label = _layer_label(layer, rows["role"].iloc[0], rows["family"].iloc[0])
            if len(ok):
                plotted = True
                ax.plot(ok["window"], value(ok).astype(float), marker="o", ms=3, label=label, **style)
                if band is not None:
                    low, high = band(ok)
                    ax.fill_between(
                        ok["window"], low.astype(float), high.astype(float), color=style["color"], alpha=0.15, linewidth=0
                    )
            if len(failed):
                # Points without a number sit on the bottom edge, so a missing line is never mistaken for a fast one.
                ax.scatter(
                    failed["window"], [0.02] * len(failed), marker="x", color=style["color"],
                    transform=ax.get_xaxis_transform(), clip_on=False,
                    label=NO_NUMBER,
                )
        if plotted:
            ax.set_yscale("log")
            _log_ticks(ax.yaxis)
        else:
            ax.text(0.5, 0.5, "no ok point", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_yticks([])
        _style_axes(ax, f"{mode}: {shape_title(shape, many_devices)}", "window k (k×k; Swin: M×M window)", ylabel)
        ax.set_xticks(sorted(panel["window"].unique()))
    which = "every layer" if every_layer else "QnA, each family's best, the best baseline"
    return _finish(fig, axes, len(panels), f"{title} ({which}) — {_devices(frame)}")


def latency_figure(source: Analysis | pd.DataFrame, every_layer: bool = False) -> Figure | None:
    """Median latency vs window (band: q25–q75), log y."""
    return _metric_figure(
        source, "median_s",
        lambda f: f["median_s"] * 1e3,
        lambda f: (f["q25_s"] * 1e3, f["q75_s"] * 1e3),
        "median latency (ms, log; band q25–q75)",
        "Latency vs window", every_layer,
    )


def memory_figure(source: Analysis | pd.DataFrame, every_layer: bool = False) -> Figure | None:
    """Peak memory above inputs vs window, log y."""
    return _metric_figure(
        source, "peak_bytes",
        lambda f: f["peak_bytes"].astype("Float64") / MIB,
        None,
        "peak memory above inputs (MiB, log)",
        "Peak memory vs window", every_layer,
    )


RATIO_AXES = (
    ("latency_ratio", "median_s", "latency", CLAIMED_SPEED_FACTOR, "faster"),
    ("memory_ratio", "peak_bytes", "peak memory", CLAIMED_MEMORY_FACTOR, "leaner"),
)


CLAIM_NAMES = {"latency": "speed", "peak memory": "memory"}


def _claim_lines(ax: Axes, claim: float, noun: str) -> None:
    ax.axhspan(1e-3, 1.0, color="tab:red", alpha=0.06, linewidth=0)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="parity (1×): below, QnA loses")
    ax.axhline(claim, color="tab:red", linewidth=1.2, linestyle="-.", label=f"claimed {CLAIM_NAMES[noun]} factor ({claim:g}×)")
    ax.set_yscale("log")


def _ratio_limits(ax: Axes, values: list[float], claim: float) -> None:
    """Y limits that hold the data, parity and the claim; ticks written as factors."""
    finite = [v for v in values if v == v and v > 0]
    ax.set_ylim(min([*finite, 1.0]) / 1.5, max([*finite, claim]) * 1.5)
    _log_ticks(ax.yaxis, "×")


def ratio_figure(source: Analysis | pd.DataFrame, every_layer: bool = False) -> Figure | None:
    """Each shown layer's latency and memory divided by QnA's at the same point, with the claimed factors."""
    analysis = _analysed(source)
    frame, ratios = analysis.layers, analysis.ratios
    panels = _panels(ratios)
    if not panels:
        return None
    styles = _layer_styles(frame)
    many_devices = _many_contexts(frame)
    fig, axes = _figure(2 * len(panels), ncols=2)
    for i, (shape, mode, panel) in enumerate(panels):
        for ax, (column, metric, noun, claim, verb) in zip(axes[2 * i: 2 * i + 2], RATIO_AXES):
            shown = _selected(panel, metric, every_layer, frame)
            several = shown["subject"].nunique() > 1
            drawn = []
            for (layer, subject), rows in sort_rows(shown, ["role", "layer"]).groupby(["layer", "subject"], sort=False):
                rows = rows[rows[column].notna()].sort_values("window")
                if len(rows):
                    name = _layer_label(layer, rows["role"].iloc[0], rows["family"].iloc[0])
                    ax.plot(rows["window"], rows[column].astype(float), marker="o", ms=3,
                            label=f"{name} / {subject}" if several else name, **styles[layer])
                    drawn += list(rows[column].astype(float))
            _claim_lines(ax, claim, noun)
            _ratio_limits(ax, drawn, claim)
            _style_axes(ax, f"{mode}, {noun}: {shape_title(shape, many_devices)}", "window k",
                        f"{noun} / QnA's (log; above 1: QnA {verb})")
            ax.set_xticks(sorted(panel["window"].unique()))
    return _finish(fig, axes, 2 * len(panels), f"Each layer relative to QnA — {_devices(frame)}")


def headline_figure(source: Analysis | pd.DataFrame) -> Figure | None:
    """QnA against the strongest attention peer at each window: that peer's latency and peak memory over
    QnA's, one row of panels per problem shape, forward and train as two lines, the round-to-round spread
    as error bars, the claimed factor and parity marked. None without a peer paired with QnA."""
    analysis = _analysed(source)
    frame, ratios = analysis.layers, analysis.ratios
    peers = ratios[ratios["role"] == PEER]
    if not len(peers):
        return None
    many_devices = _many_contexts(frame)
    shapes = settings(peers)
    fig, axes = _figure(2 * len(shapes), ncols=2)
    for i, (shape, rows) in enumerate(shapes):
        for ax, (column, _, noun, claim, verb) in zip(axes[2 * i: 2 * i + 2], RATIO_AXES):
            drawn, versus = [], []
            for (subject, mode), here in rows.groupby(["subject", "mode"], sort=True):
                best = strongest(here, column).sort_values("window")
                if not len(best):
                    continue
                y = best[column].astype(float)
                label = mode if rows["subject"].nunique() == 1 else f"{mode}, {subject}"
                counts = best["layer"].value_counts().sort_index()
                versus.append(f"{label}: " + ", ".join(f"{layer} ×{n}" for layer, n in counts.items()))
                error = None
                if column == "latency_ratio":
                    error = [(y - best["latency_ratio_min"].astype(float)).clip(lower=0),
                             (best["latency_ratio_max"].astype(float) - y).clip(lower=0)]
                ax.errorbar(best["window"], y, yerr=error, marker=MODE_MARKERS.get(mode, "s"), ms=4, capsize=2,
                            color=MODE_COLOURS.get(mode, "tab:green"), linewidth=1.4, label=label)
                drawn += list(y)
                if column == "latency_ratio":
                    drawn += list(best["latency_ratio_min"].astype(float)) + list(best["latency_ratio_max"].astype(float))
            _claim_lines(ax, claim, noun)
            _ratio_limits(ax, drawn, claim)
            _style_axes(ax, f"{noun}: {shape_title(shape, many_devices)}", "window k",
                        f"strongest peer's {noun} / QnA's (log)\nabove 1: QnA {verb}")
            ax.set_xlabel("window k\nstrongest peer (windows): " + "; ".join(versus), fontsize=FONT - 1, wrap=True)
            ax.set_xticks(sorted(rows["window"].unique()))
    return _finish(fig, axes, 2 * len(shapes),
                   f"QnA against the strongest attention peer at each window (bars: min–max over rounds) — "
                   f"{_devices(frame)}")
