"""The claims report: does QnA need up to 10× less memory, run up to 5× faster and scale better with
window than existing methods? Ratios to QnA, growth exponents in k and a plain verdict per claim, from a
results parquet only (never re-measures). The same parquet always gives the same bytes.

    python -m qna_bench.report RESULTS.parquet [--out DIR]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qna_bench import plots
from qna_bench.plots import (
    CLAIMED_MEMORY_FACTOR,
    CLAIMED_SPEED_FACTOR,
    CONV_FAMILY,
    MIB,
    QNA_FAMILY,
    REFERENCE_LAYER,
    SHAPE_COLUMNS,
    mode_order,
)
from qna_bench.results import STATUSES, read_results

REPORT_FILE = "report.md"

# QnA counts as leaner / faster than a peer only by at least this factor (latency noise on shared machines
# is a few per cent; memory is exact, but a 1.02× difference is no claim either).
BEAT_FACTOR = 1.1
# QnA grows more slowly in k than a peer only if its log-log exponent is at least this much lower.
EXPONENT_MARGIN = 0.1
# Below this R² a growth exponent is flagged as a poor power-law fit (noisy or not a power law).
POOR_FIT_R2 = 0.9
# Timing spread (q75 − q25) / median above which a point counts as noisy.
NOISY_SPREAD = 0.25
MIN_REPLICATES = 3
# Above this share of timed points with a warning, the verdicts carry a caution.
CAUTION_SHARE = 0.05

HOLDS, PARTLY, NOT_HOLD, NOT_TESTED = "holds", "holds partly", "does not hold on this device", "not tested"
VERDICT_ORDER = (HOLDS, PARTLY, NOT_HOLD, NOT_TESTED)

ROLE_QNA = "QnA (under test)"
ROLE_NAIVE = "QnA naive form"
ROLE_VARIANT = "QnA variant"
ROLE_ATTENTION = "attention peer"
ROLE_CONV = "convolution"
ROLE_ORDER = (ROLE_QNA, ROLE_NAIVE, ROLE_VARIANT, ROLE_ATTENTION, ROLE_CONV)


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    quote: str
    ratio_column: str | None = None
    target: float | None = None


MEMORY = Claim(
    "memory", "Memory: up to 10× less", "requiring up-to x10 less memory", "memory_ratio", CLAIMED_MEMORY_FACTOR
)
SPEED = Claim("speed", "Speed: up to 5× faster", "while being up-to x5 faster", "latency_ratio", CLAIMED_SPEED_FACTOR)
SCALING = Claim("scaling", "Scaling with window", "scales especially well with window size")
CLAIMS = (MEMORY, SPEED, SCALING)

RULES = f"""\
The verdicts compare QnA (layer `qna`) with the **attention peers**: every layer whose family is neither
`qna` nor `conv`. QnA's other forms (family `qna`, e.g. `qna_reference`, the naive form) and the
convolutions are shown in every table but are outside the verdicts; the conditions mention the
convolutions separately. A ratio is a peer's value divided by QnA's at the same problem (device, dtype,
batch, height, width, channels, heads, stride, dilation), mode and window, both rows `ok` (for memory, a
`timeout` row counts too: its memory pass completed); above 1 means
QnA is leaner / faster. Verdicts are per device and mode, pooling every problem shape measured there.

- **Memory** (target T = {CLAIMED_MEMORY_FACTOR:g}×, on peak memory above inputs) and **speed**
  (T = {CLAIMED_SPEED_FACTOR:g}×, on median latency): let *best* be the largest ratio over all attention peers,
  windows and problems.
  - `{HOLDS}`: best ≥ T — some attention peer needs at least T times QnA's memory (time) somewhere;
  - `{PARTLY}`: {BEAT_FACTOR:g} ≤ best < T — QnA beats some attention peer by at least {BEAT_FACTOR:g}×, but never by T;
  - `{NOT_HOLD}`: best < {BEAT_FACTOR:g} — QnA is never {BEAT_FACTOR:g}× leaner (faster) than any attention peer;
  - `{NOT_TESTED}`: no attention peer and QnA both `ok` at a common point.
  - The headline and conditions also give the ratio against the *strongest* peer at each point (the
    smallest ratio among the attention peers measured there): what QnA gains over the best alternative
    at that window. Peers without a number at a point (timeout, oom) are not in it, so at large windows
    it covers the peers fast enough to be measured.
- **Scaling with window**: for each layer, problem and mode, the growth exponent e of latency and of peak
  memory in k is the least-squares slope of log(metric) against log(k) over the layer's `ok` windows
  (n/a below 2 windows). A *comparison* is (problem, metric, attention peer that uses the window), both
  exponents known; QnA *grows more slowly* when e_QnA ≤ e_peer − {EXPONENT_MARGIN:g}. Layers that ignore the
  window (e.g. global attention) are not compared.
  - `{HOLDS}`: QnA grows more slowly in every comparison (every such peer, latency and memory);
  - `{PARTLY}`: in at least one comparison, not all;
  - `{NOT_HOLD}`: in none;
  - `{NOT_TESTED}`: no comparison possible.
