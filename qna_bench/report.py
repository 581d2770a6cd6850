"""The claims report: does QnA need up to 10× less memory, run up to 5× faster and scale better with
window than existing methods? Verdicts against the strongest attention peer at each point, per problem
shape, then per peer family, with the rule of each verdict; all numbers come from `qna_bench.analysis`.
The same parquet always gives the same bytes.

    python -m qna_bench.report RESULTS.parquet [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from qna_bench import plots
from qna_bench.analysis import (
    BEAT_FACTOR,
    CAUTION_SHARE,
    CLAIMS,
    EXPONENT_MARGIN,
    MEMORY,
    MIN_GROWTH_POINTS,
    MIN_REPLICATES,
    NOISY_SPREAD,
    PEER,
    POOR_FIT_R2,
    POOR_FIT_RMS,
    SPEED,
    SUBJECT,
    Analysis,
    Claim,
    analyse,
    has_compiled,
    mode_order,
    overall,
    ratio_verdict,
    sort_rows,
    strongest,
    timed,
    timing_flags,
    timings_unreliable,
    unmeasured,
    weakest,
    with_roles,
)
from qna_bench.analysis import missing as _missing
from qna_bench.labels import form_label, is_compiled, mode_of
from qna_bench.measure.canary import CANARY_SIZE
from qna_bench.qna.plans import PASSES
from qna_bench.results import STATUSES, read_results
from qna_bench.text import MIB, image_size, shape_label

REPORT_FILE = "report.md"

RULES = f"""\
Roles are declared in the layer registry (`python -m qna_bench.registry`): the **subject** is QnA (`qna`),
the **peers** are the attention layers it is judged against, grouped by family; **baselines**
(convolutions) and **references** (exact oracles kept for correctness, e.g. `qna_reference`, `na_torch`)
are shown in the tables but never vote. A ratio is a peer's value divided by QnA's at the same problem
(device, dtype, threads, torch version, batch, map, channels, heads, stride, dilation), mode and window;
above 1 QnA is leaner / faster. Each problem shape gets its own verdict.

- **Memory** (T = 10×, peak memory above inputs; a `timeout` row counts, its memory pass completed) and
  **speed** (T = 5×, latency: with rounds, the geometric mean over the rounds of the ratio of the two
  layers' round times, each the geometric mean of the round's blocks; without, the ratio of the
  medians): at each window the *strongest peer* is the peer with the smallest ratio among those measured
  there; the claim **holds** if QnA is at least T times better than the
  strongest peer at some window, **holds partly** if at least {BEAT_FACTOR:g}× there, and **does not hold**
  otherwise; QnA *loses* where the strongest peer's ratio is below 1.
