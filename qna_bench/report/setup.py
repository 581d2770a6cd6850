"""The report's header: what ran, on which machine, the problems, the plans and forms, the noise floor.
"""

from __future__ import annotations

import json

import pandas as pd

from qna_bench.analysis import (
    Analysis,
    mode_order,
    sort_rows,
)
from qna_bench.labels import CANARY_SIZE, QNA_PASSES
from qna_bench.report.appendix import _percent
from qna_bench.report.cells import _fmt, _k_list, _load_text, _values, markdown_table, timing_warnings
from qna_bench.report.forms import _form_text
from qna_bench.results import STATUSES
from qna_bench.text import image_size


def _flags_of(flags: object) -> dict:
    """A row's ``layer_flags`` as a dict ({} when absent or unreadable)."""
    try:
        record = json.loads(flags) if isinstance(flags, str) else flags
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _plan_of(flags: object) -> tuple[str, str, bool] | None:
    """(plan, source, fell back) from a QnA row's ``layer_flags``; None for a row of another form."""
    record = _flags_of(flags)
    if record.get("impl") != "fast":
        return None
    plan = record.get("plan")
    if not isinstance(plan, dict):
        return "not recorded", "", False
    order = sorted(plan, key=lambda p: (QNA_PASSES.index(p) if p in QNA_PASSES else len(QNA_PASSES), p))
    passes = ", ".join(f"{p} {plan[p]}" for p in order if p != "fft_chunk_bytes" and plan[p] not in ("direct", "linear"))
    name = str(record.get("plan_name", "?"))
    return (f"{name} ({passes})" if passes else name), str(record.get("plan_source", "")), bool(
        record.get("plan_fell_back"))


def plan_rows(data: pd.DataFrame) -> list[list[str]]:
    """QnA's plan per problem, layer, mode and plan, with its windows, as the rows record them (a row
    measured before plans were recorded says "not recorded"): what ran, never today's defaults."""
    if "layer_flags" not in data:
        return []
    found: dict[tuple[str, str, str, str], dict[str, set]] = {}
    for row in data[data["family"] == "qna"].itertuples():
        plan = _plan_of(row.layer_flags)
        if plan is None:
            continue
        text, source, fell_back = plan
        entry = found.setdefault((str(row.problem), str(row.layer), str(row.mode), text),
                                 {"windows": set(), "sources": set(), "fell_back": set()})
        entry["windows"].add(int(row.window))
        entry["sources"].update([source] if source else [])
        if fell_back:
            entry["fell_back"].add(int(row.window))
    order = {m: i for i, m in enumerate(mode_order(data["mode"].unique()))}
    keys = sorted(found, key=lambda k: (k[0], k[1], order.get(k[2], 99), min(found[k]["windows"]), k[3]))
    return [[problem, layer, mode, _k_list(found[key]["windows"]), text, ", ".join(sorted(found[key]["sources"])),
             _k_list(found[key]["fell_back"]) if found[key]["fell_back"] else ""]
            for key in keys for problem, layer, mode, text in [key]]


def form_rows(data: pd.DataFrame) -> list[list[str]]:
    """Every other layer's form per problem, layer, mode and form, with its windows and sources, as the
    rows record it (`form`, `form_source`); [] for files from before those columns."""
    if "form" not in data:
        return []
    found: dict[tuple[str, str, str, str], dict[str, set]] = {}
    for row in data[(data["family"] != "qna") & data["form"].notna()].itertuples():
        text = _form_text(row.form)
        if not text:
            continue
        entry = found.setdefault((str(row.problem), str(row.layer), str(row.mode), text), {"windows": set(), "sources": set()})
        entry["windows"].add(int(row.window))
        entry["sources"].add(str(row.form_source))
    order = {m: i for i, m in enumerate(mode_order(data["mode"].unique()))}
    keys = sorted(found, key=lambda k: (k[0], k[1], order.get(k[2], 99), min(found[k]["windows"]), k[3]))
    return [[*key[:3], _k_list(found[key]["windows"]), key[3], ", ".join(sorted(found[key]["sources"]))] for key in keys]