- **Overall** (per claim, over modes): `{HOLDS}` if it holds in every tested mode, `{PARTLY}` if it holds or
  holds partly in at least one, `{NOT_HOLD}` if it does not hold in any tested mode, `{NOT_TESTED}` if no
  mode was tested.
"""


@dataclass(frozen=True)
class Analysis:
    """Everything the report says, as tables (the notebook shows the same frames)."""

    frame: pd.DataFrame  # the latest row per point, with `problem` (P1, P2, ...) and `role`
    rows_in_file: int
    problems: pd.DataFrame  # problem id and its shape columns
    ratios: pd.DataFrame  # one row per non-QnA layer, problem, mode, window with both rows ok
    growth: pd.DataFrame  # one row per layer, problem, mode
    verdicts: pd.DataFrame  # one row per device, claim, mode (and mode "overall")
    failures: pd.DataFrame  # non-ok rows


# ----------------------------------------------------------------------------------------------------
# Analysis


def role(layer: str, family: str) -> str:
    if layer == REFERENCE_LAYER:
        return ROLE_QNA
    if family == QNA_FAMILY:
        return ROLE_NAIVE if layer == "qna_reference" else ROLE_VARIANT
    if family == CONV_FAMILY:
        return ROLE_CONV
    return ROLE_ATTENTION


def _role_rank(value: str) -> int:
    return ROLE_ORDER.index(value)


def _sort(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Sort by ``columns``, roles in reading order, modes forward before train."""
    modes = mode_order(frame["mode"].unique()) if "mode" in frame else []
    keyed = frame.assign(
        _role=frame["role"].map(_role_rank) if "role" in frame else 0,
        _mode=frame["mode"].map(modes.index) if "mode" in frame else 0,
        _problem=frame["problem"].map(lambda p: int(p[1:])) if "problem" in frame else 0,
    )
    replace = {"role": "_role", "mode": "_mode", "problem": "_problem"}
    order = [replace.get(c, c) for c in columns]
    return keyed.sort_values(order, kind="mergesort").drop(columns=["_role", "_mode", "_problem"]).reset_index(drop=True)


def problem_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Each distinct problem shape (device included) with a short id P1, P2, ... in sorted order."""
    shapes = frame[SHAPE_COLUMNS].drop_duplicates().sort_values(SHAPE_COLUMNS, kind="mergesort").reset_index(drop=True)
    shapes.insert(0, "problem", [f"P{i + 1}" for i in range(len(shapes))])
    return shapes


def fit_growth(windows: Iterable[float], values: Iterable[float]) -> tuple[float, float, int] | None:
    """Least-squares slope of log(value) on log(window), its R² and the number of points; None below two
    distinct windows. Non-positive or missing values are left out."""
    pairs = [(float(k), float(v)) for k, v in zip(windows, values) if not _missing(v) and float(v) > 0 and float(k) > 0]
    if len({k for k, _ in pairs}) < 2:
        return None
    x = np.log(np.array([k for k, _ in pairs]))
    y = np.log(np.array([v for _, v in pairs]))
    dx, dy = x - x.mean(), y - y.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    residual = y - (y.mean() + slope * dx)
    ss_tot = float((dy * dy).sum())
    r2 = 1.0 - float((residual * residual).sum()) / ss_tot if ss_tot > 0 else 1.0
    return slope, r2, len(pairs)


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def growth_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per layer, problem and mode: latency and memory growth exponents in k with R² and point count."""
    rows = []
    for (problem, mode, layer), group in frame.groupby(["problem", "mode", "layer"], sort=True):
        ok = group[group["status"] == "ok"].sort_values("window")
        record = dict(
            problem=problem, mode=mode, layer=layer, family=group["family"].iloc[0], role=group["role"].iloc[0],
            uses_window=bool(group["uses_window"].fillna(True).iloc[0]), windows=len(group), ok_windows=len(ok),
        )
        for metric, column in (("latency", "median_s"), ("memory", "peak_bytes")):
            fit = fit_growth(ok["window"], ok[column].astype("Float64"))
            record[f"{metric}_exponent"] = fit[0] if fit else float("nan")
            record[f"{metric}_r2"] = fit[1] if fit else float("nan")
            record[f"{metric}_n"] = fit[2] if fit else 0
        rows.append(record)
    columns = [
        "problem", "mode", "layer", "family", "role", "uses_window", "windows", "ok_windows",
        "latency_exponent", "latency_r2", "latency_n", "memory_exponent", "memory_r2", "memory_n",
    ]
    table = pd.DataFrame(rows, columns=columns)
    return _sort(table, ["problem", "mode", "role", "layer"]) if len(table) else table


def failure_table(frame: pd.DataFrame) -> pd.DataFrame:
    failed = frame[frame["status"] != "ok"]
    columns = ["problem", "mode", "role", "layer", "window", "status", "reason"]
    return _sort(failed[columns], ["problem", "mode", "role", "layer", "window"]) if len(failed) else failed[columns]


