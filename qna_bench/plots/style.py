"""How the figures look and are laid out: sizes, fonts, colours per layer and mode, panels, titles, legends,
log ticks, and the PNG writer.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qna_bench.analysis import (
    SUBJECT,
    Analysis,
    analyse,
    mode_order,
    settings,
)
from qna_bench.text import shape_label

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


def _analysed(source: Analysis | pd.DataFrame) -> Analysis:
    """The figures take one `Analysis` of the frame; a bare results frame (a notebook's, a test's) is
    analysed here."""
    return source if isinstance(source, Analysis) else analyse(source)
