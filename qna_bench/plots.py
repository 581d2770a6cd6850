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

from qna_bench.analysis import (
    CLAIMED_MEMORY_FACTOR,
    CLAIMED_SPEED_FACTOR,
    SHAPE_COLUMNS,
    SUBJECT,
    latest_rows,
    mode_order,
    ratio_frame,
    settings,
    sort_rows,
    with_roles,
)
from qna_bench.results import read_results

MIB = 2**20
ROLE_LABELS = {SUBJECT: "under test", "reference": "reference", "baseline": "baseline"}


def shape_title(setting: dict, with_context: bool = False) -> str:
    return (
        (f"{setting['device_name']}, {setting['threads']} threads, torch {setting['torch_version']}: " if with_context else "")
        + f"B={setting['batch']}, {setting['height']}×{setting['width']}, C={setting['channels']}, "
        f"{setting['heads']} heads, {setting['dtype']}"
        + (f", stride {setting['stride']}" if setting["stride"] != 1 else "")
        + (f", dilation {setting['dilation']}" if setting["dilation"] != 1 else "")
    )


def _panels(frame: pd.DataFrame) -> list[tuple[dict, str, pd.DataFrame]]:
    panels = []
    for setting, rows in settings(frame):
        for mode in mode_order(rows["mode"].unique()):
            panels.append((setting, mode, rows[rows["mode"] == mode]))
    return panels


def _many_contexts(frame: pd.DataFrame) -> bool:
    return len(frame[["device_name", "threads", "torch_version"]].drop_duplicates()) > 1


def _layer_styles(frame: pd.DataFrame) -> dict[str, dict]:
    """Line style per layer by its declared role, stable across figures: the subject thick black,
    references dashed grey, baselines dotted grey, peers solid in colour."""
    roles = frame.drop_duplicates("layer").set_index("layer")["role"].to_dict()
    peers = sorted(layer for layer, role in roles.items() if role not in ROLE_LABELS)
    baselines = sorted(layer for layer, role in roles.items() if role == "baseline")
    cmap = matplotlib.colormaps["tab10" if len(peers) <= 10 else "tab20"]
    grey = matplotlib.colormaps["Greys"]
    styles: dict[str, dict] = {}
    for layer, role in roles.items():
        if role == SUBJECT:
            styles[layer] = dict(color="black", linewidth=2.6, linestyle="-", zorder=5)
        elif role == "reference":
            styles[layer] = dict(color="dimgray", linewidth=1.6, linestyle="--", zorder=4)
        elif role == "baseline":
            shade = 0.45 + 0.4 * baselines.index(layer) / max(len(baselines), 1)
            styles[layer] = dict(color=grey(shade), linewidth=1.4, linestyle=":", zorder=3)
        else:
            styles[layer] = dict(color=cmap(peers.index(layer) % cmap.N), linewidth=1.5, linestyle="-", zorder=3)
    return styles


def _layer_label(layer: str, role: str, family: str) -> str:
    if role in ROLE_LABELS:
        return f"{layer} ({ROLE_LABELS[role]})"
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
    frame = latest_rows(with_roles(frame))
    panels = _panels(frame)
    if not panels:
        return None
    styles = _layer_styles(frame)
    many_devices = _many_contexts(frame)
    fig, axes = _figure(len(panels), ncols=2)
    for ax, (shape, mode, panel) in zip(axes, panels):
        plotted = False
        for layer, rows in panel.groupby("layer", sort=True):
            rows = rows.sort_values("window")
            values = value(rows)
            ok = rows[(rows["status"] == "ok") & values.notna()]
            failed = rows[(rows["status"] != "ok") | values.isna()]
            style = styles[layer]
            label = _layer_label(layer, rows["role"].iloc[0], rows["family"].iloc[0])
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
    frame = latest_rows(with_roles(frame))
    ratios = ratio_frame(frame)
    panels = _panels(ratios)
    if not panels:
        return None
    styles = _layer_styles(frame)  # the whole frame, so each layer keeps its colour across figures
    many_devices = _many_contexts(frame)
    fig, axes = _figure(2 * len(panels), ncols=2)
    for i, (shape, mode, panel) in enumerate(panels):
        for ax, column, label, claim in (
            (axes[2 * i], "latency_ratio", "median latency / QnA's (×, log scale)", CLAIMED_SPEED_FACTOR),
            (axes[2 * i + 1], "memory_ratio", "peak memory / QnA's (×, log scale)", CLAIMED_MEMORY_FACTOR),
        ):
            several = panel["subject"].nunique() > 1
            for (layer, subject), rows in panel.groupby(["layer", "subject"], sort=True):
                rows = rows[rows[column].notna()].sort_values("window")
                if len(rows):
                    name = _layer_label(layer, rows["role"].iloc[0], rows["family"].iloc[0])
                    ax.plot(
                        rows["window"], rows[column].astype(float), marker="o", ms=4,
                        label=f"{name} / {subject}" if several else name, **styles[layer],
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
    frame = latest_rows(with_roles(frame))
    ok = frame[(frame["status"] == "ok") & frame["median_s"].notna() & (frame["peak_bytes"].astype("Float64") > 0)]
    panels = _panels(ok)
    if not panels:
        return None
    styles = _layer_styles(frame)
    many_devices = _many_contexts(frame)
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
                       zorder=style["zorder"] + 0.5,
                       label=_layer_label(layer, rows["role"].iloc[0], rows["family"].iloc[0]))
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
    if (with_roles(frame)["role"] == SUBJECT).any():
        makers["ratio_to_qna"] = ratio_figure
    makers["pareto"] = pareto_figure
    makers["roofline"] = roofline_figure
    made = {name: make(frame) for name, make in makers.items()}
    return {name: fig for name, fig in made.items() if fig is not None}


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
    points = with_roles(points)
    styles = _layer_styles(frame)
    legend_rows = sort_rows(points.drop_duplicates("layer"), ["role", "layer"])
    shape_columns = ["device_name", "dtype", *SHAPE_COLUMNS]
    shapes = list(points.groupby(shape_columns, sort=True, dropna=False))
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
        ax.set_title(shape_title(dict(zip(shape_columns, shape_values))), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], linestyle="", marker="o", color=styles[row.layer]["color"],
               markeredgecolor="black", label=_layer_label(row.layer, row.role, row.family))
        for row in legend_rows.itertuples()
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