- **Per family**: the same rule with each family's best implementation at each window in place of the
  strongest peer. *What ran* gives the backend those rows record (NATTEN's own choice for `na`), and says
  when it is a fallback standing in for the family's own fused kernels.
- **Scaling**: for each peer that uses the window and each metric, both growth exponents (slope of
  log(metric) on log(k)) are fitted over the windows both layers measured; a comparison votes only with
  at least {MIN_GROWTH_POINTS} shared windows and no poor fit (R² < {POOR_FIT_R2:g} with an RMS log residual
  over {POOR_FIT_RMS:g}), and QnA grows more slowly when e_QnA ≤ e_peer − {EXPONENT_MARGIN:g}; the claim **holds**
  if QnA grows more slowly in every vote, **holds partly** in some, and **does not hold** in none.
- **Overall** (per claim and problem, over modes; and per claim over everything): **holds** if every
  tested verdict holds, **holds partly** if at least one holds or holds partly, otherwise **does not hold**.
- Peers without a number where QnA has one (timeout, oom, skipped, unsupported, error) are named under each
  verdict and count in no ratio.
"""


# ----------------------------------------------------------------------------------------------------
# Text pieces


def _fmt(value: float, digits: int = 2) -> str:
    if _missing(value):
        return "n/a"
    text = f"{float(value):.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _x(value: float) -> str:
    return f"{_fmt(value)}×"


def _spread(row: pd.Series, column: str) -> str:
    """The ratio, with its min–max over interleaved rounds where the rows have rounds, and a mark when
    that spread reaches across a verdict line."""
    if column == "latency_ratio" and row.get("latency_rounds", 0) and int(row["latency_rounds"]) > 1:
        crosses = row.get("latency_crosses")
        mark = "" if _missing(crosses) else f", crosses {float(crosses):g}×"
        return (f"{_x(row[column])} ({_fmt(row['latency_ratio_min'])}–{_fmt(row['latency_ratio_max'])} over "
                f"{int(row['latency_rounds'])} rounds{mark})")
    return _x(row[column])


def _problem_label(problem: str, problems: pd.DataFrame) -> str:
    shape = problems.set_index("problem").loc[problem]
    return f"{shape_label(shape, batch=False)} ({problem})"


def _k_list(windows: Iterable[int]) -> str:
    """Windows as short runs of odd k: `3–9, 13`."""
    ks = sorted({int(k) for k in windows})
    runs: list[list[int]] = []
    for k in ks:
        if runs and k - runs[-1][-1] <= 2:
            runs[-1].append(k)
        else:
            runs.append([k])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _where(rows: pd.DataFrame) -> str:
    return f"at k = {_k_list(rows['window'])}" if len(rows) else "nowhere"


def _versus(rows: pd.DataFrame) -> str:
    counts = rows["layer"].value_counts().sort_index()
    return ", ".join(f"{layer} ×{count}" for layer, count in counts.items())


def _cell(value) -> str:
    text = "" if _missing(value) else str(value)
    text = " ".join(text.split())
    if len(text) > 600:
        text = text[:599] + "…"
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


def timing_warnings(data: pd.DataFrame) -> list[str]:
    """Why the latencies of these rows may not be trusted: a busy machine, too few replicates, wide spread."""
    ok = timed(data)
    if not len(ok):
        return []
    flags, total = timing_flags(ok), len(ok)
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


# ----------------------------------------------------------------------------------------------------
# Sections


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
    order = sorted(plan, key=lambda p: (PASSES.index(p) if p in PASSES else len(PASSES), p))
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


def _slice(frame: pd.DataFrame, problem: str, mode: str, subject: str) -> pd.DataFrame:
    return frame[(frame["problem"] == problem) & (frame["mode"] == mode) & (frame["subject"] == subject)]


def _peer_ratios(analysis: Analysis, claim: Claim, problem: str, mode: str, subject: str) -> pd.DataFrame:
    ratios = _slice(analysis.ratios, problem, mode, subject)
    return ratios[(ratios["role"] == PEER) & ratios[claim.ratio_column].notna()]


def _ratio_headline(best: pd.DataFrame, claim: Claim) -> str:
    """What the verdict rests on: the range against the strongest peer, where QnA reaches T, where it loses."""
    if not len(best):
        return "no attention peer measured next to QnA"
    column, target = claim.ratio_column, claim.target
    low, high = best.loc[best[column].idxmin()], best.loc[best[column].idxmax()]
    loses = best[best[column] < 1]
    return (f"vs the strongest peer {_spread(low, column)} (k={int(low['window'])}) to {_spread(high, column)} "
            f"(k={int(high['window'])}); ≥{claim.target:g}× {_where(best[best[column] >= target])}; "
            f"QnA loses {_where(loses)}" + (f" (vs {_versus(loses)})" if len(loses) else ""))


def _scaling_headline(comparisons: pd.DataFrame) -> str:
    if not len(comparisons):
        return "no attention peer that uses the window measured next to QnA"
    votes = comparisons[comparisons["vote"].notna()]
    wins = int(votes["vote"].astype(bool).sum())
    by_metric = ", ".join(
        f"{metric} {int(votes.loc[votes['metric'] == metric, 'vote'].astype(bool).sum())} of "
        f"{int((votes['metric'] == metric).sum())}"
        for metric in ("latency", "memory")
    )
    silent = len(comparisons) - len(votes)
    return (f"QnA grows more slowly in {wins} of {len(votes)} voting comparisons ({by_metric})"
            + (f"; {silent} do not vote (poor fit or < {MIN_GROWTH_POINTS} shared windows)" if silent else ""))


def _headline(analysis: Analysis, claim: Claim, problem: str, mode: str, subject: str) -> str:
    if claim.ratio_column:
        return _ratio_headline(strongest(_peer_ratios(analysis, claim, problem, mode, subject), claim.ratio_column), claim)
    return _scaling_headline(_slice(analysis.comparisons, problem, mode, subject))


def _conditions(analysis: Analysis, claim: Claim, problem: str, mode: str, subject: str) -> list[str]:
    """The detail under a ratio verdict: who the strongest peers were, the weakest-peer figure, the gaps."""
    column = claim.ratio_column
    peers = _peer_ratios(analysis, claim, problem, mode, subject)
    out = []
    best = strongest(peers, column)
    if len(best):
        out.append(f"Strongest peer per window: {_versus(best)}.")
        top = weakest(peers, column)
        out.append(f"Against the weakest peer (not the verdict): up to {_spread(top, column)} at k={int(top['window'])} "
                   f"vs {top['layer']}.")
    data = analysis.frame
    here = data[(data["problem"] == problem) & (data["mode"] == mode)]
    gaps = unmeasured(here[(here["role"] != SUBJECT) | (here["layer"] == subject)], column)
    if len(gaps):
        gaps = gaps.assign(status=gaps["status"].where(gaps["status"] != "ok", "no memory reading"))
        texts = [f"{layer} {status} at k = {_k_list(group['window'])}"
                 for (layer, status), group in gaps.groupby(["layer", "status"], sort=True)]
        out.append("Peers without a number where QnA has one (in no ratio): " + "; ".join(texts) + ".")
    return out


def _backend_of(flags: dict) -> str:
    """What ran for a row, as its flags record it: a backend, and the fallback it is when it is one."""
    backend = (flags.get("backend") or (f"NATTEN {flags['natten_backend']}" if flags.get("natten_backend") else "")
               or ("torch.compile(flex_attention)" if flags.get("flex_compiled") else ""))
    fallback = flags.get("fallback", "")
    return f"{backend} (fallback: {fallback})" if backend and fallback else backend


def _ran_as(flags: object, compile_mode: object) -> str:
    """A row's backend, and its compiled form when it ran compiled."""
    backend = _backend_of(_flags_of(flags))
    if not is_compiled(compile_mode):
        return backend
    form = f"compiled ({mode_of(compile_mode)})"
    return f"{backend}, {form}" if backend else form


def _what_ran(data: pd.DataFrame, problem: str, mode: str, layers: Iterable[str]) -> str:
    """Each layer's recorded backend at this problem and mode, and its form where it won compiled ("" when
    none of them records either)."""
    texts = []
    for layer in sorted(set(layers)):
        rows = data[(data["problem"] == problem) & (data["mode"] == mode) & (data["layer"] == layer)]
        forms = rows["compile_mode"] if "compile_mode" in rows else [None] * len(rows)
        ran = sorted({_ran_as(flags, form) for flags, form in zip(rows.get("layer_flags", [None] * len(rows)), forms)}
                     - {""})
        if ran:
            texts.append(f"{layer}: {'; '.join(ran)}")
    return "; ".join(texts)


def _family_table(analysis: Analysis, claim: Claim, subject: str, device: str) -> str:
    column = claim.ratio_column
    problems = analysis.problems[analysis.problems["device_name"] == device]["problem"]
    rows = []
    for problem in problems:
        for mode in mode_order(analysis.frame["mode"].unique()):
            peers = _peer_ratios(analysis, claim, problem, mode, subject)
            best = strongest(peers, column, by=("family",))
            for family, own in best.groupby("family", sort=True):
                verdict = ratio_verdict(own, column, claim.target)
                loses = own[own[column] < 1]
                rows.append([family, problem, mode, _versus(own),
                             f"{_spread(own.loc[own[column].idxmin()], column)} to {_spread(own.loc[own[column].idxmax()], column)}",
                             _where(own[own[column] >= claim.target]), _where(loses), verdict,
                             _what_ran(analysis.frame, problem, mode, own["layer"])])
    if not rows:
        return ""
    headers = ["family", "problem", "mode", "best implementation per window", "ratio range",
               f"≥{claim.target:g}×", "QnA loses", "verdict", "what ran"]
    if not any(row[-1] for row in rows):
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    return markdown_table(headers, rows)


def _comparison_table(analysis: Analysis, subject: str, device: str) -> str:
    problems = set(analysis.problems[analysis.problems["device_name"] == device]["problem"])
    comparisons = analysis.comparisons[analysis.comparisons["problem"].isin(problems)
                                       & (analysis.comparisons["subject"] == subject)]
    rows = []
    for r in comparisons.itertuples():
        vote = "no vote: " + r.why if r.vote is None or _missing(r.vote) else ("QnA slower-growing" if r.vote else "QnA not slower-growing")
        rows.append([r.problem, r.mode, r.layer, r.metric, _k_list(r.windows) if r.windows else "none",
                     _growth_text(r.subject_exponent, r.subject_r2, r.subject_poor),
                     _growth_text(r.peer_exponent, r.peer_r2, r.peer_poor), vote])
    if not rows:
        return ""
    return markdown_table(["problem", "mode", "peer", "metric", "shared k", "QnA", "peer", "vote"], rows)


def _growth_text(exponent: float, r2: float, poor: bool) -> str:
    if _missing(exponent):
        return "n/a"
    return f"k^{_fmt(exponent)} (R² {_fmt(r2)}{', poor fit' if poor else ''})"


def verdict_section(analysis: Analysis) -> str:
    verdicts = analysis.verdicts
    if not len(verdicts):
        return "\n\n".join(part for part in ("## Verdicts", "No rows.", forms_section(analysis),
                                               tuning_section(analysis)) if part)
    parts = ["## Verdicts"]
    problems = analysis.problems
    for (device, subject), on_device in verdicts.groupby(["device_name", "subject"], sort=True):
        modes = mode_order(on_device["mode"].unique())
        parts.append(f"### On {device}, {subject} against the attention peers")
        rows = []
        for claim in CLAIMS:
            for problem in sorted(on_device["problem"].unique(), key=lambda p: int(p[1:])):
                mine = on_device[(on_device["claim"] == claim.key) & (on_device["problem"] == problem)].set_index("mode")
                cells = [f"**{mine.loc[m, 'verdict']}**: {_headline(analysis, claim, problem, m, subject)}"
                         if m in mine.index else "—" for m in modes]
                rows.append([claim.title, _problem_label(problem, problems), *cells,
                             f"**{overall(mine['verdict'].tolist())}**"])
        parts.append(markdown_table(["claim", "problem", *modes, "overall"], rows))
        parts.append("\n".join(_by_head_size(on_device, problems)))
        if timings_unreliable(analysis.frame[analysis.frame["device_name"] == device]):
            parts.append(f"**Caution:** the timings on this device are noisy (over {CAUTION_SHARE:.0%} of the timed points "
                         "carry a warning, see *Reliability of the timings*): the speed and latency-growth verdicts may "
                         "not survive a re-measurement on a quiet machine. Peak memory does not depend on load.")
        bullets = []
        for claim in CLAIMS[:2]:
            for problem in sorted(on_device["problem"].unique(), key=lambda p: int(p[1:])):
                for mode in modes:
                    found = _conditions(analysis, claim, problem, mode, subject)
                    if found:
                        bullets.append(f"- **{claim.title}, {mode}, {_problem_label(problem, problems)}**")
                        bullets += [f"  - {text}" for text in found]
        if bullets:
            parts += ["Conditions:", "\n".join(bullets)]
        for claim in CLAIMS[:2]:
            table = _family_table(analysis, claim, subject, device)
            if table:
                parts += [f"#### {claim.title}: per peer family (each family's best implementation at each window)", table]
        table = _comparison_table(analysis, subject, device)
        if table:
            parts += ["#### Scaling: QnA against each peer over the windows both measured", table]
    parts += [section for section in (forms_section(analysis), tuning_section(analysis)) if section]
    parts += ["### How the verdicts are decided", RULES.strip()]
    return "\n\n".join(parts)


FORMS_RULES = """\
Each layer ran in more than one form: eager and compiled with `torch.compile` (`compile=`). Every ratio,
verdict and figure takes each layer at its best form at each point: its `ok` form with the lowest median
latency (the eager row where none is `ok`). Speedup = eager ms / compiled ms (above 1 the compiled form is
faster); compile s = the first, compiling call's seconds minus the median steady call, spent once per process
in the warm-up and never in a timed call."""


def _ms(seconds: float) -> str:
    return _fmt(float(seconds) * 1e3, 3)


def _form_cell(row: pd.Series, column: str, status: str, fmt) -> str:
    if not _missing(row[column]):
        return fmt(row[column])
    value = row[status]
    return "—" if _missing(value) else str(value)


def _lead_sentence(leads: pd.DataFrame, subject: str) -> str:
    """Whether QnA's speed lead over each family's best survives when every layer may run compiled."""
    texts = []
    for r in leads.itertuples():
        ranges = (f"eager {_x(r.eager_min)}–{_x(r.eager_max)}, best forms "
                  + (f"{_x(r.best_min)}–{_x(r.best_max)}" if not _missing(r.best_min) else "n/a"))
        if not r.led_at:
            verdict = "QnA had no lead to keep"
        elif len(r.kept_at) == len(r.led_at):
            verdict = f"the lead survives compilation at every window it held (k = {_k_list(r.led_at)})"
        elif r.kept_at:
            verdict = f"the lead survives at k = {_k_list(r.kept_at)} of k = {_k_list(r.led_at)}"
        else:
            verdict = f"the lead (k = {_k_list(r.led_at)}) does not survive compilation"
        texts.append(f"over {r.family}, {verdict} ({ranges})")
    if not texts:
        return ""
    return f"{subject}'s speed lead over each peer family's best implementation: " + "; ".join(texts) + "."


def _winners(data: pd.DataFrame, problem: str, mode: str) -> str:
    """Which form of each layer the verdicts used at this problem and mode, with its windows."""
    here = data[(data["problem"] == problem) & (data["mode"] == mode) & (data["kind"] == "layer")]
    texts = []
    for layer in sort_rows(here.drop_duplicates("layer")[["layer", "role"]], ["role", "layer"])["layer"]:
        own = here[here["layer"] == layer]
        by_form = [f"{form_label(form) or 'eager'} at k = {_k_list(rows['window'])}"
                   for form, rows in own.groupby("compile_mode", sort=True)]
        texts.append(f"{layer} {', '.join(by_form)}")
    return "Forms in the verdicts: " + "; ".join(texts) + "."


SHIPPED_RULES = """\
Each layer that has forms to choose (`python -m qna_bench.registry` lists them: QnA its plan and the GEMM
library of its projections, every peer the GEMM library of its `nn.Linear`s and 1×1 convolutions) ran
twice at each point, timed in the same interleaved rounds: as built (*shipped*) and in the form its tuner
chose (*tuned*; `qna_bench.tuner`: every candidate proved equal to the layer as built, warmed, then timed
in interleaved rounds). Speedup = shipped ms / tuned ms: what tuning bought that layer. Every ratio,
verdict and figure takes each layer at its best form."""


def _form_text(record: object) -> str:
    """``plan=fused, gemm=conv1x1`` from a row's ``form`` JSON; "" where none is recorded."""
    if _missing(record) or not record:
        return ""
    try:
        form = json.loads(record)
    except ValueError:
        return str(record)
    return ", ".join(f"{axis}={form[axis]}" for axis in sorted(form)) if isinstance(form, dict) else str(form)


def tuning_section(analysis: Analysis) -> str:
    """As shipped against tuned, per problem and mode: each side's latency and form, the speedup. ""
    for a run without shipped rows."""
    table = analysis.shipped
    if not len(table):
        return ""
    parts = ["### As shipped against tuned", SHIPPED_RULES]
    for (problem, mode), group in table.groupby(["problem", "mode"], sort=False):
        rows = [[r["layer"], int(r["window"]), _form_cell(r, "shipped_s", "shipped_status", _ms),
                 _form_text(r["shipped_form"]), _form_cell(r, "tuned_s", "tuned_status", _ms),
                 _form_text(r["tuned_form"]), r["tuned_source"],
                 "—" if _missing(r["speedup"]) else _x(r["speedup"])]
                for r in (pd.Series(record) for record in group.to_dict("records"))]
        parts += [f"#### {mode}, {_problem_label(problem, analysis.problems)}",
                  markdown_table(["layer", "k", "shipped ms", "shipped form", "tuned ms", "tuned form", "source",
                                  "speedup"], rows)]
    return "\n\n".join(parts)


def forms_section(analysis: Analysis) -> str:
    """Eager against compiled, per problem and mode: each form's latency, the speedup, the compile seconds
    and the form that won; and whether QnA's lead survives compilation. "" for a run of eager rows only."""
    forms = analysis.forms
    if not has_compiled(analysis.every_form) or not len(forms):
        return ""
    compiled = [c[: -len("_speedup")] for c in forms.columns if c.endswith("_speedup")]
    parts = ["### Eager against compiled", FORMS_RULES]
    for (problem, mode), group in forms.groupby(["problem", "mode"], sort=False):
        rows = []
        for r in group.to_dict("records"):
            r = pd.Series(r)
            line = [r["layer"], int(r["window"]), _form_cell(r, "eager_s", "eager_status", _ms)]
            for m in compiled:
                line += [_form_cell(r, f"{m}_s", f"{m}_status", _ms), "—" if _missing(r[f"{m}_speedup"]) else _x(r[f"{m}_speedup"]),
                         _fmt(r[f"{m}_compile_s"])]
            line.append(form_label(r["best"]) or "eager")
            rows.append(line)
        headers = ["layer", "k", "eager ms"]
        for m in compiled:
            headers += [f"{m} ms", f"{m} speedup", f"{m} compile s"]
        parts += [f"#### {mode}, {_problem_label(problem, analysis.problems)}",
                  markdown_table([*headers, "best form"], rows), _winners(analysis.frame, problem, mode)]
        leads = analysis.leads
        for subject, own in leads[(leads["problem"] == problem) & (leads["mode"] == mode)].groupby("subject", sort=True):
            sentence = _lead_sentence(own, subject)
            if sentence:
                parts.append(sentence)
    return "\n\n".join(parts)


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


MODELS_RULES = """\
Whole backbones (registry kind `model`; random initialisation, 1000 classes). The layer claims do not
apply at this level: each model is described by its throughput, memory and size, then set against
QnA-ViT. Images/s = batch / median latency (forward: inference; train: forward + backward). Peak memory is
above the inputs. Params are counted on the built model; GMACs are per image, from the forward row
(FLOPs / 2 / batch), counted by the FLOP counter or, where it cannot see a layer, the closed form. The
published figures are those the model's registry entry quotes (`python -m qna_bench.registry`); n/a where
it quotes none."""


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


def figures_section(figures: Sequence[Path | str]) -> str:
    if not figures:
        return ""
    captions = {
        "headline": "QnA against the strongest attention peer at each window (dash-dot: the claimed factor)",
        "latency": "Median latency vs window: QnA, each family's best implementation, the best baseline",
        "latency_all": "Median latency vs window, every layer",
        "memory": "Peak memory vs window: QnA, each family's best implementation, the best baseline",
        "memory_all": "Peak memory vs window, every layer",
        "ratio_to_qna": "Each layer relative to QnA (dash-dot: the claimed factor)",
        "pareto": "Latency vs peak memory, marker size: window",
        "models": "Whole models: images/s and peak memory",
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
    layers = (analysis.frame["kind"] == "layer").any()
    sections = [
        "# QnA claims report",
        "QnA (arXiv 2112.11435) “scales especially well with window size, requiring up-to x10 less memory while "
        "being up-to x5 faster than existing methods”. This report checks each part against the peers measured "
        "in this results file.",
        header_section(analysis),
        *([verdict_section(analysis), ratio_section(analysis, MEMORY), ratio_section(analysis, SPEED),
           growth_section(analysis)] if layers else []),
        models_section(analysis),
        failures_section(analysis),
        *([measurements_section(analysis)] if layers else []),
        roofline_section(analysis),
        figures_section(figures),
    ]
    return "\n\n".join(s for s in sections if s).rstrip() + "\n"


def write_report(results_path: str | Path, out_dir: str | Path | None = None, draw: bool = True) -> Path:
    """Write report.md (and, with ``draw``, the figures) next to the parquet or into ``out_dir``."""
    results_path = Path(results_path)
    out_dir = Path(out_dir) if out_dir is not None else results_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(read_results(results_path))
    figures = plots.draw_figures(results_path, out_dir, analysis=analysis) if draw else []
    text = render(analysis, figures)
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

    points = analysis.roofline
    if points.empty:
        return ""
    parts = [
        "## Roofline: how close each layer runs to this machine's limits",
        "Fraction of the roof = achieved FLOP/s ÷ min(peak FLOP/s, intensity × the bytes/s of the memory level "
        "its working set fits in), with the intensity and the working set from the layer's closed-form minimum "
        "bytes moved (cache-aware: a point whose bytes fit the L2 of the measuring threads is judged against the "
        "L2 roof, one that fits the last-level cache against the LLC roof, any other against DRAM). The peaks "
        "are this run's machine probes (same device, dtype and threads as the points): "
        + "; ".join(
            f"{device} {dtype}: {_fmt(group['peak_flops_probe'].median() / 1e9, 1)} GFLOP/s, "
            + ", ".join(f"{name} {_fmt(rate / 1e9, 1)} GB/s" for name, rate in roofline.level_roofs(group))
            + f" (DRAM ridge at {_fmt(group['peak_flops_probe'].median() / group['peak_bytes_per_s_probe'].median(), 1)} "
            "FLOP/byte)"
            for (device, dtype), group in points.groupby(["device_name", "dtype"], sort=True)
        )
        + ". A memory-bound point's fraction is its achieved bytes/s over its level's probed bandwidth; the "
        "column `bound` names the roof that bounds it (`compute`, or the memory level). A padded convolution "
        "(`conv_dense`, `conv_dw`) is credited its useful work, the taps inside the image: the FLOP counter also "
        "counts the taps on the zero padding (at 28² and k=21, a third of them), which oneDNN skips on CPU.",
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
        for layer in sort_rows(with_roles(rows).drop_duplicates("layer"), ["role", "layer"])["layer"]:
            for mode in mode_order(rows.loc[rows["layer"] == layer, "mode"].unique()):
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
