"""Figures from a results parquet only (never re-measures). By default each panel (one per problem shape
and mode) shows QnA, each attention family's best implementation and the best convolution baseline (chosen
by `qna_bench.analysis.shown_by_default`); the ``*_all`` companions draw every layer. ``headline.png``
gives QnA's ratio to the strongest attention peer against the window; whole models get ``models.png``.
Legends sit to the right of the panels.

    python -m qna_bench.plots RESULTS.parquet [--out DIR] [--every-layer]
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qna_bench.analysis import (
    CLAIMED_MEMORY_FACTOR,
    CLAIMED_SPEED_FACTOR,
    PEER,
    SETTING_COLUMNS,
    SHAPE_COLUMNS,
    SUBJECT,
    Analysis,
    analyse,
    mode_order,
    settings,
    shown_by_default,
    sort_rows,
    strongest,
)
from qna_bench.results import read_results
from qna_bench.roofline import level_roofs
from qna_bench.text import MIB, image_size, shape_label

ROLE_LABELS = {SUBJECT: "under test", "reference": "reference", "baseline": "baseline"}
# Sized to read on a laptop screen and stay well under 200 KB a file.
DPI = 100
PANEL = (4.6, 3.2)
FONT = 8
MODE_COLOURS = {"forward": "tab:blue", "train": "tab:orange"}
MODE_MARKERS = {"forward": "o", "train": "^"}
# One legend entry for every point without a number, drawn on the bottom edge in its layer's colour.
NO_NUMBER = "× on the bottom edge: no number at that window (timeout, oom, skipped, unsupported, error; see the report)"


def shape_title(setting: dict, with_context: bool = False) -> str:
    return (
        (f"{setting['device_name']}, {setting['threads']} threads, torch {setting['torch_version']}: " if with_context else "")
        + f"{shape_label(setting)}, {setting['dtype']}"
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
            styles[layer] = dict(color="black", linewidth=2.2, linestyle="-", zorder=5)
        elif role == "reference":
            styles[layer] = dict(color="dimgray", linewidth=1.4, linestyle="--", zorder=4)
        elif role == "baseline":
            shade = 0.45 + 0.4 * baselines.index(layer) / max(len(baselines), 1)
            styles[layer] = dict(color=grey(shade), linewidth=1.4, linestyle=":", zorder=3)
        else:
            styles[layer] = dict(color=cmap(peers.index(layer) % cmap.N), linewidth=1.3, linestyle="-", zorder=3)
    return styles


def _layer_label(layer: str, role: str, family: str) -> str:
    if role in ROLE_LABELS:
        return f"{layer} ({ROLE_LABELS[role]})"
    return layer if family == layer else f"{layer} ({family})"


def _figure(n_panels: int, ncols: int, panel_size: tuple[float, float] = PANEL,
            constrained: bool = True) -> tuple[Figure, list[Axes]]:
    ncols = min(ncols, n_panels)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained" if constrained else None)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _devices(frame: pd.DataFrame) -> str:
    return ", ".join(sorted(frame["device_name"].dropna().unique()))


def _log_ticks(axis, suffix: str = "") -> None:
    """A log axis ticked as plain numbers (20, not 2×10¹), denser the fewer decades it spans (call it
    after the data is drawn)."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = sorted(axis.get_view_interval())
    decades = math.log10(high / low) if low > 0 else 10.0
    subs = (1.0, 2.0, 3.0, 5.0) if decades < 1.2 else (1.0, 2.0, 5.0) if decades < 3 else (1.0, 3.0)
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    axis.set_minor_formatter(NullFormatter())


def _style_axes(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=FONT)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(True, which="both", alpha=0.3)


def _finish(fig: Figure, axes: list[Axes], used: int, title: str) -> Figure:
    """Hide unused axes, gather every panel's legend entries into one legend right of the panels (never
    over the data), and title the figure."""
    for ax in axes[used:]:
        ax.axis("off")
    labels: dict[str, object] = {}
    for ax in axes[:used]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    if NO_NUMBER in labels:
        from matplotlib.lines import Line2D

        labels[NO_NUMBER] = Line2D([], [], linestyle="", marker="x", color="dimgray")
        labels[NO_NUMBER.replace("; see", ";\nsee").replace(" (", "\n(", 1)] = labels.pop(NO_NUMBER)
    if labels:
        width = 0.3 + 0.062 * max(len(line) for label in labels for line in label.split("\n"))  # inches at FONT points
        fig.set_figwidth(fig.get_figwidth() + width)
        fig.legend(list(labels.values()), list(labels), loc="outside right center", fontsize=FONT, frameon=False)
    fig.suptitle(title, fontsize=FONT + 2)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """The figure as a 256-colour PNG: the same picture as matplotlib's, a third of the bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    image.save(path, format="png", optimize=True)


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


def _analysed(source: Analysis | pd.DataFrame) -> Analysis:
    """The figures take one `Analysis` of the frame; a bare results frame (a notebook's, a test's) is
    analysed here."""
    return source if isinstance(source, Analysis) else analyse(source)


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


def figures(source: Analysis | pd.DataFrame, every_layer: bool = False) -> dict[str, Figure]:
    """Every figure that has data, by file stem: headline (with QnA measured), latency, memory (and their
    ``_all`` companions where the default leaves layers out), ratio_to_qna (with QnA measured), pareto,
    roofline, models. All drawn from one `Analysis`."""
    analysis = _analysed(source)
    layers = analysis.layers
    makers: dict[str, Callable[[], Figure | None]] = {}
    if (layers["role"] == SUBJECT).any():
        makers["headline"] = lambda: headline_figure(analysis)
    for name, make, column in (("latency", latency_figure, "median_s"), ("memory", memory_figure, "peak_bytes")):
        makers[name] = lambda make=make: make(analysis, every_layer)
        if not every_layer and len(layers) and len(_rest(layers, column)):
            makers[f"{name}_all"] = lambda make=make: make(analysis, True)
    if (layers["role"] == SUBJECT).any():
        makers["ratio_to_qna"] = lambda: ratio_figure(analysis, every_layer)
    makers["pareto"] = lambda: pareto_figure(analysis, every_layer)
    makers["roofline"] = lambda: roofline_figure(analysis)
    makers["models"] = lambda: models_figure(analysis)
    made = {name: make() for name, make in makers.items()}
    return {name: fig for name, fig in made.items() if fig is not None}


def draw_figures(
    results_path: str | Path, out_dir: str | Path | None = None, every_layer: bool = False,
    analysis: Analysis | None = None,
) -> list[Path]:
    """Write every figure of `figures` as PNG next to the parquet (or into ``out_dir``); return their paths.
    ``analysis``: the parquet's, where the caller has it already (the report does)."""
    results_path = Path(results_path)
    out_dir = Path(out_dir) if out_dir is not None else results_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(analysis or analyse(read_results(results_path)), every_layer).items():
        path = out_dir / f"{name}.png"
        save_png(fig, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results parquet written by run_bench.py")
    parser.add_argument("--out", type=Path, default=None, help="folder for the figures (default: next to the parquet)")
    parser.add_argument("--every-layer", action="store_true",
                        help="draw every layer in every figure (default: QnA, each family's best, the best baseline)")
    args = parser.parse_args(argv)
    for path in draw_figures(args.results, args.out, args.every_layer):
        print(path)


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


if __name__ == "__main__":
    main()
