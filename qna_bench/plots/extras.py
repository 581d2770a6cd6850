"""The other figures: latency against memory (Pareto), whole models, and the cache-aware roofline.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qna_bench.analysis import (
    SHAPE_COLUMNS,
    Analysis,
    mode_order,
    sort_rows,
)
from qna_bench.plots.curves import _selected
from qna_bench.plots.style import (
    FONT,
    MODE_COLOURS,
    ROLE_LABELS,
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
from qna_bench.roofline import level_roofs
from qna_bench.text import MIB, image_size


def pareto_figure(source: Analysis | pd.DataFrame, every_layer: bool = False) -> Figure | None:
    """Latency (x, log) against peak memory (y, log): one marker series per shown layer joined in window
    order, markers sized by window, the smallest and largest window labelled. Lower left is better on both."""
    frame = _analysed(source).layers
    ok = frame[(frame["status"] == "ok") & frame["median_s"].notna() & (frame["peak_bytes"].astype("Float64") > 0)]
    panels = _panels(_selected(ok, "median_s", every_layer))
    if not panels:
        return None
    styles = _layer_styles(frame)
    many_devices = _many_contexts(frame)
    windows = sorted(ok["window"].unique())
    k_min, k_max = windows[0], windows[-1]
    fig, axes = _figure(len(panels), ncols=2)
    for ax, (shape, mode, panel) in zip(axes, panels):
        for layer, rows in sort_rows(panel, ["role", "layer"]).groupby("layer", sort=False):
            rows = rows.sort_values("window")
            x = rows["median_s"].astype(float).to_numpy() * 1e3
            y = rows["peak_bytes"].astype(float).to_numpy() / MIB
            k = rows["window"].astype(int).to_numpy()
            style = styles[layer]
            sizes = 10 + 80 * (k - k_min) / max(k_max - k_min, 1)
            ax.plot(x, y, color=style["color"], linewidth=style["linewidth"] * 0.7,
                    linestyle=style["linestyle"], zorder=style["zorder"], alpha=0.8)
            ax.scatter(x, y, s=sizes, color=style["color"], edgecolor="white", linewidth=0.5,
                       zorder=style["zorder"] + 0.5,
                       label=_layer_label(layer, rows["role"].iloc[0], rows["family"].iloc[0]))
            for xi, yi, ki in {(x[0], y[0], k[0]), (x[-1], y[-1], k[-1])}:
                ax.annotate(f"{ki}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=FONT - 1.5,
                            color=style["color"], zorder=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax.xaxis)
        _log_ticks(ax.yaxis)
        _style_axes(ax, f"{mode}: {shape_title(shape, many_devices)}", "median latency (ms, log)",
                    "peak memory above inputs (MiB, log)")
    return _finish(fig, axes, len(panels),
                   f"Latency vs peak memory (marker size and end labels: window k; lower left is better) — "
                   f"{_devices(frame)}")


def models_figure(source: Analysis | pd.DataFrame) -> Figure | None:
    """Whole models: images/s and peak memory per model, forward and train side by side, one row of panels
    per problem. None without model rows."""
    found = _analysed(source)
    models = found.models
    if not len(models):
        return None
    shapes = found.problems.set_index("problem")
    problems = list(models.groupby("problem", sort=True))
    fig, axes = _figure(2 * len(problems), ncols=2, panel_size=(4.6, 0.5 + 0.45 * models["layer"].nunique()))
    for i, (problem, here) in enumerate(problems):
        names = list(dict.fromkeys(here["layer"]))
        modes = mode_order(here["mode"].unique())
        height = 0.8 / len(modes)
        for ax, column, label, scale in (
            (axes[2 * i], "images_per_s", "images/s (higher is better)", 1.0),
            (axes[2 * i + 1], "peak_bytes", "peak memory above inputs (MiB; lower is better)", 1 / MIB),
        ):
            for j, mode in enumerate(modes):
                rows = here[here["mode"] == mode].set_index("layer")
                for n, name in enumerate(names):
                    y = n + (j - (len(modes) - 1) / 2) * height
                    value = rows.loc[name, column] if name in rows.index else pd.NA
                    if pd.isna(value):
                        status = rows.loc[name, "status"] if name in rows.index else "not run"
                        ax.text(0, y, f" {status if status != 'ok' else 'not measured'}", va="center",
                                fontsize=FONT - 1, color="gray")
                        continue
                    ax.barh(y, float(value) * scale, height=height * 0.9, color=MODE_COLOURS.get(mode, "tab:green"),
                            label=mode)
                    ax.text(float(value) * scale, y, f" {float(value) * scale:.3g}", va="center", fontsize=FONT - 1)
            ax.set_yticks(range(len(names)), [f"{n} ({ROLE_LABELS.get(r, r)})" for n, r in
                                              zip(names, here.drop_duplicates("layer")["role"])])
            ax.invert_yaxis()
            ax.margins(x=0.2)
            shape = shapes.loc[problem]
            _style_axes(ax, f"{image_size(shape)} images, batch {shape['batch']}, {shape['dtype']}, "
                        f"{shape['threads']} threads ({problem})", label, "")
            ax.grid(True, axis="x", alpha=0.3)
            ax.grid(False, axis="y")
    return _finish(fig, axes, 2 * len(problems), f"Whole models — {_devices(found.frame)}")


ROOFLINE_MARKERS = {"forward": "o", "train": "^"}


def _window_size(window: int) -> float:
    """Marker area (points²) growing with the window, so one layer's windows read as a trail."""
    return 12.0 + 4.0 * window


