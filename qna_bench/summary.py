"""The table printed at the end of a sweep: median latency and peak memory per layer and window."""

from __future__ import annotations

import pandas as pd

from qna_bench.analysis import FORM_COLUMN, TUNING_COLUMN, latest_rows, layer_label, settings
from qna_bench.text import MIB, milliseconds, shape_label


def _cell(row: pd.Series) -> str:
    if row["status"] != "ok":
        return str(row["status"])
    peak = "n/a" if pd.isna(row["peak_bytes"]) else f"{row['peak_bytes'] / MIB:.1f}"
    return f"{milliseconds(row['median_s'])} / {peak} MiB"


def summary_table(frame: pd.DataFrame) -> str:
    """One block per setting (problem shape and context) and mode: rows are layers, columns windows,
    cells 'median ms / peak MiB'; the newest row of each point (a compiled form on its own line)."""
    blocks = []
    for setting, in_setting in settings(latest_rows(frame)):
        for mode, rows in in_setting.groupby("mode", sort=True):
            blocks.append(_block(setting, mode, rows))
    return "\n\n".join(blocks)


def _block(setting: dict, mode: str, rows: pd.DataFrame) -> str:
    title = (
        f"{mode}: {shape_label(setting)}, {setting['dtype']}, {setting['device_name']}, {setting['threads']} threads"
    )
    labels = [layer_label(*names) for names in zip(rows["layer"], rows[FORM_COLUMN], rows[TUNING_COLUMN])]
    cells = rows.assign(cell=rows.apply(_cell, axis=1), layer=labels).pivot_table(
        index="layer", columns="window", values="cell", aggfunc="first"
    )
    cells.columns = [f"k={k}" for k in cells.columns]
    return f"{title}  (median latency / peak memory above inputs)\n{cells.fillna('').to_string()}"
