"""Figures from a results parquet only (never re-measures): latency and peak memory against window,
each layer's ratio to QnA, and a latency–memory Pareto view. One panel per (problem shape, mode), one
line per layer.

    python -m qna_bench.plots RESULTS.parquet [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qna_bench.results import read_results

REFERENCE_LAYER = "qna"
CONV_FAMILY = "conv"
QNA_FAMILY = "qna"
# What makes two rows the same problem (with mode and window): the report's ratios use the same key.
SHAPE_COLUMNS = ["device_name", "dtype", "batch", "height", "width", "channels", "heads", "stride", "dilation"]
POINT_COLUMNS = ["layer", *SHAPE_COLUMNS, "mode", "window"]
MODE_ORDER = ("forward", "train")
# The abstract's factors: "up-to x10 less memory while being up-to x5 faster".
CLAIMED_MEMORY_FACTOR = 10.0
CLAIMED_SPEED_FACTOR = 5.0
MIB = 2**20


def shape_title(shape: dict, with_device: bool = False) -> str:
    return (
        (f"{shape['device_name']}: " if with_device else "")
        + f"B={shape['batch']}, {shape['height']}×{shape['width']}, C={shape['channels']}, "
        f"{shape['heads']} heads, {shape['dtype']}"
        + (f", stride {shape['stride']}" if shape["stride"] != 1 else "")
        + (f", dilation {shape['dilation']}" if shape["dilation"] != 1 else "")
    )


def mode_order(modes) -> list[str]:
    """Modes in reading order: forward, train, then any others alphabetically."""
    modes = set(modes)
    return [m for m in MODE_ORDER if m in modes] + sorted(modes - set(MODE_ORDER))


def latest_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, problem, mode, window): where a merged file measured a point twice (another
    thread count or torch version), the latest row wins, so lines and ratios never mix two runs."""
    order = frame.assign(_ts=frame["timestamp"].fillna(""), _key=frame["point_key"].fillna(""))
    order = order.sort_values(["_ts", "_key"], kind="mergesort")
    kept = order.drop_duplicates(POINT_COLUMNS, keep="last").drop(columns=["_ts", "_key"])
    return kept.sort_values(POINT_COLUMNS, kind="mergesort").reset_index(drop=True)