def analyse(frame: pd.DataFrame) -> Analysis:
    """Ratios, growth exponents and verdicts of a results frame (as read by `read_results`)."""
    data = plots.latest_rows(frame)
    problems = problem_table(data)
    data = data.merge(problems, on=SHAPE_COLUMNS, how="left")
    data["role"] = [role(layer, family) for layer, family in zip(data["layer"], data["family"])]
    ratios = plots.ratio_frame(data)
    for column in ("latency_ratio", "latency_ratio_low", "memory_ratio"):
        ratios[column] = ratios[column].astype(float)
    ratios = _sort(ratios, ["problem", "mode", "role", "layer", "window"]) if len(ratios) else ratios
    growth = growth_table(data)
    verdicts = verdict_table(data, ratios, growth)
    return Analysis(_sort(data, ["problem", "mode", "role", "layer", "window"]), len(frame), problems, ratios, growth,
                    verdicts, failure_table(data))


# ----------------------------------------------------------------------------------------------------
# Verdicts


def _fmt(value: float, digits: int = 2) -> str:
    if _missing(value):
        return "n/a"
    text = f"{float(value):.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _x(value: float) -> str:
    return f"{_fmt(value)}×"


def _problem_label(problem: str, problems: pd.DataFrame) -> str:
    shape = problems.set_index("problem").loc[problem]
    return f"{shape['height']}×{shape['width']} ({problem})"


def _windows_text(hit: Sequence[int], all_windows: Sequence[int]) -> str:
    """`all k (3–11)`, `k ≥ 7`, or `k ∈ {5, 9}` for the windows ``hit`` among ``all_windows``."""
    hit, all_windows = sorted(set(hit)), sorted(set(all_windows))
    if len(hit) == 1:
        return f"k = {hit[0]}"
    if hit == all_windows:
        return f"all k ({hit[0]}–{hit[-1]})"
    if hit == [k for k in all_windows if k >= hit[0]]:
        return f"k ≥ {hit[0]}"
    return "k ∈ {" + ", ".join(str(k) for k in hit) + "}"


def _where_at_least(rows: pd.DataFrame, column: str, threshold: float, problems: pd.DataFrame) -> str:
    parts = []
    for problem, group in rows.groupby("problem", sort=False):
        hit = group.loc[group[column] >= threshold, "window"].astype(int).tolist()
        if hit:
            parts.append(f"{_windows_text(hit, group['window'].astype(int).tolist())} at {_problem_label(problem, problems)}")
    return "; ".join(parts)


def _best(rows: pd.DataFrame, column: str) -> pd.Series:
    """The row with the largest ratio (ties: the smallest problem id, then window)."""
    ranked = rows.assign(_neg=-rows[column]).sort_values(["_neg", "problem", "window"], kind="mergesort")
    return ranked.iloc[0]


def _best_text(best: pd.Series, column: str, problems: pd.DataFrame) -> str:
    return f"{_x(best[column])} at k={int(best['window'])}, {_problem_label(best['problem'], problems)}"


def _strongest(peers: pd.DataFrame, column: str) -> pd.DataFrame:
    """At each problem and window, the attention peer closest to QnA (the smallest ratio: the leanest or
    fastest peer measured there); ties go to the first layer by name."""
    ranked = _sort(peers, ["problem", "window", "layer"]).sort_values(["problem", "window", column], kind="mergesort")
    return ranked.drop_duplicates(["problem", "window"]).reset_index(drop=True)


def _strongest_text(strongest: pd.DataFrame, column: str, target: float, verb: str, problems: pd.DataFrame) -> str:
    worst = _sort(strongest, ["problem", "window"]).sort_values(column, kind="mergesort").iloc[0]
    best = _best(strongest, column)
    which = ", ".join(f"{layer} at {count} point{'s' if count > 1 else ''}"
                      for layer, count in strongest["layer"].value_counts().sort_index().items())
    text = (f"Against the strongest attention peer at each point (the {'leanest' if verb == 'leaner' else 'fastest'} "
            f"one measured there: {which}), QnA is {_x(worst[column])} at worst (k={int(worst['window'])}, "
            f"{_problem_label(worst['problem'], problems)}, vs {worst['layer']}) and {_best_text(best, column, problems)} "
            f"at best (vs {best['layer']})")
    reach = _where_at_least(strongest, column, target, problems)
    if reach:
        return f"{text}; ≥{target:g}× {verb} than every peer measured there at {reach}"
    return f"{text}; never ≥{target:g}× {verb} than every peer measured at a point"


def _layers_in_order(rows: pd.DataFrame) -> list[str]:
    ordered = _sort(rows.drop_duplicates("layer")[["layer", "role"]], ["role", "layer"])
    return ordered["layer"].tolist()


