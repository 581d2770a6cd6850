"""Figures from a results parquet only (never re-measures): latency and peak memory against window,
and each layer's ratio to QnA. One panel per (problem shape, mode), one line per layer.

    python -m qna_bench.plots RESULTS.parquet [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from qna_bench.results import read_results  # noqa: E402

REFERENCE_LAYER = "qna"
SHAPE_COLUMNS = ["device_name", "dtype", "batch", "height", "width", "channels", "heads", "stride", "dilation"]
MIB = 2**20


def shape_title(shape: dict) -> str:
    return (
        f"B={shape['batch']}, {shape['height']}×{shape['width']}, C={shape['channels']}, "
        f"{shape['heads']} heads, {shape['dtype']}"
        + (f", stride {shape['stride']}" if shape["stride"] != 1 else "")
        + (f", dilation {shape['dilation']}" if shape["dilation"] != 1 else "")
    )


def _panels(frame: pd.DataFrame) -> list[tuple[dict, str, pd.DataFrame]]:
    panels = []
    for shape_values, shape_frame in frame.groupby(SHAPE_COLUMNS, sort=True, dropna=False):
        shape = dict(zip(SHAPE_COLUMNS, shape_values))
        for mode in ("forward", "train"):
            mode_frame = shape_frame[shape_frame["mode"] == mode]
            if len(mode_frame):
                panels.append((shape, mode, mode_frame))
    return panels


def _layer_colors(frame: pd.DataFrame) -> dict[str, object]:
    cmap = plt.get_cmap("tab20" if frame["layer"].nunique() > 10 else "tab10")
    return {layer: cmap(i % cmap.N) for i, layer in enumerate(sorted(frame["layer"].unique()))}


def _figure(n_panels: int, ncols: int) -> tuple[plt.Figure, list[plt.Axes]]:
    ncols = min(ncols, n_panels)
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.6 * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _metric_figure(
    frame: pd.DataFrame,
    value: Callable[[pd.DataFrame], pd.Series],
    band: Callable[[pd.DataFrame], tuple[pd.Series, pd.Series]] | None,
    ylabel: str,
    title: str,
    path: Path,
) -> Path | None:
    panels = _panels(frame)
    if not panels:
        return None
    colors = _layer_colors(frame)
    fig, axes = _figure(len(panels), ncols=2)
    for ax, (shape, mode, panel) in zip(axes, panels):
        for layer, rows in panel.groupby("layer", sort=True):
            rows = rows.sort_values("window")
            ok = rows[(rows["status"] == "ok") & value(rows).notna()]
            failed = rows[rows["status"] != "ok"]
            color = colors[layer]
            if len(ok):
                ax.plot(ok["window"], value(ok), marker="o", ms=4, color=color, label=layer)
                if band is not None:
                    low, high = band(ok)
                    ax.fill_between(ok["window"], low, high, color=color, alpha=0.2, linewidth=0)
            if len(failed):
                # Points without a number sit on the bottom edge, so a missing line is never mistaken for a fast one.
                ax.scatter(
                    failed["window"], [0.02] * len(failed), marker="x", color=color,
                    transform=ax.get_xaxis_transform(), clip_on=False,
                    label=f"{layer}: {', '.join(sorted(failed['status'].unique()))}",
                )
        ax.set_yscale("log")
        ax.set_xlabel("window k (k×k neighbourhood; Swin: M×M window)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{mode}: {shape_title(shape)}", fontsize=10)
        windows = sorted(panel["window"].unique())
        ax.set_xticks(windows)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in axes[len(panels):]:
        ax.axis("off")
    devices = ", ".join(sorted(frame["device_name"].unique()))
    fig.suptitle(f"{title} — {devices}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _ratio_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Each ok row with its latency and memory divided by QnA's at the same problem and mode."""
    keys = SHAPE_COLUMNS + ["mode", "window"]
    ok = frame[frame["status"] == "ok"]
    reference = ok[ok["layer"] == REFERENCE_LAYER][keys + ["median_s", "peak_bytes"]]
    merged = ok[ok["layer"] != REFERENCE_LAYER].merge(reference, on=keys, suffixes=("", "_qna"))
    merged["latency_ratio"] = merged["median_s"] / merged["median_s_qna"]
    merged["memory_ratio"] = merged["peak_bytes"].astype("Float64") / merged["peak_bytes_qna"].astype("Float64")
    return merged


def draw_ratio_figure(frame: pd.DataFrame, path: Path) -> Path | None:
    ratios = _ratio_frame(frame)
    panels = [(s, m, p) for s, m, p in _panels(ratios)]
    if not panels:
        return None
    colors = _layer_colors(ratios)
    fig, axes = _figure(2 * len(panels), ncols=2)
    for i, (shape, mode, panel) in enumerate(panels):
        for ax, column, label in (
            (axes[2 * i], "latency_ratio", "median latency / QnA's (×)"),
            (axes[2 * i + 1], "memory_ratio", "peak memory / QnA's (×)"),
        ):
            for layer, rows in panel.groupby("layer", sort=True):
                rows = rows[rows[column].notna()].sort_values("window")
                if len(rows):
                    ax.plot(rows["window"], rows[column].astype(float), marker="o", ms=4, color=colors[layer], label=layer)
            ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
            ax.set_yscale("log")
            ax.set_xlabel("window k")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}: {shape_title(shape)}\nabove 1: QnA is faster / leaner", fontsize=9)
            ax.set_xticks(sorted(panel["window"].unique()))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
    for ax in axes[2 * len(panels):]:
        ax.axis("off")
    devices = ", ".join(sorted(frame["device_name"].unique()))
    fig.suptitle(f"Each layer relative to QnA — {devices}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_figures(results_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write latency.png, memory.png and (when QnA was measured) ratio_to_qna.png; return their paths."""
    results_path = Path(results_path)
    out_dir = Path(out_dir) if out_dir is not None else results_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = read_results(results_path)
    written = [
        _metric_figure(
            frame,
            lambda f: f["median_s"] * 1e3,
            lambda f: (f["q25_s"] * 1e3, f["q75_s"] * 1e3),
            "median latency (ms, log scale; band: q25–q75)",
            "Latency vs window",
            out_dir / "latency.png",
        ),
        _metric_figure(
            frame,
            lambda f: f["peak_bytes"].astype("Float64") / MIB,
            None,
            "peak memory above inputs (MiB, log scale)",
            "Peak memory vs window",
            out_dir / "memory.png",
        ),
    ]
    if (frame["layer"] == REFERENCE_LAYER).any():
        written.append(draw_ratio_figure(frame, out_dir / "ratio_to_qna.png"))
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results parquet written by run_bench.py")
    parser.add_argument("--out", type=Path, default=None, help="folder for the figures (default: next to the parquet)")
    args = parser.parse_args(argv)
    for path in draw_figures(args.results, args.out):
        print(path)


if __name__ == "__main__":
    main()
