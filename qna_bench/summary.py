"""The table printed at the end of a sweep: median latency and peak memory per layer and window."""

from __future__ import annotations

import pandas as pd

MIB = 2**20
SHAPE = ["device_name", "dtype", "batch", "height", "width", "channels", "heads", "stride", "dilation"]


def _cell(row: pd.Series) -> str:
    if row["status"] != "ok":
        return str(row["status"])
    peak = "n/a" if pd.isna(row["peak_bytes"]) else f"{row['peak_bytes'] / MIB:.1f}"
    return f"{row['median_s'] * 1e3:.2f} ms / {peak} MiB"


def summary_table(frame: pd.DataFrame) -> str:
    """One block per problem shape and mode: rows are layers, columns windows, cells 'median ms / peak MiB'."""
    blocks = []
    for (_shape, mode), rows in frame.groupby([frame[SHAPE].astype(str).agg(" ".join, axis=1), "mode"], sort=True):
        first = rows.iloc[0]
        title = (
            f"{mode}: B={first['batch']}, {first['height']}×{first['width']}, C={first['channels']}, "
            f"{first['heads']} heads, {first['dtype']}, {first['device_name']}"
        )
        cells = rows.assign(cell=rows.apply(_cell, axis=1)).pivot_table(
            index="layer", columns="window", values="cell", aggfunc="first"
        )
        cells.columns = [f"k={k}" for k in cells.columns]
        blocks.append(f"{title}  (median latency / peak memory above inputs)\n{cells.fillna('').to_string()}")
    return "\n\n".join(blocks)
