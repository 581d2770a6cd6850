"""The `Analysis` of a results frame, built once: every table the report and the figures read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from qna_bench.analysis.growth import growth_comparisons, growth_table
from qna_bench.analysis.models import is_model, model_ratios, model_table
from qna_bench.analysis.ratios import LEAD_COLUMNS, compile_leads, ratio_frame
from qna_bench.analysis.rows import (
    FORM_COLUMN,
    TUNED,
    TUNING_COLUMN,
    best_forms,
    form_table,
    has_compiled,
    has_shipped,
    latest_rows,
    layer_label,
    problem_table,
    shipped_table,
    sort_rows,
    with_problems,
    with_roles,
)
from qna_bench.analysis.statistics import NoiseFloor, noise_floor
from qna_bench.analysis.verdicts import verdict_table
from qna_bench.labels import EAGER
from qna_bench.roofline import roofline_frame


@dataclass(frozen=True)
class Analysis:
    """Everything the report says, as tables (the notebook shows the same frames)."""

    frame: pd.DataFrame  # each layer's best form per point, with `problem` (P1, P2, ...), `role` and `kind`
    rows_in_file: int
    problems: pd.DataFrame  # problem id, its setting columns and head_dim
    ratios: pd.DataFrame  # one row per non-subject layer paired with a subject at a point
    growth: pd.DataFrame  # one row per layer, problem and mode (own windows)
    comparisons: pd.DataFrame  # QnA vs each peer, per problem, mode and metric, over shared windows
    verdicts: pd.DataFrame  # one row per device, problem, subject, mode and claim
    failures: pd.DataFrame  # non-ok rows
    models: pd.DataFrame  # whole backbones: one row per model, problem and mode (`model_table`)
    model_ratios: pd.DataFrame  # each model against QnA-ViT (`model_ratios`)
    layers: pd.DataFrame  # the rows of `frame` that are layers, not whole models (what the figures draw)
    roofline: pd.DataFrame  # the layers' measured points against their roofs (`qna_bench.roofline`)
    noise: NoiseFloor  # the run's canary spread and each layer's spread between processes (`qna_bench.noise`)
    every_form: pd.DataFrame  # the newest row per point and form (`frame` keeps each layer's best form)
    forms: pd.DataFrame  # eager against compiled where a point has several forms (`form_table`)
    shipped: pd.DataFrame  # as shipped against tuned, where a point measured both (`shipped_table`)
    leads: pd.DataFrame  # whether QnA's lead over each family survives compilation (`compile_leads`)


def analyse(frame: pd.DataFrame) -> Analysis:
    """Ratios, growth exponents and verdicts of a results frame (as read by `read_results`); whole models
    get their own tables instead of the layer claims."""
    every_form = latest_rows(with_roles(frame))
    problems = problem_table(every_form)
    every_form = with_problems(every_form, problems)
    every_form = every_form.assign(kind=np.where(is_model(every_form), "model", "layer"))
    data = best_forms(every_form)
    model_rows = data["kind"] == "model"
    models = model_table(data[model_rows])
    layers = data[~model_rows]
    ratios = sort_rows(ratio_frame(layers), ["problem", "mode", "subject", "role", "layer", "window"])
    comparisons = growth_comparisons(layers)
    compiled = has_compiled(every_form)
    # Failed forms that lost to a working one are failures too, named with their form.
    failed = every_form if compiled or has_shipped(every_form) else data
    failed = failed[failed["status"] != "ok"]
    failed = failed.assign(layer=[layer_label(*names) for names in
                                  zip(failed["layer"], failed[FORM_COLUMN], failed[TUNING_COLUMN])])
    failed = failed[["problem", "mode", "role", "layer", "window", "status", "reason"]]
    tuned_layers = every_form[(every_form["kind"] == "layer") & (every_form[TUNING_COLUMN] == TUNED)]
    eager_layers = tuned_layers[tuned_layers[FORM_COLUMN] == EAGER]
    return Analysis(
        frame=sort_rows(data, ["problem", "mode", "role", "layer", "window"]),
        rows_in_file=len(frame),
        problems=problems,
        ratios=ratios,
        growth=growth_table(layers),
        comparisons=comparisons,
        verdicts=verdict_table(layers, ratios, comparisons),
        failures=sort_rows(failed, ["problem", "mode", "role", "layer", "window"]),
        models=models,
        model_ratios=model_ratios(data[model_rows], models),
        layers=layers,
        roofline=roofline_frame(layers),
        noise=noise_floor(data),
        every_form=every_form,
        forms=form_table(tuned_layers),
        shipped=shipped_table(every_form[every_form["kind"] == "layer"]),
        leads=compile_leads(ratio_frame(eager_layers), ratios) if compiled else pd.DataFrame(columns=list(LEAD_COLUMNS)),
    )
