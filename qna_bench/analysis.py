"""What the results say, as pure functions over a results frame: the newest row per point and form, each
layer at its best form, pairing with QnA, ratios, the strongest peer per point and per family, growth
fits and the verdicts. The report, the
figures, the console summary and `compare` read from here; they only write and draw.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qna_bench.labels import COMPILE_MODES, EAGER, ROLES, form_label, mode_of
from qna_bench.layer_facts import find_layer, role_of
from qna_bench.noise import NoiseFloor, crossed_line, noise_floor
from qna_bench.roofline import roofline_frame
from qna_bench.rounds import ratio_spread, round_times

# A problem's shape, without its window and mode.
SHAPE_COLUMNS: tuple[str, ...] = ("batch", "height", "width", "channels", "heads", "stride", "dilation")
# Rows compare only within one context: never QnA at 1 thread against a peer at 2, nor two torch versions.
CONTEXT_COLUMNS: tuple[str, ...] = ("device_name", "dtype", "threads", "torch_version")
SETTING_COLUMNS: tuple[str, ...] = (*CONTEXT_COLUMNS, *SHAPE_COLUMNS)
# Two rows pair (a layer against QnA) when all of these agree.
PAIR_COLUMNS: tuple[str, ...] = (*SETTING_COLUMNS, "mode", "window")
POINT_COLUMNS: tuple[str, ...] = ("layer", *PAIR_COLUMNS)
# A layer's form: eager or a torch.compile mode, and tuned or as shipped (`qna_bench.forms`); a point has
# one row per form measured.
FORM_COLUMN = "compile_mode"
TUNING_COLUMN = "tuning"
TUNED, SHIPPED = "tuned", "shipped"
# A row's time per round of interleaved rounds (`qna_bench.rounds.round_times`), derived when rows pair.
ROUNDS_COLUMN = "round_times_s"

MODE_ORDER = ("forward", "train")
UNDECLARED = "undeclared"
ROLE_ORDER: tuple[str, ...] = (*ROLES, UNDECLARED)
SUBJECT, PEER, BASELINE = "subject", "peer", "baseline"

# The abstract's factors: "up-to x10 less memory while being up-to x5 faster".
CLAIMED_MEMORY_FACTOR = 10.0
CLAIMED_SPEED_FACTOR = 5.0
# QnA counts as leaner / faster only by at least this factor (a 1.02× difference is no claim).
BEAT_FACTOR = 1.1
# QnA grows more slowly in k only if its exponent is at least this much lower, fitted over the same windows.
EXPONENT_MARGIN = 0.1
# A growth fit below this R² is poor: it is shown, and it does not vote.
POOR_FIT_R2 = 0.9
# ... and points straying from the power law by more than this (RMS of log residuals, ~5%).
POOR_FIT_RMS = 0.05
# A growth comparison needs at least this many windows where both layers were measured.
MIN_GROWTH_POINTS = 3
# Timing spread (q75 − q25) / median above which a point counts as noisy.
NOISY_SPREAD = 0.25
MIN_REPLICATES = 3
# Above this share of timed points with a warning, the verdicts carry a caution.
CAUTION_SHARE = 0.05

HOLDS, PARTLY, NOT_HOLD, NOT_TESTED = "holds", "holds partly", "does not hold on this device", "not tested"

# Which statuses carry a number: a `timeout` row stopped after its memory pass, so its memory counts.
MEASURED = {"latency_ratio": ("ok",), "memory_ratio": ("ok", "timeout")}


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    quote: str
    ratio_column: str | None = None
    target: float | None = None
    verb: str = ""


MEMORY = Claim("memory", "Memory: up to 10× less", "requiring up-to x10 less memory", "memory_ratio",
               CLAIMED_MEMORY_FACTOR, "leaner")
SPEED = Claim("speed", "Speed: up to 5× faster", "while being up-to x5 faster", "latency_ratio",
              CLAIMED_SPEED_FACTOR, "faster")
SCALING = Claim("scaling", "Scaling with window", "scales especially well with window size")
CLAIMS = (MEMORY, SPEED, SCALING)


# ----------------------------------------------------------------------------------------------------
# Rows


def missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def mode_order(modes: Iterable[str]) -> list[str]:
    """Modes in reading order: forward, train, then any others alphabetically."""
    modes = set(modes)
    return [m for m in MODE_ORDER if m in modes] + sorted(modes - set(MODE_ORDER))


def with_roles(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every row's `role`: as recorded, or (files from before the column) as the registry
    declares the layer; a layer neither knows is `undeclared` and outside every verdict."""
    recorded = frame["role"] if "role" in frame else pd.Series(pd.NA, index=frame.index, dtype="string")
    if recorded.notna().all():
        return frame.assign(role=recorded.astype(str))
    fallback = frame["layer"].map(lambda name: role_of(name) or UNDECLARED)
    return frame.assign(role=recorded.astype(object).where(recorded.notna(), fallback).astype(str))


