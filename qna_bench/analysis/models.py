"""Whole models: images per second, parameters and GMACs per model, and each model against QnA-ViT.
"""

from __future__ import annotations

import re

import pandas as pd

from qna_bench.analysis.ratios import ratio_frame
from qna_bench.analysis.rows import missing, sort_rows
from qna_bench.layer_facts import find_layer

# How a model's registry entry quotes its published size: "published 28.3M params, 4.5 GMACs".
PUBLISHED = re.compile(r"published (?P<params>\d+(?:\.\d+)?)M params, (?P<gmacs>\d+(?:\.\d+)?) GMACs")


def is_model(frame: pd.DataFrame) -> pd.Series:
    """Which rows measure a whole backbone (registry kind ``model``); a name the registry does not know
    is a layer."""
    kinds = {}
    for name in frame["layer"].unique():
        spec = find_layer(name)
        kinds[name] = spec.kind if spec is not None else "layer"
    return frame["layer"].map(kinds).eq("model").astype(bool)


def published_figures(layer: str) -> tuple[float, float] | None:
    """(millions of parameters, GMACs per image) as the model's registry entry quotes them from its paper,
    or None where it quotes none."""
    spec = find_layer(layer)
    match = PUBLISHED.search(spec.description) if spec is not None else None
    return (float(match["params"]), float(match["gmacs"])) if match else None


def _gmacs_per_image(row: pd.Series) -> tuple[float, str]:
    """A forward row's multiply-accumulates per image (FLOPs / 2 / batch, in G): counted, or the closed
    form where the counter saw none (e.g. flex attention)."""
    for column, source in (("flops", "counted"), ("flops_analytic", "closed form")):
        value = row.get(column)
        if not missing(value) and float(value) > 0:
            return float(value) / 2 / int(row["batch"]) / 1e9, source
    return float("nan"), ""


def model_table(data: pd.DataFrame) -> pd.DataFrame:
    """One row per model, problem and mode (rows of `is_model`): images/s (batch / median latency), peak
    memory, parameters, GMACs per image from the forward row, and the published figures."""
    columns = ["problem", "layer", "role", "mode", "batch", "status", "images_per_s", "peak_bytes", "params",
               "gmacs", "gmacs_source", "published_params_m", "published_gmacs"]
    records = []
    for (problem, layer), rows in data.groupby(["problem", "layer"], sort=True):
        forward = rows[(rows["mode"] == "forward") & (rows["status"] == "ok")]
        gmacs, source = _gmacs_per_image(forward.iloc[0]) if len(forward) else (float("nan"), "")
        params = rows["params"].dropna()
        published = published_figures(layer)
        for row in rows.itertuples():
            ok = row.status == "ok" and not missing(row.median_s) and float(row.median_s) > 0
            records.append(dict(
                problem=problem, layer=layer, role=row.role, mode=row.mode, batch=int(row.batch), status=row.status,
                images_per_s=int(row.batch) / float(row.median_s) if ok else float("nan"),
                peak_bytes=row.peak_bytes if row.status == "ok" else pd.NA,
                params=int(params.iloc[0]) if len(params) else pd.NA, gmacs=gmacs, gmacs_source=source,
                published_params_m=published[0] if published else float("nan"),
                published_gmacs=published[1] if published else float("nan"),
            ))
    return sort_rows(pd.DataFrame(records, columns=columns), ["problem", "role", "layer", "mode"])


def model_ratios(data: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Each model against each QnA-ViT (subject) of its problem, per mode: the `ratio_frame` latency and
    memory ratios, and ``params_ratio`` and ``gmacs_ratio`` (the model's / QnA-ViT's): above 1 QnA-ViT is
    faster, leaner, smaller."""
    ratios = ratio_frame(data)
    sizes = models.drop_duplicates(["problem", "layer"]).set_index(["problem", "layer"])[["params", "gmacs"]]
    if not len(ratios):
        return ratios.assign(params_ratio=pd.Series(dtype=float), gmacs_ratio=pd.Series(dtype=float))
    mine = sizes.reindex(list(zip(ratios["problem"], ratios["layer"])))
    theirs = sizes.reindex(list(zip(ratios["problem"], ratios["subject"])))
    ratios["params_ratio"] = mine["params"].astype(float).to_numpy() / theirs["params"].astype(float).to_numpy()
    ratios["gmacs_ratio"] = mine["gmacs"].astype(float).to_numpy() / theirs["gmacs"].astype(float).to_numpy()
    return sort_rows(ratios, ["problem", "subject", "role", "layer", "mode"])
