"""Growth in k: each layer's exponents over its own windows, and QnA against each peer over shared windows.
"""

from __future__ import annotations

import pandas as pd

from qna_bench.analysis.rows import PEER, SUBJECT, sort_rows
from qna_bench.analysis.statistics import fit_growth, poor_fit

# QnA grows more slowly in k only if its exponent is at least this much lower, fitted over the same windows.
EXPONENT_MARGIN = 0.1


# A growth comparison needs at least this many windows where both layers were measured.
MIN_GROWTH_POINTS = 3


GROWTH_METRICS = (("latency", "median_s"), ("memory", "peak_bytes"))


def growth_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per layer, problem and mode: latency and memory growth exponents in k over the layer's own ok
    windows, with R² and point count (a description; the scaling verdict compares over shared windows)."""
    rows = []
    for (problem, mode, layer), group in frame.groupby(["problem", "mode", "layer"], sort=True):
        ok = group[group["status"] == "ok"].sort_values("window")
        record = dict(
            problem=problem, mode=mode, layer=layer, family=group["family"].iloc[0], role=group["role"].iloc[0],
            uses_window=bool(group["uses_window"].fillna(True).iloc[0]), windows=len(group), ok_windows=len(ok),
        )
        for metric, column in GROWTH_METRICS:
            fit = fit_growth(ok["window"], ok[column].astype("Float64"))
            record[f"{metric}_exponent"] = fit[0] if fit else float("nan")
            record[f"{metric}_r2"] = fit[1] if fit else float("nan")
            record[f"{metric}_n"] = fit[2] if fit else 0
            record[f"{metric}_poor"] = bool(fit and poor_fit(fit))
        rows.append(record)
    columns = [
        "problem", "mode", "layer", "family", "role", "uses_window", "windows", "ok_windows",
        "latency_exponent", "latency_r2", "latency_n", "latency_poor", "memory_exponent", "memory_r2", "memory_n",
        "memory_poor",
    ]
    return sort_rows(pd.DataFrame(rows, columns=columns), ["problem", "mode", "role", "layer"])


def growth_comparisons(frame: pd.DataFrame) -> pd.DataFrame:
    """QnA against each attention peer that uses the window, per problem, mode and metric, both exponents
    fitted over the windows BOTH measured (ok, positive). ``vote`` is True when QnA grows more slowly
    (e_QnA ≤ e_peer − `EXPONENT_MARGIN`), False when not, None when the comparison does not vote:
    fewer than `MIN_GROWTH_POINTS` shared windows, or a poor fit (`poor_fit`) on either side (``why``)."""
    records = []
    ok = frame[frame["status"] == "ok"]
    for (problem, mode), group in ok.groupby(["problem", "mode"], sort=True):
        subjects = group[group["role"] == SUBJECT]
        peers = group[(group["role"] == PEER) & group["uses_window"].fillna(True).astype(bool)]
        for subject, own in subjects.groupby("layer", sort=True):
            for layer, theirs in peers.groupby("layer", sort=True):
                for metric, column in GROWTH_METRICS:
                    a = own[own[column].notna() & (own[column].astype(float) > 0)].set_index("window")[column]
                    b = theirs[theirs[column].notna() & (theirs[column].astype(float) > 0)].set_index("window")[column]
                    shared = sorted(set(a.index) & set(b.index))
                    fit_qna = fit_growth(shared, [a[k] for k in shared])
                    fit_peer = fit_growth(shared, [b[k] for k in shared])
                    if len(shared) < MIN_GROWTH_POINTS or fit_qna is None or fit_peer is None:
                        vote, why = None, f"{len(shared)} shared window{'s' if len(shared) != 1 else ''}"
                    elif poor_fit(fit_qna) or poor_fit(fit_peer):
                        vote, why = None, "poor fit"
                    else:
                        vote, why = bool(fit_qna[0] <= fit_peer[0] - EXPONENT_MARGIN), ""
                    records.append(dict(
                        problem=problem, mode=mode, subject=subject, layer=layer, family=theirs["family"].iloc[0],
                        role=PEER, metric=metric, windows=tuple(int(k) for k in shared), n=len(shared),
                        subject_exponent=fit_qna[0] if fit_qna else float("nan"),
                        subject_r2=fit_qna[1] if fit_qna else float("nan"),
                        peer_exponent=fit_peer[0] if fit_peer else float("nan"),
                        peer_r2=fit_peer[1] if fit_peer else float("nan"),
                        subject_poor=bool(fit_qna and poor_fit(fit_qna)), peer_poor=bool(fit_peer and poor_fit(fit_peer)),
                        vote=vote, why=why,
                    ))
    columns = ["problem", "mode", "subject", "layer", "family", "role", "metric", "windows", "n", "subject_exponent",
               "subject_r2", "peer_exponent", "peer_r2", "subject_poor", "peer_poor", "vote", "why"]
    return sort_rows(pd.DataFrame(records, columns=columns), ["problem", "mode", "subject", "metric", "layer"])