def ratio_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Each measured non-QnA row with its latency and memory divided by QnA's at the same problem, mode and
    window (``latency_ratio`` = layer median_s / QnA median_s; above 1: QnA is faster / leaner;
    ``latency_ratio_low`` = layer q25_s / QnA q75_s, the ratio the timing spread still supports)."""
    keys = SHAPE_COLUMNS + ["mode", "window"]
    rows = latest_rows(frame)
    # A `timeout` row stopped after its memory pass: its peak memory is a full measurement, its latency is not.
    rows = rows[rows["status"].isin(["ok", "timeout"])]
    reference = rows[rows["layer"] == REFERENCE_LAYER][keys + ["status", "median_s", "q25_s", "q75_s", "peak_bytes"]]
    merged = rows[rows["layer"] != REFERENCE_LAYER].merge(reference, on=keys, suffixes=("", "_qna"))
    both_ok = (merged["status"] == "ok") & (merged["status_qna"] == "ok")
    latency = merged["median_s"].astype("Float64").where(both_ok)
    latency_qna = merged["median_s_qna"].astype("Float64").where(both_ok)
    peak = merged["peak_bytes"].astype("Float64")
    peak_qna = merged["peak_bytes_qna"].astype("Float64")
    merged["latency_ratio"] = (latency / latency_qna).where((latency > 0) & (latency_qna > 0))
    merged["memory_ratio"] = (peak / peak_qna).where((peak > 0) & (peak_qna > 0))
    # A cautious speed ratio: the layer's fast quartile against QnA's slow one.
    low, high_qna = merged["q25_s"].astype("Float64").where(both_ok), merged["q75_s_qna"].astype("Float64").where(both_ok)
    merged["latency_ratio_low"] = (low / high_qna).where((low > 0) & (high_qna > 0))
    return merged.sort_values(POINT_COLUMNS, kind="mergesort").reset_index(drop=True)


def _panels(frame: pd.DataFrame) -> list[tuple[dict, str, pd.DataFrame]]:
    panels = []
    for shape_values, shape_frame in frame.groupby(SHAPE_COLUMNS, sort=True, dropna=False):
        shape = dict(zip(SHAPE_COLUMNS, shape_values))
        for mode in mode_order(shape_frame["mode"].unique()):
            panels.append((shape, mode, shape_frame[shape_frame["mode"] == mode]))
    return panels


def _layer_styles(frame: pd.DataFrame) -> dict[str, dict]:
    """Line style per layer, stable across figures: QnA thick black, its other forms dashed black-grey,
    convolutions dotted, attention peers solid in colour."""
    families = frame.drop_duplicates("layer").set_index("layer")["family"].to_dict()
    peers = sorted(layer for layer, family in families.items() if family not in (QNA_FAMILY, CONV_FAMILY))
    convs = sorted(layer for layer, family in families.items() if family == CONV_FAMILY)
    cmap = matplotlib.colormaps["tab10" if len(peers) <= 10 else "tab20"]
    conv_cmap = matplotlib.colormaps["Greys"]
    styles: dict[str, dict] = {}
    for layer, family in families.items():
        if layer == REFERENCE_LAYER:
            styles[layer] = dict(color="black", linewidth=2.6, linestyle="-", zorder=5)
        elif family == QNA_FAMILY:
            styles[layer] = dict(color="dimgray", linewidth=1.6, linestyle="--", zorder=4)
        elif family == CONV_FAMILY:
            shade = 0.45 + 0.4 * convs.index(layer) / max(len(convs), 1)
            styles[layer] = dict(color=conv_cmap(shade), linewidth=1.4, linestyle=":", zorder=3)
        else:
            styles[layer] = dict(color=cmap(peers.index(layer) % cmap.N), linewidth=1.5, linestyle="-", zorder=3)
    return styles


def _layer_label(layer: str, family: str) -> str:
    if layer == REFERENCE_LAYER:
        return "qna (under test)"
    if family == QNA_FAMILY:
        return f"{layer} (QnA naive form)" if layer == "qna_reference" else f"{layer} (QnA variant)"
    if family == CONV_FAMILY:
        return f"{layer} (conv)"
    return layer if family == layer else f"{layer} ({family})"


def _figure(n_panels: int, ncols: int, panel_size=(6.4, 4.6)) -> tuple[Figure, list[Axes]]:
    ncols = min(ncols, n_panels)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _devices(frame: pd.DataFrame) -> str:
    return ", ".join(sorted(frame["device_name"].dropna().unique()))


def _finish(fig: Figure, axes: list[Axes], used: int, title: str) -> Figure:
    for ax in axes[used:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # a strip for the title, however tall
    return fig


def _metric_figure(
    frame: pd.DataFrame,
    value: Callable[[pd.DataFrame], pd.Series],
    band: Callable[[pd.DataFrame], tuple[pd.Series, pd.Series]] | None,
    ylabel: str,
    title: str,
) -> Figure | None:
    frame = latest_rows(frame)
    panels = _panels(frame)
    if not panels:
        return None
    styles = _layer_styles(frame)
    many_devices = frame["device_name"].nunique() > 1
    fig, axes = _figure(len(panels), ncols=2)
    for ax, (shape, mode, panel) in zip(axes, panels):
        plotted = False
        for layer, rows in panel.groupby("layer", sort=True):
            rows = rows.sort_values("window")
            values = value(rows)
            ok = rows[(rows["status"] == "ok") & values.notna()]
            failed = rows[(rows["status"] != "ok") | values.isna()]
            style = styles[layer]
            label = _layer_label(layer, rows["family"].iloc[0])
            if len(ok):
                plotted = True
                ax.plot(ok["window"], value(ok).astype(float), marker="o", ms=4, label=label, **style)
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
                    label=f"{layer}: {', '.join(sorted({s if s != 'ok' else 'no value' for s in failed['status']}))} (×)",
                )
        if plotted:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no ok point", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_yticks([])
        ax.set_xlabel("window k (k×k neighbourhood; Swin: M×M window)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{mode}: {shape_title(shape, many_devices)}", fontsize=10)
        ax.set_xticks(sorted(panel["window"].unique()))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _finish(fig, axes, len(panels), f"{title} — {_devices(frame)}")


def latency_figure(frame: pd.DataFrame) -> Figure | None:
    """Median latency vs window (band: q25–q75), log y."""
    return _metric_figure(
        frame,
        lambda f: f["median_s"] * 1e3,
        lambda f: (f["q25_s"] * 1e3, f["q75_s"] * 1e3),
        "median latency (ms, log scale; band: q25–q75)",
        "Latency vs window",
    )


def memory_figure(frame: pd.DataFrame) -> Figure | None:
    """Peak memory above inputs vs window, log y."""
    return _metric_figure(
        frame,
        lambda f: f["peak_bytes"].astype("Float64") / MIB,
        None,
        "peak memory above inputs (MiB, log scale)",
        "Peak memory vs window",
    )


def ratio_figure(frame: pd.DataFrame) -> Figure | None:
    """Each layer's latency and memory divided by QnA's at the same point, with the claimed factors."""
    ratios = ratio_frame(frame)
    panels = _panels(ratios)
    if not panels:
        return None
    styles = _layer_styles(frame)  # the whole frame, so each layer keeps its colour across figures
    many_devices = ratios["device_name"].nunique() > 1
    fig, axes = _figure(2 * len(panels), ncols=2)
    for i, (shape, mode, panel) in enumerate(panels):
        for ax, column, label, claim in (
            (axes[2 * i], "latency_ratio", "median latency / QnA's (×, log scale)", CLAIMED_SPEED_FACTOR),
            (axes[2 * i + 1], "memory_ratio", "peak memory / QnA's (×, log scale)", CLAIMED_MEMORY_FACTOR),
        ):
            for layer, rows in panel.groupby("layer", sort=True):
                rows = rows[rows[column].notna()].sort_values("window")
                if len(rows):
                    ax.plot(
                        rows["window"], rows[column].astype(float), marker="o", ms=4,
                        label=_layer_label(layer, rows["family"].iloc[0]), **styles[layer],
                    )
            ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
            ax.axhline(claim, color="tab:red", linewidth=1, linestyle="-.", label=f"claimed: {claim:g}×")
            ax.set_yscale("log")
            ax.set_xlabel("window k")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}: {shape_title(shape, many_devices)}\nabove 1: QnA is faster / leaner", fontsize=9)
            ax.set_xticks(sorted(panel["window"].unique()))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
    return _finish(fig, axes, 2 * len(panels), f"Each layer relative to QnA — {_devices(frame)}")


def pareto_figure(frame: pd.DataFrame) -> Figure | None:
    """Latency (x, log) against peak memory (y, log): one marker series per layer joined in window order,
    markers sized and labelled by window. Lower left is better on both."""
    frame = latest_rows(frame)
    ok = frame[(frame["status"] == "ok") & frame["median_s"].notna() & (frame["peak_bytes"].astype("Float64") > 0)]
    panels = _panels(ok)
    if not panels:
        return None
    styles = _layer_styles(frame)
    many_devices = frame["device_name"].nunique() > 1
    windows = sorted(ok["window"].unique())
    k_min, k_max = windows[0], windows[-1]
    fig, axes = _figure(len(panels), ncols=2, panel_size=(7.2, 5.4))
    for ax, (shape, mode, panel) in zip(axes, panels):
        for layer, rows in panel.groupby("layer", sort=True):
            rows = rows.sort_values("window")
            x = rows["median_s"].astype(float).to_numpy() * 1e3
            y = rows["peak_bytes"].astype(float).to_numpy() / MIB
            k = rows["window"].astype(int).to_numpy()
            style = styles[layer]
            sizes = 14 + 110 * (k - k_min) / max(k_max - k_min, 1)
            ax.plot(x, y, color=style["color"], linewidth=style["linewidth"] * 0.7,
                    linestyle=style["linestyle"], zorder=style["zorder"], alpha=0.8)
            ax.scatter(x, y, s=sizes, color=style["color"], edgecolor="white", linewidth=0.5,
                       zorder=style["zorder"] + 0.5, label=_layer_label(layer, rows["family"].iloc[0]))
            for xi, yi, ki in zip(x, y, k):
                ax.annotate(f"{ki}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=6.5,
                            color=style["color"], zorder=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("median latency (ms, log scale)")
        ax.set_ylabel("peak memory above inputs (MiB, log scale)")
        ax.set_title(
            f"{mode}: {shape_title(shape, many_devices)}\nmarker size and label: window k; lower left is better",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _finish(fig, axes, len(panels), f"Latency vs peak memory — {_devices(frame)}")


def figures(frame: pd.DataFrame) -> dict[str, Figure]:
    """Every figure that has data, by file stem (latency, memory, ratio_to_qna, pareto)."""
    makers: dict[str, Callable[[pd.DataFrame], Figure | None]] = {
        "latency": latency_figure,
        "memory": memory_figure,
    }
    if (frame["layer"] == REFERENCE_LAYER).any():
        makers["ratio_to_qna"] = ratio_figure
    makers["pareto"] = pareto_figure
    makers["roofline"] = roofline_figure
    made = {name: make(frame) for name, make in makers.items()}
    return {name: fig for name, fig in made.items() if fig is not None}


def draw_ratio_figure(frame: pd.DataFrame, path: Path) -> Path | None:
    fig = ratio_figure(frame)
    if fig is None:
        return None
    fig.savefig(path, dpi=90)
    return path


def draw_figures(results_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write latency.png, memory.png, ratio_to_qna.png (when QnA was measured) and pareto.png; return
    their paths."""
    results_path = Path(results_path)
    out_dir = Path(out_dir) if out_dir is not None else results_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(read_results(results_path)).items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results parquet written by run_bench.py")
    parser.add_argument("--out", type=Path, default=None, help="folder for the figures (default: next to the parquet)")
    args = parser.parse_args(argv)
    for path in draw_figures(args.results, args.out):
        print(path)


