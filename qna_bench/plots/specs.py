"""The figures a report can carry, declared once: each file's stem and its caption, in drawing order.
`qna_bench.plots.drawing` draws them in this order and the report's Figures section captions them from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FigureSpec:
    stem: str  # the PNG file is ``{stem}.png``
    caption: str


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("headline", "QnA against the strongest attention peer at each window (dash-dot: the claimed factor)"),
    FigureSpec("latency", "Median latency vs window: QnA, each family's leader, the best baseline"),
    FigureSpec("latency_all", "Median latency vs window, every layer"),
    FigureSpec("memory", "Peak memory vs window: QnA, each family's leader, the best baseline"),
    FigureSpec("memory_all", "Peak memory vs window, every layer"),
    FigureSpec("ratio_to_qna", "Each layer relative to QnA (dash-dot: the claimed factor)"),
    FigureSpec("pareto", "Latency vs peak memory, marker size: window"),
    FigureSpec("roofline", "Roofline: achieved FLOP/s against arithmetic intensity under the probed roofs"),
    FigureSpec("models", "Whole models: images/s and peak memory"),
)
CAPTIONS: dict[str, str] = {spec.stem: spec.caption for spec in FIGURES}