def _ratio_verdict(
    claim: Claim, ratios: pd.DataFrame, data: pd.DataFrame, problems: pd.DataFrame
) -> tuple[str, str, list[str]]:
    column, target = claim.ratio_column, claim.target
    rows = ratios[ratios[column].notna()]
    rows = _sort(rows, ["problem", "role", "layer", "window"]) if len(rows) else rows
    peers = rows[rows["role"] == ROLE_ATTENTION]
    verb = "leaner" if claim is MEMORY else "faster"
    conditions = []
    if not len(peers):
        verdict, headline = NOT_TESTED, "no attention peer measured next to QnA"
    else:
        best = _best(peers, column)
        value = float(best[column])
        verdict = HOLDS if value >= target else PARTLY if value >= BEAT_FACTOR else NOT_HOLD
        strongest = _strongest(peers, column)
        headline = (f"best {_best_text(best, column, problems)} vs {best['layer']}; against the strongest peer "
                    f"at each point, {_x(strongest[column].min())} to {_x(strongest[column].max())}")
        conditions.append(_strongest_text(strongest, column, target, verb, problems))
        reach, partial, never = [], [], []
        for layer in _layers_in_order(peers):
            own = peers[peers["layer"] == layer]
            top = _best(own, column)
            if top[column] >= target:
                reach.append(f"{layer} ({_where_at_least(own, column, target, problems)}; up to {_best_text(top, column, problems)})")
            elif top[column] >= BEAT_FACTOR:
                partial.append(f"{layer} (≥{BEAT_FACTOR:g}× at {_where_at_least(own, column, BEAT_FACTOR, problems)}; "
                               f"up to {_best_text(top, column, problems)})")
            else:
                never.append(f"{layer} (best {_best_text(top, column, problems)})")
        if reach:
            conditions.append(f"QnA is ≥{target:g}× {verb} than: " + "; ".join(reach))
        if partial:
            conditions.append(f"QnA is {BEAT_FACTOR:g}–{target:g}× {verb} than: " + "; ".join(partial))
        if never:
            conditions.append(f"QnA is never {BEAT_FACTOR:g}× {verb} than: " + "; ".join(never))
    for label, wanted in (("Convolutions", ROLE_CONV), ("QnA's other forms", None)):
        others = rows[rows["role"] == wanted] if wanted else rows[rows["role"].isin([ROLE_NAIVE, ROLE_VARIANT])]
        if len(others):
            texts = []
            for layer in _layers_in_order(others):
                own = others[others["layer"] == layer]
                top = _best(own, column)
                texts.append(f"{layer} {_x(own[column].min())} to {_x(top[column])} (largest at k={int(top['window'])}, "
                             f"{_problem_label(top['problem'], problems)})")
            conditions.append(f"{label} (outside the verdict), ratio range: " + "; ".join(texts))
    # A peer that failed (e.g. oom) where QnA ran has no ratio: list it so the gap is visible, never count it.
    qna_ok = data[(data["layer"] == REFERENCE_LAYER) & (data["status"] == "ok")][["problem", "window"]]
    failed = data[(data["role"] == ROLE_ATTENTION) & (data["status"] != "ok")].merge(qna_ok, on=["problem", "window"])
    if len(failed):
        texts = []
        for (layer, status, problem), group in _sort(failed, ["role", "layer", "status", "problem", "window"]).groupby(
            ["layer", "status", "problem"], sort=False
        ):
            windows = ", ".join(str(k) for k in group["window"].astype(int))
            texts.append(f"{layer} {status} at {_problem_label(problem, problems)}, k={windows}")
        conditions.append("Attention peers without a number where QnA ran (not counted): " + "; ".join(texts))
    return verdict, headline, conditions


def _scaling_verdict(growth: pd.DataFrame, problems: pd.DataFrame) -> tuple[str, str, list[str]]:
    conditions = []
    wins = total = 0
    for problem in sorted(growth["problem"].unique(), key=lambda p: int(p[1:])):
        group = growth[growth["problem"] == problem]
        qna = group[group["layer"] == REFERENCE_LAYER]
        label = _problem_label(problem, problems)
        peers = group[(group["role"] == ROLE_ATTENTION) & group["uses_window"]]
        for metric in ("latency", "memory"):
            exponent = f"{metric}_exponent"
            if not len(qna) or _missing(qna[exponent].iloc[0]):
                conditions.append(f"{label} {metric}: no QnA exponent (fewer than 2 ok windows)")
                continue
            e_qna = float(qna[exponent].iloc[0])
            slower, not_slower = [], []
            for layer, e_peer, r2 in zip(peers["layer"], peers[exponent], peers[f"{metric}_r2"]):
                if _missing(e_peer):
                    continue
                total += 1
                text = f"{layer} {_growth_text(e_peer, r2)}"
                if e_qna <= float(e_peer) - EXPONENT_MARGIN:
                    wins += 1
                    slower.append(text)
                else:
                    not_slower.append(text)
            parts = [f"{label} {metric}: QnA {_growth_text(e_qna, qna[f'{metric}_r2'].iloc[0])}"]
            if slower:
                parts.append("grows more slowly than " + ", ".join(slower))
            if not_slower:
                parts.append("not more slowly than " + ", ".join(not_slower))
            if not slower and not not_slower:
                parts.append("no attention peer with an exponent")
            convs = group[(group["role"] == ROLE_CONV) & group[exponent].notna()]
            if len(convs):
                parts.append("convolutions (outside the verdict): "
                             + ", ".join(f"{layer} {_growth_text(e, r2)}"
                                         for layer, e, r2 in zip(convs["layer"], convs[exponent], convs[f"{metric}_r2"])))
            conditions.append("; ".join(parts))
        ignoring = group[(group["role"] == ROLE_ATTENTION) & ~group["uses_window"]]
        if len(ignoring):
            conditions.append(f"{label}: not compared (ignore the window): " + ", ".join(ignoring["layer"]))
    if total == 0:
        return NOT_TESTED, "no exponent to compare", conditions
    verdict = HOLDS if wins == total else PARTLY if wins else NOT_HOLD
    return verdict, f"QnA grows more slowly in {wins} of {total} comparisons", conditions