ROOF_LEVEL_STYLES = {"L2": ":", "LLC": "--", "DRAM": "-"}


def _draw_roofs(ax: Axes, points: pd.DataFrame, peak_flops: float) -> None:
    """The compute roof and one bandwidth roof per probed memory level (L2 dotted, LLC dashed, DRAM solid),
    each bent at its own ridge and labelled with its rate."""
    roofs = level_roofs(points)
    ridges = [peak_flops / rate for _, rate in roofs]
    low = min([float(points["intensity"].min()), *ridges]) / 3
    high = max([float(points["intensity"].max()), *ridges]) * 3
    for name, rate in roofs:
        ridge = peak_flops / rate
        ax.plot([low, ridge, high], [low * rate / 1e9, peak_flops / 1e9, peak_flops / 1e9], color="black",
                linewidth=1.2 if name == "DRAM" else 0.9, linestyle=ROOF_LEVEL_STYLES[name], zorder=2)
        ax.annotate(f"{name} {rate / 1e9:.1f} GB/s", (low * 1.15, low * rate / 1e9), ha="left", va="bottom",
                    fontsize=7)
    ax.annotate(f"peak {peak_flops / 1e9:.1f} GFLOP/s (probe)", (high, peak_flops / 1e9), ha="right",
                va="bottom", fontsize=8)


def roofline_figure(source: Analysis | pd.DataFrame) -> Figure | None:
    """Achieved GFLOP/s against arithmetic intensity, log-log, one panel per problem shape: one marker
    per layer, window and mode under the roofs the run's machine probes measured (compute, and the
    bandwidth of each memory level probed). None without probes."""
    from matplotlib.lines import Line2D

    analysis = _analysed(source)
    points = analysis.roofline
    if points.empty:
        return None
    styles = _layer_styles(analysis.layers)
    legend_rows = sort_rows(points.drop_duplicates("layer"), ["role", "layer"])
    shape_columns = ["device_name", "dtype", *SHAPE_COLUMNS]
    shapes = list(points.groupby(shape_columns, sort=True, dropna=False))
    fig, axes = _figure(len(shapes), ncols=2, panel_size=(6.4, 5.0), constrained=False)
    fig.set_figwidth(fig.get_figwidth() + 2.8)
    for ax, (shape_values, shape_points) in zip(axes, shapes):
        _draw_roofs(ax, shape_points, float(shape_points["peak_flops_probe"].median()))
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
    handles += [
        Line2D([], [], color="black", linestyle=ROOF_LEVEL_STYLES[name], label=f"{name} roof")
        for name, _ in level_roofs(points)
    ]
    for ax in axes[len(shapes):]:
        ax.axis("off")
    legend_width = 2.8 / fig.get_figwidth()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1 - legend_width, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"Roofline under the probed roofs — {_devices(points)}\n(each point against the roof of the "
                 "memory level its closed-form bytes fit in)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - legend_width, 1 - 0.35 / fig.get_figheight()))
    return fig
