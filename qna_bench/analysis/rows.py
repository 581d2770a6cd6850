"""The rows of a results frame: columns that name a point and a setting, the newest row per point and form,
each layer at its best form, the form and shipped-against-tuned tables, problems and settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd

from qna_bench.labels import COMPILE_MODES, EAGER, ROLES, SHIPPED, TUNED, form_label, mode_of
from qna_bench.layer_facts import role_of

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
# A row's time per round of interleaved rounds (`qna_bench.rounds.round_times`), derived when rows pair.
ROUNDS_COLUMN = "round_times_s"

MODE_ORDER = ("forward", "train")
UNDECLARED = "undeclared"
ROLE_ORDER: tuple[str, ...] = (*ROLES, UNDECLARED)
SUBJECT, PEER, BASELINE = "subject", "peer", "baseline"


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