def _growth_text(exponent: float, r2: float) -> str:
    flag = f" (poor fit, R² {_fmt(r2)})" if not _missing(r2) and r2 < POOR_FIT_R2 else ""
    return f"k^{_fmt(exponent)}{flag}"


def _timed(data: pd.DataFrame) -> pd.DataFrame:
    return data[(data["status"] == "ok") & data["median_s"].notna()]


def _timing_flags(ok: pd.DataFrame) -> dict[str, pd.Series]:
    """Per timed row: started on a busy machine, too few replicates, a wide spread."""
    # The sweep's own threads count in the load average: a core's worth beyond them is other work.
    if "load_avg" in ok:
        busy = (ok["load_avg"].astype(float) > ok["threads"].astype(float) + 1).fillna(False)
    else:
        busy = pd.Series(False, index=ok.index)
    return {
        "busy": busy,
        "few": ok["n"].fillna(0).astype(int) < MIN_REPLICATES,
        "wide": ((ok["q75_s"].astype(float) - ok["q25_s"].astype(float)) / ok["median_s"].astype(float)) > NOISY_SPREAD,
    }


def timing_warnings(data: pd.DataFrame) -> list[str]:
    """Why the latencies of these rows may not be trusted: a busy machine, too few replicates, wide spread."""
    ok = _timed(data)
    if not len(ok):
        return []
    flags, total = _timing_flags(ok), len(ok)
    notes = []
    busy = ok[flags["busy"]]
    if len(busy):
        notes.append(
            f"{len(busy)} of {total} timed points started with the 1-minute load average above their thread count + 1 "
            f"(up to {_fmt(busy['load_avg'].astype(float).max())} for {_values(busy, 'threads')} thread(s)): other "
            "work shared the cores, so latencies, speed ratios and latency exponents are unreliable"
        )
    if flags["few"].any():
        notes.append(f"{int(flags['few'].sum())} of {total} timed points have fewer than {MIN_REPLICATES} timing replicates "
                     "(no spread to judge)")
    if flags["wide"].any():
        notes.append(f"{int(flags['wide'].sum())} of {total} timed points have a timing spread (q75 − q25) / median above "
                     f"{NOISY_SPREAD:.0%}")
    return notes


def timings_unreliable(data: pd.DataFrame) -> bool:
    """More than `CAUTION_SHARE` of the timed points carry a timing warning."""
    ok = _timed(data)
    if not len(ok):
        return False
    flags = _timing_flags(ok)
    flagged = flags["busy"] | flags["few"] | flags["wide"]
    return flagged.sum() > CAUTION_SHARE * len(ok)


def _overall(verdicts: Sequence[str]) -> str:
    tested = [v for v in verdicts if v != NOT_TESTED]
    if not tested:
        return NOT_TESTED
    if all(v == HOLDS for v in tested):
        return HOLDS
    if any(v in (HOLDS, PARTLY) for v in tested):
        return PARTLY
    return NOT_HOLD


def verdict_table(data: pd.DataFrame, ratios: pd.DataFrame, growth: pd.DataFrame) -> pd.DataFrame:
    """One row per device, claim and mode, plus an `overall` row per device and claim."""
    problems = data.drop_duplicates("problem")[["problem", *SHAPE_COLUMNS]]
    records = []
    for device in sorted(data["device_name"].dropna().unique()):
        on_device = data[data["device_name"] == device]
        device_problems = set(on_device["problem"])
        modes = mode_order(on_device["mode"].unique())
        for claim in CLAIMS:
            per_mode = []
            for mode in modes:
                here = on_device[on_device["mode"] == mode]
                if claim.ratio_column:
                    sub = ratios[ratios["problem"].isin(device_problems) & (ratios["mode"] == mode)]
                    verdict, headline, conditions = _ratio_verdict(claim, sub, here, problems)
                else:
                    sub = growth[growth["problem"].isin(device_problems) & (growth["mode"] == mode)]
                    verdict, headline, conditions = _scaling_verdict(sub, problems)
                per_mode.append(verdict)
                records.append(dict(device_name=device, claim=claim.key, mode=mode, verdict=verdict,
                                    headline=headline, conditions=tuple(conditions)))
            overall = _overall(per_mode)
            summary = ", ".join(f"{mode}: {v}" for mode, v in zip(modes, per_mode))
            records.append(dict(device_name=device, claim=claim.key, mode="overall", verdict=overall,
                                headline=summary, conditions=()))
    return pd.DataFrame(records, columns=["device_name", "claim", "mode", "verdict", "headline", "conditions"])


# ----------------------------------------------------------------------------------------------------
# Markdown