ROOFLINE_MARKERS = {"forward": "o", "train": "^"}


def _window_size(window: int) -> float:
    """Marker area (points²) growing with the window, so one layer's windows read as a trail."""
    return 12.0 + 4.0 * window


def roofline_figure(frame: pd.DataFrame) -> Figure | None:
    """Achieved GFLOP/s against arithmetic intensity, log-log, one panel per problem shape: one marker
    per layer, window and mode under the roofs the run's machine probes measured. None without probes."""
    from matplotlib.lines import Line2D

    from qna_bench.roofline import roofline_frame

    points = roofline_frame(frame)
    if points.empty:
        return None
    styles = _layer_styles(frame)
    families = points.drop_duplicates("layer").set_index("layer")["family"].to_dict()
    shapes = list(points.groupby(SHAPE_COLUMNS, sort=True, dropna=False))
    fig, axes = _figure(len(shapes), ncols=2, panel_size=(6.4, 5.0))
    fig.set_figwidth(fig.get_figwidth() + 2.8)
    for ax, (shape_values, shape_points) in zip(axes, shapes):
        peak_flops = float(shape_points["peak_flops_probe"].median())
        bandwidth = float(shape_points["peak_bytes_per_s_probe"].median())
        low = min(float(shape_points["intensity"].min()), peak_flops / bandwidth) / 3
        high = max(float(shape_points["intensity"].max()), peak_flops / bandwidth) * 3
        ridge = peak_flops / bandwidth
        ax.plot([low, ridge, high], [low * bandwidth / 1e9, peak_flops / 1e9, peak_flops / 1e9], color="black",
                linewidth=1.2, zorder=2)
        ax.annotate(f"peak {peak_flops / 1e9:.1f} GFLOP/s (probe)", (high, peak_flops / 1e9), ha="right",
                    va="bottom", fontsize=8)
        ax.annotate(f"{bandwidth / 1e9:.1f} GB/s (probe) × intensity", (low * 1.15, low * bandwidth / 1e9), ha="left",
                    va="top", fontsize=8)
        for (layer, mode), group in shape_points.groupby(["layer", "mode"], sort=True):
            ax.scatter(group["intensity"].astype(float), group["achieved_flops_per_s"].astype(float) / 1e9,
                       s=[_window_size(int(k)) for k in group["window"]], marker=ROOFLINE_MARKERS.get(mode, "s"),
                       color=styles[layer]["color"], edgecolors="black", linewidths=0.4,
                       zorder=styles[layer]["zorder"], alpha=0.85)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP/byte, closed-form bytes)")
        ax.set_ylabel("achieved GFLOP/s")
        ax.set_title(shape_title(dict(zip(SHAPE_COLUMNS, shape_values))), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], linestyle="", marker="o", color=styles[layer]["color"],
                                markeredgecolor="black", label=_layer_label(layer, families[layer]))
        for layer in sorted(families, key=lambda name: (name != REFERENCE_LAYER, name))
    ]
    handles += [
        Line2D([], [], linestyle="", marker=marker, color="white", markeredgecolor="black", label=mode)
        for mode, marker in ROOFLINE_MARKERS.items() if mode in set(points["mode"])
    ]
    windows = sorted(points["window"].unique())
    handles += [
        Line2D([], [], linestyle="", marker="o", color="lightgray", markeredgecolor="black",
                                markersize=_window_size(int(k)) ** 0.5, label=f"k = {k}")
        for k in sorted({windows[0], windows[-1]})
    ]
    for ax in axes[len(shapes):]:
        ax.axis("off")
    legend_width = 2.8 / fig.get_figwidth()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1 - legend_width, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"Roofline: achieved FLOP/s under the probed roofs — {_devices(points)}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - legend_width, 1 - 0.35 / fig.get_figheight()))
    return fig


if __name__ == "__main__":
    main()
