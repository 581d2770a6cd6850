"""Pairing with QnA and the ratios: QnA's strongest opponent per point (`strongest`), each family's leader
(`family_leaders`), the weakest point, what was not measured, and whether a lead survives compilation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from qna_bench.analysis.claims import crossed_line
from qna_bench.analysis.rows import (
    BASELINE,
    FORM_COLUMN,
    PAIR_COLUMNS,
    PEER,
    POINT_COLUMNS,
    ROUNDS_COLUMN,
    SETTING_COLUMNS,
    SUBJECT,
    sort_rows,
)
from qna_bench.analysis.statistics import ratio_spread, round_times

# Which statuses carry a number: a `timeout` row stopped after its memory pass, so its memory counts.
MEASURED = {"latency_ratio": ("ok",), "memory_ratio": ("ok", "timeout")}


def pair_with_subject(frame: pd.DataFrame, statuses: Sequence[str] = ("ok", "timeout")) -> pd.DataFrame:
    """Every non-subject row next to the subject (QnA) row of the same setting, mode and window: the
    subject's columns carry the suffix ``_qna`` and `subject` names it (its form: ``compile_mode_qna``). Rows of another thread count,
    torch version, device or dtype never pair."""
    rows = frame[frame["status"].isin(statuses)]
    round_columns = [c for c in ("round_geomeans_s", "round_medians_s") if c in rows]
    rows = rows.assign(**{ROUNDS_COLUMN: [round_times(r) or None for r in rows[round_columns].to_dict("records")]})
    carried = [c for c in ("layer", "status", "median_s", "q25_s", "q75_s", "peak_bytes", ROUNDS_COLUMN, FORM_COLUMN)
               if c in rows]
    subject = rows[rows["role"] == SUBJECT][[*PAIR_COLUMNS, *carried]].rename(columns={"layer": "subject"})
    others = rows[rows["role"] != SUBJECT]
    return others.merge(subject, on=list(PAIR_COLUMNS), suffixes=("", "_qna"))


def round_ratios(rounds: Sequence[float] | None, subject_rounds: Sequence[float] | None) -> tuple[float, float, float, int] | None:
    """The layer's time per round over the subject's, round r with round r: (geometric mean, min, max,
    number of rounds) of those ratios (`ratio_spread`); None unless both have the same number (≥ 1) of
    positive round times."""
    if not isinstance(rounds, list | tuple | np.ndarray) or not isinstance(subject_rounds, list | tuple | np.ndarray):
        return None
    mine, theirs = [float(v) for v in rounds], [float(v) for v in subject_rounds]
    if not mine or len(mine) != len(theirs) or min(mine + theirs) <= 0:
        return None
    center, low, high = ratio_spread(theirs, mine)
    return center, low, high, len(mine)


def ratio_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Each paired non-subject row with ``latency_ratio`` (its latency / the subject's: above 1, QnA is
    faster; the geometric mean of the per-round ratios where the rows have rounds, else the ratio of the medians),
    its spread over rounds ``latency_ratio_min`` / ``latency_ratio_max`` (equal to the ratio without
    rounds), ``latency_rounds`` (0 without rounds) and ``memory_ratio`` (peak memory / the subject's)."""
    merged = pair_with_subject(frame)
    both_ok = (merged["status"] == "ok") & (merged["status_qna"] == "ok")
    latency = merged["median_s"].astype("Float64").where(both_ok)
    latency_qna = merged["median_s_qna"].astype("Float64").where(both_ok)
    ratio = (latency / latency_qna).where((latency > 0) & (latency_qna > 0)).astype(float)
    spread = [
        round_ratios(a, b) if ok else None
        for a, b, ok in zip(
            merged[ROUNDS_COLUMN] if ROUNDS_COLUMN in merged else [None] * len(merged),
            merged[f"{ROUNDS_COLUMN}_qna"] if ROUNDS_COLUMN in merged else [None] * len(merged),
            both_ok & ratio.notna(),
        )
    ]
    merged["latency_ratio"] = [s[0] if s else r for s, r in zip(spread, ratio)]
    merged["latency_ratio_min"] = [s[1] if s else r for s, r in zip(spread, ratio)]
    merged["latency_ratio_max"] = [s[2] if s else r for s, r in zip(spread, ratio)]
    merged["latency_rounds"] = [s[3] if s else 0 for s in spread]
    peak, peak_qna = merged["peak_bytes"].astype("Float64"), merged["peak_bytes_qna"].astype("Float64")
    merged["memory_ratio"] = (peak / peak_qna).where((peak > 0) & (peak_qna > 0)).astype(float)
    for column in ("latency_ratio", "latency_ratio_min", "latency_ratio_max"):
        merged[column] = merged[column].astype(float)
    merged["latency_crosses"] = [
        crossed_line(low, high) if rounds > 1 else None
        for low, high, rounds in zip(merged["latency_ratio_min"], merged["latency_ratio_max"], merged["latency_rounds"])
    ]
    merged["latency_crosses"] = merged["latency_crosses"].astype(float)
    return merged.sort_values(["subject", *POINT_COLUMNS], kind="mergesort").reset_index(drop=True)


def strongest(ratios: pd.DataFrame, column: str, by: Sequence[str] = ()) -> pd.DataFrame:
    """At each point (and each value of ``by``, e.g. ``family``), the row with the smallest ratio: the
    leanest or fastest layer measured there, QnA's strongest opponent. Ties go to the first layer by name."""
    rows = ratios[ratios[column].notna()]
    keys = ["subject", *PAIR_COLUMNS, *by]
    ranked = rows.sort_values([column, "layer"], kind="mergesort")
    return ranked.drop_duplicates(keys).sort_values(keys, kind="mergesort").reset_index(drop=True)