def _cell(value) -> str:
    text = "" if _missing(value) else str(value)
    text = " ".join(text.split())
    if len(text) > 300:
        text = text[:299] + "…"
    return text.replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _values(frame: pd.DataFrame, column: str) -> str:
    values = sorted({str(v) for v in frame[column].dropna().unique()})
    return ", ".join(values) if values else "n/a"


def _load_text(data: pd.DataFrame) -> str:
    """The 1-minute load average the points started under (other work on the cores spoils timings)."""
    load = data["load_avg"].astype(float).dropna()
    if not len(load):
        return "n/a"
    return f"{_fmt(load.min())} to {_fmt(load.max())} (median {_fmt(load.median())}) at the start of the points"


def header_section(analysis: Analysis) -> str:
    data = analysis.frame
    counts = data["status"].value_counts()
    statuses = ", ".join(f"{s} {int(counts.get(s, 0))}" for s in STATUSES if counts.get(s, 0))
    superseded = analysis.rows_in_file - len(data)
    rows_text = f"{analysis.rows_in_file} rows" + (
        f" ({superseded} superseded by a later measurement of the same point; {len(data)} used)" if superseded else ""
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
            shape["problem"], shape["device_name"], shape["dtype"], shape["batch"], f"{shape['height']}×{shape['width']}",
            shape["channels"], shape["heads"], shape["stride"], shape["dilation"],
            ", ".join(mode_order(rows["mode"].unique())),
            ", ".join(str(k) for k in sorted(rows["window"].astype(int).unique())),
        ])
    layers = _sort(data.drop_duplicates("layer")[["layer", "family", "role", "implementation", "uses_window"]],
                   ["role", "layer"])
    return "\n\n".join([
        "## Setup",
        markdown_table(["", ""], setup),
        "### Problems",
        markdown_table(
            ["id", "device", "dtype", "batch", "map (H×W)", "channels", "heads", "stride", "dilation", "modes", "windows k"],
            problems,
        ),
        "### Reliability of the timings",
        "\n".join(f"- {note}." for note in timing_warnings(data))
        or "No warning: every timed point had a quiet machine (where recorded), enough replicates and a narrow spread.",
        "### Layers",
        markdown_table(
            ["layer", "family", "role", "implementation", "uses window"],
            [[r.layer, r.family, r.role, r.implementation, "no" if r.uses_window is False or r.uses_window == False else "yes"]  # noqa: E712
             for r in layers.itertuples()],
        ),
    ])


def verdict_section(analysis: Analysis) -> str:
    parts = ["## Verdicts"]
    verdicts = analysis.verdicts
    if not len(verdicts):
        return "## Verdicts\n\nNo rows."
    for device in sorted(verdicts["device_name"].unique()):
        on_device = verdicts[verdicts["device_name"] == device]
        modes = [m for m in on_device["mode"].unique() if m != "overall"]
        rows = []
        for claim in CLAIMS:
            mine = on_device[on_device["claim"] == claim.key].set_index("mode")
            rows.append([f"{claim.title} (“{claim.quote}”)"]
                        + [f"**{mine.loc[m, 'verdict']}**: {mine.loc[m, 'headline']}" for m in modes]
                        + [f"**{mine.loc['overall', 'verdict']}**"])
        parts += [f"### On {device}", markdown_table(["claim", *modes, "overall"], rows)]
        if timings_unreliable(analysis.frame[analysis.frame["device_name"] == device]):
            parts.append(f"**Caution:** the timings on this device are noisy (over {CAUTION_SHARE:.0%} of the timed points "
                         "carry a warning, see *Reliability of the timings*): the speed "
                         "and latency-growth verdicts may not survive a re-measurement on a quiet machine. Peak memory "
                         "does not depend on load.")
        parts.append("Conditions:")
        bullets = []
        for claim in CLAIMS:
            for mode in modes:
                row = on_device[(on_device["claim"] == claim.key) & (on_device["mode"] == mode)].iloc[0]
                bullets.append(f"- **{claim.title}, {mode}: {row['verdict']}** — {row['headline']}.")
                bullets += [f"  - {' '.join(text.split())}" for text in row["conditions"]]
        parts.append("\n".join(bullets))
    parts += ["### How the verdicts are decided", RULES.strip()]
    return "\n\n".join(parts)


def _grid(rows: pd.DataFrame, value_column: str, fmt, windows: Sequence[int], status_of=None) -> list[list[str]]:
    out = []
    for layer in _layers_in_order(rows):
        own = rows[rows["layer"] == layer].set_index("window")
        line = [layer, own["role"].iloc[0]]
        for k in windows:
            if k in own.index and not _missing(own.loc[k, value_column]):
                line.append(fmt(own.loc[k, value_column]))
            else:
                line.append(status_of(layer, k) if status_of else "—")
        out.append(line)
    return out