def noise_text(analysis: Analysis) -> str:
    """The run's noise floor (`qna_bench.noise`) and the ratios whose spread crosses a verdict line."""
    noise = analysis.noise
    parts = []
    if noise.canaries:
        parts.append(
            f"Canary (a fixed {CANARY_SIZE}² matrix product timed before and after every round, the slower of "
            f"the two kept): {noise.canaries} rounds, median {noise.canary_median_s * 1e3:.3f} ms, spread "
            f"(q75 − q25) / median {_percent(noise.canary_spread)}, slowest {_percent(noise.canary_worst)} above "
            f"the median; {noise.slow_rounds} round(s) stayed slow when measured again (flagged in `slow_rounds`).")
    else:
        parts.append("No canary was recorded (rows measured before canaries, or `measure.canary=false`).")
    if len(noise.layers):
        parts.append("Spread between processes (each round in its own worker process): max / min − 1 of a point's "
                     "round times, per layer over its points:")
        parts.append(markdown_table(
            ["layer", "points", "processes", "median spread", "largest spread"],
            [[r.layer, r.points, r.processes, _percent(r.median_spread), _percent(r.max_spread)]
             for r in noise.layers.itertuples()]))
    else:
        parts.append("No row has rounds from several processes: the spreads below cover one process's rounds only.")
    ratios = analysis.ratios
    crossing = ratios[ratios["latency_crosses"].notna()] if "latency_crosses" in ratios else ratios.iloc[0:0]
    if len(crossing):
        texts = [f"{r.layer} {r.mode} k={int(r.window)} ({r.problem}, ×{_fmt(r.latency_ratio_min)}–{_fmt(r.latency_ratio_max)}"
                 f" crosses {r.latency_crosses:g}×)" for r in crossing.itertuples()]
        parts.append(f"{len(crossing)} speed ratio(s) have a spread over rounds that crosses a verdict line "
                     "(1×, 5×, 10×), so the rounds disagree on that line: " + "; ".join(texts) + ".")
    elif (ratios.get("latency_rounds", pd.Series(dtype=int)) > 1).any():
        parts.append("No speed ratio's spread over rounds crosses a verdict line (1×, 5×, 10×).")
    return "\n\n".join(parts)


def header_section(analysis: Analysis) -> str:
    data = analysis.frame
    counts = analysis.every_form["status"].value_counts()
    statuses = ", ".join(f"{s} {int(counts.get(s, 0))}" for s in STATUSES if counts.get(s, 0))
    used = len(analysis.every_form)
    superseded = analysis.rows_in_file - used
    rows_text = f"{analysis.rows_in_file} rows" + (
        f" ({superseded} superseded by a newer measurement of the same point; {used} used)" if superseded else ""
    )
    setup = [
        ("device(s)", _values(data, "device_name")),
        ("CPU model", _values(data, "cpu_model")),
        ("torch", _values(data, "torch_version")),
        ("timm", _values(data, "timm_version")),
        ("natten", _values(data, "natten_version")),
        ("python", _values(data, "python_version")),
        ("git commit", _values(data, "git_commit")),
        ("threads", _values(data, "threads")),
        ("memory method", _values(data, "memory_method")),
        *([("load average", _load_text(data))] if "load_avg" in data else []),
        ("runs", f"{data['run_id'].nunique()} run id(s)"),
        ("rows", f"{rows_text}; statuses: {statuses}"),
    ]
    problems = []
    for _, shape in analysis.problems.iterrows():
        rows = data[data["problem"] == shape["problem"]]
        problems.append([
            shape["problem"], shape["device_name"], shape["dtype"], shape["threads"], shape["torch_version"],
            shape["batch"], image_size(shape), shape["channels"], shape["heads"], shape["head_dim"],
            shape["stride"], shape["dilation"], ", ".join(mode_order(rows["mode"].unique())),
            _k_list(rows["window"]),
        ])
    layers = sort_rows(data.drop_duplicates("layer")[["layer", "family", "role", "implementation", "uses_window"]],
                       ["role", "layer"])
    return "\n\n".join([
        "## Setup",
        markdown_table(["", ""], setup),
        "### Problems",
        markdown_table(
            ["id", "device", "dtype", "threads", "torch", "batch", "map (H×W)", "channels", "heads", "head dim",
             "stride", "dilation", "modes", "windows k"],
            problems,
        ),
        "### QnA's plans",
        "The form of each pass of QnA's fast form, as each row records it (`layer_flags`); passes not "
        "named ran direct, and projections not named as `F.linear`. Source: tuned (timed on this machine), cache (timed earlier), default "
        "(`tune=off`) or forced. Fell back: windows where the data made the FFT passes run direct.",
        markdown_table(["problem", "layer", "mode", "windows k", "plan", "source", "fell back at k"], plan_rows(data))
        if plan_rows(data) else "No QnA fast-form rows.",
        *(["### The other layers' forms",
           "The form each other layer ran, as its rows record it (`form`): `gemm` is the library of its pointwise "
           "products (`linear`: F.linear, the BLAS GEMM; `conv1x1`: a 1×1 convolution, oneDNN on CPU). Source as "
           "above; default: as built.",
           markdown_table(["problem", "layer", "mode", "windows k", "form", "source"], form_rows(data))]
          if form_rows(data) else []),
        "### Reliability of the timings",
        "\n".join(f"- {note}." for note in timing_warnings(data))
        or "No warning: every timed point had a quiet machine (where recorded), enough replicates and a narrow spread.",
        "### Noise floor",
        noise_text(analysis),
        "### Layers",
        markdown_table(
            ["layer", "family", "role", "implementation", "uses window"],
            [[r.layer, r.family, r.role, r.implementation, "no" if r.uses_window is False or r.uses_window == False else "yes"]  # noqa: E712
             for r in layers.itertuples()],
        ),
    ])