def with_forms(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every row's `compile_mode` and `tuning`: as recorded, `eager` and `tuned` where null
    or absent (older files)."""
    recorded = frame[FORM_COLUMN] if FORM_COLUMN in frame else pd.Series(pd.NA, index=frame.index, dtype="string")
    tuning = frame[TUNING_COLUMN] if TUNING_COLUMN in frame else pd.Series(pd.NA, index=frame.index, dtype="string")
    return frame.assign(**{FORM_COLUMN: recorded.astype(object).map(mode_of).astype("string"),
                           TUNING_COLUMN: tuning.astype(object).where(tuning.notna(), TUNED).astype("string")})


def has_compiled(frame: pd.DataFrame) -> bool:
    """Whether any row of ``frame`` measured a compiled form."""
    return FORM_COLUMN in frame and bool(with_forms(frame)[FORM_COLUMN].ne(EAGER).any())


def has_shipped(frame: pd.DataFrame) -> bool:
    """Whether any row of ``frame`` measured a layer as shipped (`as_shipped`)."""
    return TUNING_COLUMN in frame and bool(frame[TUNING_COLUMN].eq(SHIPPED).any())


def layer_label(layer: str, mode: object, tuning: object = TUNED) -> str:
    """``qna`` for the eager, tuned form, ``qna[compiled:default]`` for a compiled one, ``qna[shipped]``
    for the layer as built."""
    label = ", ".join(part for part in (form_label(mode), SHIPPED if tuning == SHIPPED else "") if part)
    return f"{layer}[{label}]" if label else layer


def latest_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per point (layer, setting, mode, window) and form (`compile_mode`): where a file holds a
    point's form twice (merged or re-measured), the newest by timestamp wins, whatever the file order."""
    frame = with_forms(frame)
    order = frame.assign(_ts=frame["timestamp"].fillna(""), _key=frame["point_key"].fillna(""))
    order = order.sort_values(["_ts", "_key"], kind="mergesort")
    kept = order.drop_duplicates([*POINT_COLUMNS, FORM_COLUMN, TUNING_COLUMN], keep="last").drop(columns=["_ts", "_key"])
    return kept.sort_values([*POINT_COLUMNS, FORM_COLUMN, TUNING_COLUMN], kind="mergesort").reset_index(drop=True)


def _form_order(mode: str) -> int:
    return COMPILE_MODES.index(mode) if mode in COMPILE_MODES else len(COMPILE_MODES)


def best_forms(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per point: each layer's best form there, the ``ok`` row with the lowest ``median_s``;
    where no form is ``ok``, the eager row (else the first form measured). A frame of eager rows only
    comes back as it is."""
    if not has_compiled(frame) and not has_shipped(frame):
        return frame
    ok = (frame["status"] == "ok") & frame["median_s"].notna()
    ranked = frame.assign(
        _failed=~ok,
        _median=frame["median_s"].astype("Float64").where(ok).fillna(float("inf")).astype(float),
        _form=frame[FORM_COLUMN].map(_form_order),
        _shipped=frame[TUNING_COLUMN].eq(SHIPPED) if TUNING_COLUMN in frame else False,
    ).sort_values(["_failed", "_median", "_form", "_shipped"], kind="mergesort")
    kept = ranked.drop_duplicates(list(POINT_COLUMNS)).drop(columns=["_failed", "_median", "_form", "_shipped"])
    return kept.sort_values(list(POINT_COLUMNS), kind="mergesort").reset_index(drop=True)


def form_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Eager against compiled: one row per layer, problem, mode and window with more than one form
    measured (rows of `latest_rows`, with `problem`): the eager median ``eager_s`` (NaN when not ok),
    and per compiled mode M its median ``M_s``, ``M_speedup`` (eager / compiled), ``M_compile_s`` and
    ``M_status``; ``best`` names the winning form (`best_forms`)."""
    keys = ["problem", "mode", "role", "layer", "window"]
    compiled = [m for m in COMPILE_MODES if m != EAGER and m in set(frame.get(FORM_COLUMN, []))]
    columns = [*keys, "eager_status", "eager_s",
               *[f"{m}_{c}" for m in compiled for c in ("status", "s", "speedup", "compile_s")], "best"]
    if not compiled:
        return pd.DataFrame(columns=columns)
    records = []
    for _, group in frame.groupby(list(POINT_COLUMNS), sort=False, dropna=False):
        if group[FORM_COLUMN].nunique() < 2:
            continue
        first = group.iloc[0]
        by_form = {r[FORM_COLUMN]: r for _, r in group.iterrows()}

        def seconds(row: pd.Series | None) -> float:
            ok = row is not None and row["status"] == "ok" and not missing(row["median_s"])
            return float(row["median_s"]) if ok else float("nan")

        eager = by_form.get(EAGER)
        record = {k: first[k] for k in keys}
        record.update(eager_status=eager["status"] if eager is not None else pd.NA, eager_s=seconds(eager))
        for m in compiled:
            row = by_form.get(m)
            record[f"{m}_status"] = row["status"] if row is not None else pd.NA
            record[f"{m}_s"] = seconds(row)
            record[f"{m}_speedup"] = record["eager_s"] / record[f"{m}_s"] if record[f"{m}_s"] > 0 else float("nan")
            spent = row["compile_s"] if row is not None and "compile_s" in row else None
            record[f"{m}_compile_s"] = float(spent) if not missing(spent) else float("nan")
        record["best"] = best_forms(group)[FORM_COLUMN].iloc[0]
        records.append(record)
    return sort_rows(pd.DataFrame(records, columns=columns), keys)


SHIPPED_COLUMNS = ("problem", "mode", "role", "layer", "window", "shipped_status", "shipped_s", "shipped_form",
                   "tuned_status", "tuned_s", "tuned_form", "tuned_source", "speedup")


def _seconds(row: pd.Series | None) -> float:
    ok = row is not None and row["status"] == "ok" and not missing(row["median_s"])
    return float(row["median_s"]) if ok else float("nan")


def shipped_table(frame: pd.DataFrame) -> pd.DataFrame:
    """As shipped against tuned: one row per layer, problem, mode and window measured both ways (eager
    rows of `latest_rows`, with `problem`): each side's median and form, the tuned form's source, and
    ``speedup`` = shipped / tuned (above 1 the tuned form is faster)."""
    if not has_shipped(frame):
        return pd.DataFrame(columns=list(SHIPPED_COLUMNS))
    frame = frame[frame[FORM_COLUMN] == EAGER]
    records = []
    for _, group in frame.groupby(list(POINT_COLUMNS), sort=False, dropna=False):
        by_tuning = {r[TUNING_COLUMN]: r for _, r in group.iterrows()}
        shipped, tuned = by_tuning.get(SHIPPED), by_tuning.get(TUNED)
        if shipped is None or tuned is None:
            continue
        record = {k: tuned[k] for k in ("problem", "mode", "role", "layer", "window")}
        for side, row in (("shipped", shipped), ("tuned", tuned)):
            record.update({f"{side}_status": row["status"], f"{side}_s": _seconds(row),
                           f"{side}_form": row.get("form") if not missing(row.get("form")) else ""})
        record["tuned_source"] = tuned.get("form_source") if not missing(tuned.get("form_source")) else ""
        record["speedup"] = record["shipped_s"] / record["tuned_s"] if record["tuned_s"] > 0 else float("nan")
        records.append(record)
    return sort_rows(pd.DataFrame(records, columns=list(SHIPPED_COLUMNS)), ["problem", "mode", "role", "layer", "window"])


def settings(frame: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """Each distinct setting (context and shape) with its rows, in sorted order."""
    out = []
    for values, rows in frame.groupby(list(SETTING_COLUMNS), sort=True, dropna=False):
        out.append((dict(zip(SETTING_COLUMNS, values)), rows))
    return out


def problem_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Each distinct setting with a short id P1, P2, ... in sorted order, and its head dimension."""
    shapes = pd.DataFrame([setting for setting, _ in settings(frame)], columns=list(SETTING_COLUMNS))
    shapes.insert(0, "problem", [f"P{i + 1}" for i in range(len(shapes))])
    shapes["head_dim"] = [c // h if h else pd.NA for c, h in zip(shapes["channels"], shapes["heads"])]
    return shapes


def with_problems(frame: pd.DataFrame, problems: pd.DataFrame) -> pd.DataFrame:
    """The frame with each row's problem id (rows of one setting share it)."""
    ids = {tuple(p[c] for c in SETTING_COLUMNS): p["problem"] for _, p in problems.iterrows()}
    keys = frame[list(SETTING_COLUMNS)].astype(object).itertuples(index=False, name=None)
    return frame.assign(problem=[ids[_key(k)] for k in keys])


def _key(values: tuple) -> tuple:
    return tuple(pd.NA if missing(v) else v for v in values)


def sort_rows(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Sort by ``columns``: roles in `ROLE_ORDER`, modes forward before train, problems by number."""
    if not len(frame):
        return frame.reset_index(drop=True)
    modes = mode_order(frame["mode"].unique()) if "mode" in frame else []
    keyed = frame.assign(
        _role=frame["role"].map(ROLE_ORDER.index) if "role" in frame else 0,
        _mode=frame["mode"].map(modes.index) if "mode" in frame else 0,
        _problem=frame["problem"].map(lambda p: int(p[1:])) if "problem" in frame else 0,
    )
    replace = {"role": "_role", "mode": "_mode", "problem": "_problem"}
    order = [replace.get(c, c) for c in columns]
    return keyed.sort_values(order, kind="mergesort").drop(columns=["_role", "_mode", "_problem"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# Pairing and ratios


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
    """Whether QnA's speed lead over each peer family's best survives compilation: per problem, mode,
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


def ratio_verdict(best_per_point: pd.DataFrame, column: str, target: float) -> str:
    """`holds` when, at some point, QnA is at least ``target`` times better than the strongest opponent
    measured there; `holds partly` at least `BEAT_FACTOR` times; otherwise it does not hold."""
    values = best_per_point[column].dropna()
    if not len(values):
        return NOT_TESTED
    top = float(values.max())
    return HOLDS if top >= target else PARTLY if top >= BEAT_FACTOR else NOT_HOLD


def unmeasured(data: pd.DataFrame, column: str) -> pd.DataFrame:
    """Peer rows without a number for ``column`` where the subject has one at the same setting, mode and
    window (timeout, oom, skipped, unsupported, error, or no memory reading): named, never counted."""
    statuses = MEASURED[column]
    value = "median_s" if column == "latency_ratio" else "peak_bytes"
    subject = data[(data["role"] == SUBJECT) & data["status"].isin(statuses) & data[value].notna()]
    peers = data[(data["role"] == PEER) & (~data["status"].isin(statuses) | data[value].isna())]
    return peers.merge(subject[list(PAIR_COLUMNS)].drop_duplicates(), on=list(PAIR_COLUMNS))


def best_per_family(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per setting and mode, each peer family's best implementation and the best baseline: the layer with
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
    family's best implementation and the best baseline (`best_per_family`). Columns: the setting, `mode`
    and `layer`; references and the other implementations are left to a companion figure."""
    keys = [*SETTING_COLUMNS, "mode", "layer"]
    subjects = frame[frame["role"] == SUBJECT][keys]
    chosen = best_per_family(frame, column)[keys]
    return pd.concat([subjects, chosen]).drop_duplicates().reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# Growth in k


def fit_growth(windows: Iterable[float], values: Iterable[float]) -> tuple[float, float, int, float] | None:
    """Least-squares slope of log(value) on log(window), its R², the number of points and the RMS of the
    residuals in log space; None below two distinct windows. Non-positive or missing values are left out."""
    pairs = [(float(k), float(v)) for k, v in zip(windows, values) if not missing(v) and float(v) > 0 and float(k) > 0]
    if len({k for k, _ in pairs}) < 2:
        return None
    x = np.log(np.array([k for k, _ in pairs]))
    y = np.log(np.array([v for _, v in pairs]))
    dx, dy = x - x.mean(), y - y.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    residual = y - (y.mean() + slope * dx)
    ss_tot = float((dy * dy).sum())
    r2 = 1.0 - float((residual * residual).sum()) / ss_tot if ss_tot > 0 else 1.0
    return slope, r2, len(pairs), float(np.sqrt((residual * residual).mean()))


def poor_fit(fit: tuple[float, float, int, float]) -> bool:
    """R² below `POOR_FIT_R2` with points straying from the power law by over `POOR_FIT_RMS` (a flat
    metric has a low R² from tiny wiggles, yet k^0 describes it well)."""
    return fit[1] < POOR_FIT_R2 and fit[3] > POOR_FIT_RMS


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


def scaling_verdict(comparisons: pd.DataFrame) -> str:
    """`holds` when QnA grows more slowly in every voting comparison, `holds partly` in some, otherwise it
    does not hold; `not tested` without a voting comparison."""
    votes = [v for v in comparisons["vote"] if v is not None and not missing(v)]
    if not votes:
        return NOT_TESTED
    return HOLDS if all(votes) else PARTLY if any(votes) else NOT_HOLD


# ----------------------------------------------------------------------------------------------------
# Verdicts


def overall(verdicts: Sequence[str]) -> str:
    """`holds` if every tested verdict holds, `holds partly` if one holds or holds partly, else not."""
    tested = [v for v in verdicts if v != NOT_TESTED]
    if not tested:
        return NOT_TESTED
    if all(v == HOLDS for v in tested):
        return HOLDS
    if any(v in (HOLDS, PARTLY) for v in tested):
        return PARTLY
    return NOT_HOLD


def verdict_table(data: pd.DataFrame, ratios: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """One verdict per device, problem, subject, mode and claim, against the attention peers only."""
    records = []
    peers = ratios[ratios["role"] == PEER]
    for (device, problem), here in data.groupby(["device_name", "problem"], sort=True, dropna=False):
        subjects = sorted(here.loc[here["role"] == SUBJECT, "layer"].unique())
        for subject in subjects:
            for mode in mode_order(here["mode"].unique()):
                for claim in CLAIMS:
                    if claim.ratio_column:
                        mine = peers[(peers["problem"] == problem) & (peers["mode"] == mode) & (peers["subject"] == subject)]
                        verdict = ratio_verdict(strongest(mine, claim.ratio_column), claim.ratio_column, claim.target)
                    else:
                        verdict = scaling_verdict(comparisons[(comparisons["problem"] == problem)
                                                              & (comparisons["mode"] == mode)
                                                              & (comparisons["subject"] == subject)])
                    records.append(dict(device_name=device, problem=problem, subject=subject, mode=mode,
                                        claim=claim.key, verdict=verdict))
    table = pd.DataFrame(records, columns=["device_name", "problem", "subject", "mode", "claim", "verdict"])
    return sort_rows(table, ["device_name", "problem", "subject", "mode"])


# ----------------------------------------------------------------------------------------------------
# Timing quality


def timed(data: pd.DataFrame) -> pd.DataFrame:
    return data[(data["status"] == "ok") & data["median_s"].notna()]


def timing_flags(ok: pd.DataFrame) -> dict[str, pd.Series]:
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


def timings_unreliable(data: pd.DataFrame) -> bool:
    """More than `CAUTION_SHARE` of the timed points carry a timing warning."""
    ok = timed(data)
    if not len(ok):
        return False
    flags = timing_flags(ok)
    return (flags["busy"] | flags["few"] | flags["wide"]).sum() > CAUTION_SHARE * len(ok)


# ----------------------------------------------------------------------------------------------------
# Whole models

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


# ----------------------------------------------------------------------------------------------------
# Everything at once


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
