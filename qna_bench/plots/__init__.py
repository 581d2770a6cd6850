"""Figures from a results parquet only (never re-measures). By default each panel (one per problem shape
and mode) shows QnA, each attention family's leader and the best convolution baseline (each the layer
fastest, or leanest, at the most windows: `qna_bench.analysis.shown_by_default`); the ``*_all`` companions draw every layer. ``headline.png``
gives QnA's ratio to the strongest attention peer against the window; whole models get ``models.png``.
Legends sit to the right of the panels.

    python -m qna_bench.plots RESULTS.parquet [--out DIR] [--every-layer]

One part a module: specs (each figure's file and caption), style, curves (against the window), extras
(Pareto, models, roofline), drawing (every figure, the PNG files, the CLI).
"""

from __future__ import annotations

from qna_bench.analysis import analyse
from qna_bench.plots.curves import (
    CLAIM_NAMES,
    RATIO_AXES,
    headline_figure,
    latency_figure,
    memory_figure,
    ratio_figure,
)
from qna_bench.plots.drawing import draw_figures, figures, main
from qna_bench.plots.extras import (
    ROOF_LEVEL_STYLES,
    ROOFLINE_MARKERS,
    models_figure,
    pareto_figure,
    roofline_figure,
)
from qna_bench.plots.specs import CAPTIONS, FIGURES, FigureSpec
from qna_bench.plots.style import (
    DPI,
    FONT,
    MODE_COLOURS,
    MODE_MARKERS,
    NO_NUMBER,
    PANEL,
    ROLE_LABELS,
    _layer_styles,
    save_png,
    shape_title,
)

__all__ = ["CAPTIONS", "CLAIM_NAMES", "DPI", "FIGURES", "FONT", "FigureSpec", "MODE_COLOURS", "MODE_MARKERS", "NO_NUMBER", "PANEL", "RATIO_AXES", "ROLE_LABELS", "ROOFLINE_MARKERS", "ROOF_LEVEL_STYLES", "_layer_styles", "analyse", "draw_figures", "figures", "headline_figure", "latency_figure", "main", "memory_figure", "models_figure", "pareto_figure", "ratio_figure", "roofline_figure", "save_png", "shape_title"]