LEAD_COLUMNS = ("problem", "mode", "subject", "family", "eager_min", "eager_max", "best_min", "best_max",
                "led_at", "kept_at")


def compile_leads(eager_ratios: pd.DataFrame, best_ratios: pd.DataFrame) -> pd.DataFrame:
    """Whether QnA's speed lead over each peer family's strongest member at each window survives compilation: per problem, mode,
    subject and family, the family's best ratio per window (`strongest` by family) with eager forms only
    and with every layer at its best form. ``led_at``: windows where QnA was faster eager against eager;
    ``kept_at``: those where it is still faster with best forms against best forms."""
    records = []
    keys = ["problem", "mode", "subject", "family"]

    def family_best(ratios: pd.DataFrame) -> pd.DataFrame:
        peers = ratios[(ratios["role"] == PEER) & ratios["latency_ratio"].notna()]
        return strongest(peers, "latency_ratio", by=("family",))

    eager, best = family_best(eager_ratios), family_best(best_ratios)
    for values, mine in eager.groupby(keys, sort=True):
        theirs = best[(best[keys] == pd.Series(values, index=keys)).all(axis=1)].set_index("window")
        led = sorted(int(k) for k in mine.loc[mine["latency_ratio"] > 1, "window"])
        kept = [k for k in led if k in theirs.index and float(theirs.loc[k, "latency_ratio"]) > 1]
        records.append(dict(
            zip(keys, values), eager_min=float(mine["latency_ratio"].min()), eager_max=float(mine["latency_ratio"].max()),
            best_min=float(theirs["latency_ratio"].min()) if len(theirs) else float("nan"),
            best_max=float(theirs["latency_ratio"].max()) if len(theirs) else float("nan"),
            led_at=tuple(led), kept_at=tuple(kept),
        ))
    return sort_rows(pd.DataFrame(records, columns=list(LEAD_COLUMNS)), keys)


def weakest(ratios: pd.DataFrame, column: str) -> pd.Series | None:
    """The row with the largest ratio (ties: the first by problem, window, layer): the "up to" figure."""
    rows = ratios[ratios[column].notna()]
    if not len(rows):
        return None
    ranked = rows.assign(_neg=-rows[column]).sort_values(["_neg", *(["problem"] if "problem" in rows else []),
                                                         "window", "layer"], kind="mergesort")
    return ranked.iloc[0]


def unmeasured(data: pd.DataFrame, column: str) -> pd.DataFrame:
    """Peer rows without a number for ``column`` where the subject has one at the same setting, mode and
    window (timeout, oom, skipped, unsupported, error, or no memory reading): named, never counted."""
    statuses = MEASURED[column]
    value = "median_s" if column == "latency_ratio" else "peak_bytes"
    subject = data[(data["role"] == SUBJECT) & data["status"].isin(statuses) & data[value].notna()]
    peers = data[(data["role"] == PEER) & (~data["status"].isin(statuses) | data[value].isna())]
    return peers.merge(subject[list(PAIR_COLUMNS)].drop_duplicates(), on=list(PAIR_COLUMNS))


def family_leaders(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per setting and mode, each peer family's leader and the leading baseline: the layer with
    the smallest ``column`` (``ok`` rows) at the most windows; ties go to the first layer by name, and so
    does a group with no number at all (its failures stay visible). One row per setting, mode and group
    (the peer's family, or `baseline`) with `layer`, `role`, `family` and `wins` (the windows where it was
    the smallest of its group)."""
    columns = [*SETTING_COLUMNS, "mode", "group", "layer", "role", "family", "wins"]
    rows = frame[frame["role"].isin((PEER, BASELINE))]
    if not len(rows):
        return pd.DataFrame(columns=columns)
    rows = rows.assign(group=rows["family"].where(rows["role"] == PEER, BASELINE))
    keys = [*SETTING_COLUMNS, "mode", "group"]
    valued = rows[(rows["status"] == "ok") & rows[column].notna()]
    valued = valued[valued[column].astype(float) > 0]
    best = valued.sort_values([column, "layer"], kind="mergesort").drop_duplicates([*keys, "window"])
    wins = best.groupby([*keys, "layer"], sort=True, dropna=False).size().rename("wins")
    layers = rows.drop_duplicates([*keys, "layer"])[[*keys, "layer", "role", "family"]]
    layers = layers.join(wins, on=[*keys, "layer"]).fillna({"wins": 0})
    ranked = layers.assign(_neg=-layers["wins"]).sort_values(["_neg", "layer"], kind="mergesort").drop_duplicates(keys)
    ranked = ranked.assign(wins=ranked["wins"].astype(int))
    return ranked.sort_values(keys, kind="mergesort").reset_index(drop=True)[columns]


def shown_by_default(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per setting and mode, the layers a figure of ``column`` shows by default: every subject, each peer
    family's leader and the leading baseline (`family_leaders`). Columns: the setting, `mode`
    and `layer`; references and the other implementations are left to a companion figure."""
    keys = [*SETTING_COLUMNS, "mode", "layer"]
    subjects = frame[frame["role"] == SUBJECT][keys]
    chosen = family_leaders(frame, column)[keys]
    return pd.concat([subjects, chosen]).drop_duplicates().reset_index(drop=True)
