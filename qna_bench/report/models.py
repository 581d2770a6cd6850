"""The whole-models section: images/s, peak memory, parameters and GMACs against the published figures.
"""

from __future__ import annotations

import pandas as pd

from qna_bench.analysis import (
    SUBJECT,
    Analysis,
    mode_order,
)
from qna_bench.analysis import missing as _missing
from qna_bench.report.cells import _fmt, _spread, _x, markdown_table
from qna_bench.report.rules import MODELS_RULES
from qna_bench.text import MIB, image_size


def _model_cell(row: pd.Series | None, value: str) -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return str(row["status"])
    if value == "images_per_s":
        return _fmt(row["images_per_s"], 2)
    return "n/a (not measured)" if _missing(row["peak_bytes"]) else _fmt(float(row["peak_bytes"]) / MIB, 1)


def _published(measured: float, published: float) -> str:
    if _missing(published):
        return "n/a"
    return f"{_fmt(published, 1)} ({_x(measured / published)})" if not _missing(measured) else _fmt(published, 1)


def models_section(analysis: Analysis) -> str:
    """Whole backbones: images/s, peak memory, params and GMACs against the published figures, and each
    model against QnA-ViT."""
    models = analysis.models
    if not len(models):
        return ""
    parts = ["## Models", MODELS_RULES]
    modes = mode_order(models["mode"].unique())
    for problem, here in models.groupby("problem", sort=False):
        shape = analysis.problems.set_index("problem").loc[problem]
        parts.append(f"### {image_size(shape)} images, batch {shape['batch']}, {shape['dtype']}, "
                     f"{shape['threads']} threads ({problem})")
        rows = []
        for layer, own in here.groupby("layer", sort=False):
            by_mode = {r["mode"]: r for _, r in own.iterrows()}
            first = own.iloc[0]
            params_m = float(first["params"]) / 1e6 if not _missing(first["params"]) else float("nan")
            gmacs = _fmt(first["gmacs"]) + (f" ({first['gmacs_source']})" if first["gmacs_source"] == "closed form" else "")
            rows.append([layer, first["role"], *[_model_cell(by_mode.get(m), "images_per_s") for m in modes],
                         *[_model_cell(by_mode.get(m), "peak_bytes") for m in modes],
                         _fmt(params_m), _published(params_m, first["published_params_m"]),
                         gmacs, _published(first["gmacs"], first["published_gmacs"])])
        parts.append(markdown_table(
            ["model", "role", *[f"{m} images/s" for m in modes], *[f"{m} peak memory (MiB)" for m in modes],
             "params (M)", "published params (M) (measured ÷ published)", "GMACs / image",
             "published GMACs (measured ÷ published)"], rows))
        ratios = analysis.model_ratios
        ratios = ratios[ratios["problem"] == problem] if len(ratios) else ratios
        for subject in sorted(here.loc[here["role"] == SUBJECT, "layer"].unique()):
            mine = ratios[ratios["subject"] == subject] if len(ratios) else ratios
            table = []
            for layer in here[here["role"] != SUBJECT].drop_duplicates("layer")["layer"]:
                theirs = mine[mine["layer"] == layer].set_index("mode")
                status = {r["mode"]: r["status"] for _, r in here[here["layer"] == layer].iterrows()}

                def cell(mode: str, column: str, theirs=theirs, status=status) -> str:
                    if mode in theirs.index and not _missing(theirs.loc[mode, column]):
                        return _spread(theirs.loc[mode], column)
                    return status.get(mode, "—") if status.get(mode, "ok") != "ok" else "n/a"

                size = theirs.iloc[0] if len(theirs) else None
                table.append([layer, here.loc[here["layer"] == layer, "role"].iloc[0],
                              *[cell(m, "latency_ratio") for m in modes], *[cell(m, "memory_ratio") for m in modes],
                              _x(size["params_ratio"]) if size is not None else "n/a",
                              _x(size["gmacs_ratio"]) if size is not None else "n/a"])
            if table:
                parts += [f"#### Against {subject} (the model's / {subject}'s; above 1: {subject} is faster, "
                          "leaner, smaller)",
                          markdown_table(["model", "role", *[f"{m} latency" for m in modes],
                                          *[f"{m} peak memory" for m in modes], "params", "GMACs"], table)]
    return "\n\n".join(parts)
