"""The report's text pieces: numbers, ratios, spreads, window lists and markdown tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from qna_bench.analysis import (
    MIN_REPLICATES,
    NOISY_SPREAD,
    timed,
    timing_flags,
)
from qna_bench.analysis import missing as _missing
from qna_bench.text import shape_label


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
