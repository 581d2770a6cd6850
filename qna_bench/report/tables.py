"""The tables of numbers: ratios per claim, growth exponents, failures and the raw measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from qna_bench.analysis import (
    CLAIMS,
    MEMORY,
    SPEED,
    Analysis,
    Claim,
    overall,
    sort_rows,
)
from qna_bench.analysis import missing as _missing
from qna_bench.report.cells import _fmt, _k_list, _problem_label, _spread, markdown_table
from qna_bench.text import MIB


def _by_head_size(verdicts: pd.DataFrame, problems: pd.DataFrame) -> list[str]:
    """Per claim, the overall verdict at each head dimension; says so when they differ."""
    head_dim = problems.set_index("problem")["head_dim"]
    lines = []
    for claim in CLAIMS:
        mine = verdicts[verdicts["claim"] == claim.key]
        by_dim = {}
        for dim, group in mine.groupby(mine["problem"].map(head_dim), sort=True):
            by_dim[int(dim)] = (overall(group["verdict"].tolist()), sorted(group["problem"].unique(), key=lambda p: int(p[1:])))
        text = "; ".join(f"head dim {dim} ({', '.join(ps)}): {v}" for dim, (v, ps) in by_dim.items())
        differs = len({v for v, _ in by_dim.values()}) > 1
        lines.append(f"- **{claim.title}**, overall **{overall(mine['verdict'].tolist())}**"
                     + (f" — {text}" if len(by_dim) > 1 else "")
                     + (" — **the verdict depends on the head size**" if differs else "") + ".")
    return lines


def _grid(rows: pd.DataFrame, value_column: str, fmt, windows: Sequence[int], status_of=None) -> list[list[str]]:
    out = []
    ordered = sort_rows(rows.drop_duplicates("layer")[["layer", "role"]], ["role", "layer"])["layer"]
    for layer in ordered:
        own = rows[rows["layer"] == layer].set_index("window")
        line = [layer, own["role"].iloc[0]]
        for k in windows:
            if k in own.index and not _missing(own.loc[k, value_column]):
                line.append(fmt(own.loc[k]))
            else:
                line.append(status_of(layer, k) if status_of else "—")
        out.append(line)
    return out


def ratio_section(analysis: Analysis, claim: Claim) -> str:
    column = claim.ratio_column
    noun = "peak memory" if claim is MEMORY else "latency"
    parts = [
        f"## {claim.title.split(':')[0]} ratio: layer {noun} / QnA {noun}",
        f"Above 1: QnA is {claim.verb}; the claim is {claim.target:g}×. Peers decide the verdicts; baselines and "
        "references are shown for comparison.",
    ]
    if claim is SPEED:
        rounds = analysis.ratios["latency_rounds"] if len(analysis.ratios) else pd.Series(dtype=int)
        parts.append("Each ratio is the geometric mean of the per-round ratios (round r against round r); beside "
                     "it, their min–max."
                     if (rounds > 1).any() else
                     "Spread: this file has no per-round times (older format), so the ratios carry no spread.")
    ratios = analysis.ratios[analysis.ratios[column].notna()] if len(analysis.ratios) else analysis.ratios
    if not len(ratios):
        return "\n\n".join([*parts, "No layer was measured next to QnA at a common point."])
    data = analysis.frame
    for (problem, mode, subject), group in sort_rows(ratios, ["problem", "mode", "subject"]).groupby(
            ["problem", "mode", "subject"], sort=False):
        here = data[(data["problem"] == problem) & (data["mode"] == mode)]
        windows = sorted(here["window"].astype(int).unique())
        status = {(r.layer, int(r.window)): r.status for r in here.itertuples()}

        def status_of(layer: str, k: int, status=status, subject=subject) -> str:
            qna, mine = status.get((subject, k)), status.get((layer, k))
            if qna is None or mine is None:
                return "—"
            if qna != "ok":
                return f"QnA {qna}"
            return mine if mine != "ok" else "—"

        def cell(row: pd.Series, column=column) -> str:
            text = _spread(row, column)
            return text[:-1] if text.endswith("×") else text

        parts += [f"### {mode}, {_problem_label(problem, analysis.problems)}, vs {subject}",
                  markdown_table(["layer", "role", *[f"k={k}" for k in windows]],
                                 _grid(group, column, cell, windows, status_of))]
    return "\n\n".join(parts)


def growth_section(analysis: Analysis) -> str:
    rows = []
    for r in analysis.growth.itertuples():
        rows.append([
            r.problem, r.mode, r.layer, r.role, "yes" if r.uses_window else "no", f"{r.ok_windows}/{r.windows}",
            _fmt(r.latency_exponent), _fmt(r.latency_r2, 3) + (" poor" if r.latency_poor else ""), r.latency_n,
            _fmt(r.memory_exponent), _fmt(r.memory_r2, 3) + (" poor" if r.memory_poor else ""), r.memory_n,
        ])
    return "\n\n".join([
        "## Growth with window",
        "Least-squares slope e of log(metric) against log(k) over each layer's own ok windows: the metric grows "
        "like k^e (e = 2: quadruples when k doubles; e = 0: flat). R² is the fit quality (with 2 points it is "
        "always 1); n is the number of points; n/a below 2 ok windows. These describe each layer; the scaling "
        "verdict compares exponents refitted over the windows both layers measured.",
        markdown_table(
            ["problem", "mode", "layer", "role", "uses window", "ok/windows", "latency e", "latency R²", "latency n",
             "memory e", "memory R²", "memory n"],
            rows,
        ) if rows else "No rows.",
    ])


def _no_memory_text(data: pd.DataFrame) -> str:
    ok = data[(data["status"] == "ok") & data["peak_bytes"].isna()]
    if not len(ok):
        return ""
    rows = []
    for (problem, mode, layer), group in sort_rows(ok, ["problem", "mode", "role", "layer", "window"]).groupby(
        ["problem", "mode", "layer"], sort=False
    ):
        note = group["memory_note"].dropna()
        rows.append([problem, mode, layer, _k_list(group["window"]),
                     group["memory_method"].iloc[0], note.iloc[0][:160] if len(note) else ""])
    return "\n\n".join([
        "`ok` points without a peak memory (timed, but the memory pass could not see the layer):",
        markdown_table(["problem", "mode", "layer", "k", "memory method", "note"], rows),
    ])


def failures_section(analysis: Analysis) -> str:
    failures = analysis.failures
    parts = ["## Points without a measurement"]
    no_memory = _no_memory_text(analysis.frame)
    if not len(failures):
        return "\n\n".join([*parts, "Every point is `ok`.", no_memory]).rstrip()
    counts = []
    for (layer, status), group in sort_rows(failures, ["role", "layer", "status"]).groupby(["layer", "status"], sort=False):
        counts.append([layer, status, len(group)])
    parts += [
        "Missing points in the figures and tables; not counted in any ratio or exponent.",
        markdown_table(["layer", "status", "points"], counts),
        markdown_table(
            ["problem", "mode", "layer", "k", "status", "reason"],
            [[r.problem, r.mode, r.layer, int(r.window), r.status, r.reason] for r in failures.itertuples()],
        ),
    ]
    if no_memory:
        parts.append(no_memory)
    return "\n\n".join(parts)


def measurements_section(analysis: Analysis) -> str:
    data = analysis.frame[analysis.frame["kind"] == "layer"]
    parts = ["## Measurements", "Median latency (ms) and peak memory above inputs (MiB); a status where the point failed."]
    for (problem, mode), group in data.groupby(["problem", "mode"], sort=False):
        windows = sorted(group["window"].astype(int).unique())
        status = {(r.layer, int(r.window)): r.status for r in group.itertuples()}

        def status_of(layer: str, k: int, status=status) -> str:
            value = status.get((layer, k))
            return "—" if value in (None, "ok") else value

        ms = group.assign(ms=group["median_s"].astype(float) * 1e3, mib=group["peak_bytes"].astype(float) / MIB)
        header = ["layer", "role", *[f"k={k}" for k in windows]]
        parts += [
            f"### {mode}, {_problem_label(problem, analysis.problems)}: latency (ms)",
            markdown_table(header, _grid(ms, "ms", lambda r: _fmt(r["ms"], 3), windows, status_of)),
            f"### {mode}, {_problem_label(problem, analysis.problems)}: peak memory (MiB)",
            markdown_table(header, _grid(ms, "mib", lambda r: _fmt(r["mib"], 2), windows, status_of)),
        ]
    return "\n\n".join(parts)
