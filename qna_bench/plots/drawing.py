"""Every figure of an `Analysis`, in the order of `FIGURES`, written as PNG files; the CLI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from qna_bench.analysis import (
    SUBJECT,
    Analysis,
    analyse,
)
from qna_bench.plots.curves import _rest, headline_figure, latency_figure, memory_figure, ratio_figure
from qna_bench.plots.extras import models_figure, pareto_figure, roofline_figure
from qna_bench.plots.specs import FIGURES
from qna_bench.plots.style import _analysed, save_png
from qna_bench.results import read_results


def figures(source: Analysis | pd.DataFrame, every_layer: bool = False) -> dict[str, Figure]:
    """Every figure of `FIGURES` that has data, by file stem, in that order: headline (with QnA measured),
    latency, memory (and their ``_all`` companions where the default leaves layers out), ratio_to_qna
    (with QnA measured), pareto, roofline, models. All drawn from one `Analysis`."""
    analysis = _analysed(source)
    layers = analysis.layers
    measured_qna = bool((layers["role"] == SUBJECT).any())
    makers: dict[str, Callable[[], Figure | None]] = {
        "headline": lambda: headline_figure(analysis),
        "latency": lambda: latency_figure(analysis, every_layer),
        "latency_all": lambda: latency_figure(analysis, True),
        "memory": lambda: memory_figure(analysis, every_layer),
        "memory_all": lambda: memory_figure(analysis, True),
        "ratio_to_qna": lambda: ratio_figure(analysis, every_layer),
        "pareto": lambda: pareto_figure(analysis, every_layer),
        "roofline": lambda: roofline_figure(analysis),
        "models": lambda: models_figure(analysis),
    }
    wanted = {
        "headline": measured_qna,
        "ratio_to_qna": measured_qna,
        **{f"{name}_all": bool(not every_layer and len(layers) and len(_rest(layers, column)))
           for name, column in (("latency", "median_s"), ("memory", "peak_bytes"))},
    }
    made = {spec.stem: makers[spec.stem]() for spec in FIGURES if wanted.get(spec.stem, True)}
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
    parser = argparse.ArgumentParser(description="Figures from a results parquet only (never re-measures).")
    parser.add_argument("results", type=Path, help="a results parquet written by run_bench.py")
    parser.add_argument("--out", type=Path, default=None, help="folder for the figures (default: next to the parquet)")
    parser.add_argument("--every-layer", action="store_true",
                        help="draw every layer in every figure (default: QnA, each family's best, the best baseline)")
    args = parser.parse_args(argv)
    for path in draw_figures(args.results, args.out, args.every_layer):
        print(path)