def ratio_section(analysis: Analysis, claim: Claim) -> str:
    column = claim.ratio_column
    noun = "peak memory" if claim is MEMORY else "median latency"
    parts = [
        f"## {claim.title.split(':')[0]} ratio: peer {noun} / QnA {noun}",
        f"Above 1: QnA is {'leaner' if claim is MEMORY else 'faster'}; the claim is {claim.target:g}×. "
        "Attention peers decide the verdict; convolutions and QnA's other forms are shown for reference.",
    ]
    ratios = analysis.ratios[analysis.ratios[column].notna()] if len(analysis.ratios) else analysis.ratios
    if not len(ratios):
        return "\n\n".join([*parts, "No layer was measured next to QnA at a common point."])
    problems = analysis.problems
    largest = []
    cautious = claim is SPEED and "latency_ratio_low" in ratios
    for (layer, mode), group in _sort(ratios, ["role", "layer", "mode"]).groupby(["layer", "mode"], sort=False):
        best = _best(group, column)
        largest.append([layer, best["role"], mode, _x(best[column]), int(best["window"]),
                        f"{best['height']}×{best['width']}", best["problem"]]
                       + ([_x(best["latency_ratio_low"])] if cautious else []))
    peers = ratios[ratios["role"] == ROLE_ATTENTION]
    if len(peers):
        best = _best(peers, column)
        parts.append(f"Largest against an attention peer: **{_best_text(best, column, problems)}, {best['mode']}, "
                     f"vs {best['layer']}**.")
    parts += ["### Largest ratio per layer and mode",
              markdown_table(["layer", "role", "mode", "largest", "at k", "map", "problem"]
                             + (["same point, cautious (layer q25 / QnA q75)"] if cautious else []), largest)]
    data = analysis.frame
    for (problem, mode), group in _sort(ratios, ["problem", "mode"]).groupby(["problem", "mode"], sort=False):
        here = data[(data["problem"] == problem) & (data["mode"] == mode)]
        windows = sorted(here["window"].astype(int).unique())
        status = {(r.layer, int(r.window)): r.status for r in here.itertuples()}

        def status_of(layer: str, k: int, status=status) -> str:
            qna = status.get((REFERENCE_LAYER, k))
            mine = status.get((layer, k))
            if qna is None or mine is None:
                return "—"
            if qna != "ok":
                return f"QnA {qna}"
            return mine if mine != "ok" else "—"

        parts += [f"### {mode}, {_problem_label(problem, problems)}",
                  markdown_table(["layer", "role", *[f"k={k}" for k in windows]],
                                 _grid(group, column, _fmt, windows, status_of))]
    return "\n\n".join(parts)


def growth_section(analysis: Analysis) -> str:
    rows = []
    for r in analysis.growth.itertuples():
        rows.append([
            r.problem, r.mode, r.layer, r.role, "yes" if r.uses_window else "no", f"{r.ok_windows}/{r.windows}",
            _fmt(r.latency_exponent), _fmt(r.latency_r2, 3), r.latency_n,
            _fmt(r.memory_exponent), _fmt(r.memory_r2, 3), r.memory_n,
        ])
    return "\n\n".join([
        "## Growth with window",
        "Least-squares slope e of log(metric) against log(k) over each layer's ok windows: the metric grows "
        "like k^e (e = 2: quadruples when k doubles; e = 0: flat). R² is the fit quality (1: an exact power "
        "law; with 2 points it is always 1); n is the number of points; n/a below 2 ok windows.",
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
    for (problem, mode, layer), group in _sort(ok, ["problem", "mode", "role", "layer", "window"]).groupby(
        ["problem", "mode", "layer"], sort=False
    ):
        note = group["memory_note"].dropna()
        rows.append([problem, mode, layer, ", ".join(str(k) for k in group["window"].astype(int)),
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
    for (layer, status), group in _sort(failures, ["role", "layer", "status"]).groupby(["layer", "status"], sort=False):
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
    data = analysis.frame
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
            markdown_table(header, _grid(ms, "ms", lambda v: _fmt(v, 3), windows, status_of)),
            f"### {mode}, {_problem_label(problem, analysis.problems)}: peak memory (MiB)",
            markdown_table(header, _grid(ms, "mib", lambda v: _fmt(v, 2), windows, status_of)),
        ]
    return "\n\n".join(parts)


def figures_section(figures: Sequence[Path | str]) -> str:
    if not figures:
        return ""
    captions = {
        "latency": "Median latency vs window",
        "memory": "Peak memory vs window",
        "ratio_to_qna": "Each layer relative to QnA (dash-dot: the claimed factor)",
        "pareto": "Latency vs peak memory, marker size: window",
        "roofline": "Roofline: achieved FLOP/s against arithmetic intensity under the probed roofs",
    }
    lines = ["## Figures"]
    for figure in figures:
        name = Path(figure).name
        lines.append(f"![{captions.get(Path(figure).stem, name)}]({name})")
    return "\n\n".join(lines)


def render(analysis: Analysis, figures: Sequence[Path | str] = ()) -> str:
    """The whole report as markdown (deterministic: sorted rows, fixed precision, no dates)."""
    if not analysis.rows_in_file:
        return "# QnA claims report\n\nThe results file has no rows.\n"
    sections = [
        "# QnA claims report",
        "QnA (arXiv 2112.11435) “scales especially well with window size, requiring up-to x10 less memory while "
        "being up-to x5 faster than existing methods”. This report checks each part against the peers measured "
        "in this results file.",
        header_section(analysis),
        verdict_section(analysis),
        ratio_section(analysis, MEMORY),
        ratio_section(analysis, SPEED),
        growth_section(analysis),
        failures_section(analysis),
        measurements_section(analysis),
        roofline_section(analysis),
        figures_section(figures),
    ]
    return "\n\n".join(s for s in sections if s).rstrip() + "\n"


def write_report(results_path: str | Path, out_dir: str | Path | None = None, draw: bool = True) -> Path:
    """Write report.md (and, with ``draw``, the figures) next to the parquet or into ``out_dir``."""
    results_path = Path(results_path)
    out_dir = Path(out_dir) if out_dir is not None else results_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plots.draw_figures(results_path, out_dir) if draw else []
    text = render(analyse(read_results(results_path)), figures)
    path = out_dir / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    return path


def newest_results(root: str | Path) -> Path | None:
    """The most recently written ``results/**/results.parquet`` under ``root``, or None."""
    found = sorted(Path(root).glob("results/**/results.parquet"), key=lambda p: (p.stat().st_mtime, str(p)))
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results parquet written by run_bench.py")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.md and the figures (default: next to the parquet)")
    parser.add_argument("--no-figures", action="store_true", help="write report.md only")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results={args.results}: no such file (give a results.parquet written by run_bench.py)")
    print(write_report(args.results, args.out, draw=not args.no_figures))


# Far-below points listed in the roofline section, lowest fraction first.
FAR_BELOW_LISTED = 20


def _percent(value: float) -> str:
    return "n/a" if _missing(value) else f"{100 * float(value):.1f}%"


def roofline_section(analysis: Analysis) -> str:
    """How close each layer runs to the probed roofs: the fraction of the roof per layer, mode and window,
    the points far below it (with their profiles) and any point above it."""
    from qna_bench import roofline

    points = roofline.roofline_frame(analysis.frame)
    if points.empty:
        return ""
    parts = [
        "## Roofline: how close each layer runs to this machine's limits",
        "Fraction of the roof = achieved FLOP/s ÷ min(peak FLOP/s, intensity × peak bytes/s), with the intensity "
        "from the layer's closed-form minimum bytes moved. The peaks are this run's machine probes (same device, "
        "dtype and threads as the points): "
        + "; ".join(
            f"{device} {dtype}: {_fmt(group['peak_flops_probe'].median() / 1e9, 1)} GFLOP/s, "
            f"{_fmt(group['peak_bytes_per_s_probe'].median() / 1e9, 1)} GB/s "
            f"(ridge at {_fmt(group['peak_flops_probe'].median() / group['peak_bytes_per_s_probe'].median(), 1)} "
            "FLOP/byte)"
            for (device, dtype), group in points.groupby(["device_name", "dtype"], sort=True)
        )
        + ". A memory-bound point's fraction is its achieved bytes/s over the probed bandwidth.",
    ]
    above = roofline.above_roof(points)
    if len(above):
        parts.append(
            f"**{len(above)} point(s) lie more than {roofline.ABOVE_ROOF_TOLERANCE:.0%} above their roof**: a probe or "
            "a count is wrong for them: "
            + ", ".join(f"{r.layer} {r.mode} k={r.window} ({_percent(r.roof_fraction)})" for r in above.itertuples())
        )
    typical = roofline.typical_fractions(points).set_index(["layer", "mode"])
    for problem, rows in points.groupby("problem", sort=True):
        windows = sorted(rows["window"].astype(int).unique())
        table = []
        for layer in _layers_in_order(rows):
            for mode in plots.mode_order(rows.loc[rows["layer"] == layer, "mode"].unique()):
                own = rows[(rows["layer"] == layer) & (rows["mode"] == mode)].set_index("window")
                line = [layer, mode, typical.loc[(layer, mode), "bound"]]
                line += [_percent(own.loc[k, "roof_fraction"]) if k in own.index else "—" for k in windows]
                line.append(_percent(own["roof_fraction"].median()))
                table.append(line)
        parts += [
            f"### {_problem_label(problem, analysis.problems)}: fraction of the roof",
            markdown_table(["layer", "mode", "bound", *[f"k={k}" for k in windows], "median"], table),
        ]
    below = roofline.far_below(points)
    if len(below):
        profiled = below["profile_file"].notna().any()
        lines = [
            [r.layer, r.mode, _problem_label(r.problem, analysis.problems), r.window, _percent(r.roof_fraction),
             _fmt(r.achieved_flops_per_s / 1e9, 2), _fmt(r.intensity, 1),
             f"[profile]({r.profile_file})" if not _missing(r.profile_file) else "—"]
            for r in below.head(FAR_BELOW_LISTED).itertuples()
        ]
        parts += [
            f"### Far below the roof (under {roofline.FAR_BELOW_FRACTION:.0%})",
            f"{len(below)} point(s), lowest first"
            + (f" (the first {FAR_BELOW_LISTED})" if len(below) > FAR_BELOW_LISTED else "")
            + ("." if profiled else "; `measure.profile=true` writes a per-op profile of every point."),
            markdown_table(["layer", "mode", "problem", "k", "of roof", "GFLOP/s", "FLOP/byte", "profile"], lines),
        ]
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
