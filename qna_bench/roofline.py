"""The roofline from a results frame: each point's achieved FLOP/s and bytes/s, its arithmetic intensity,
and the fraction it reaches of the roof its run's machine probes set, min(peak FLOP/s, intensity × peak
bytes/s). Derived here from the stored columns, never stored.
"""

from __future__ import annotations

import pandas as pd

from qna_bench.plots import latest_rows

# A point this far above its roof means a probe or a count is wrong, not a fast layer.
ABOVE_ROOF_TOLERANCE = 0.10
# Points under this fraction of their roof are "far below" it: the report lists them with their profiles.
FAR_BELOW_FRACTION = 0.10
ROOF_COLUMNS = (
    "work_flops",
    "achieved_flops_per_s",
    "achieved_bytes_per_s",
    "intensity",
    "roof_flops_per_s",
    "roof_fraction",
    "bound",
)


def work_flops(frame: pd.DataFrame) -> pd.Series:
    """FLOPs of one call: the counter's where it saw the layer, else the closed form (flex attention)."""
    counted = frame["flops"].astype("Float64")
    return counted.where(counted > 0, frame["flops_analytic"].astype("Float64"))


def roof(intensity: pd.Series | float, peak_flops: pd.Series | float, peak_bytes_per_s: pd.Series | float):
    """Attainable FLOP/s at ``intensity`` (FLOPs per byte): the lower of the compute and memory roofs."""
    memory_roof = intensity * peak_bytes_per_s
    if isinstance(memory_roof, pd.Series):
        return memory_roof.where(memory_roof < peak_flops, peak_flops)
    return min(memory_roof, peak_flops)


def roofline_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The latest measured row of every point that has a time, a FLOP and byte count and its run's
    probes, with `ROOF_COLUMNS` added (``bound``: which roof is the lower at its intensity)."""
    needed = ("bytes_analytic", "peak_flops_probe", "peak_bytes_per_s_probe")
    if frame.empty or any(column not in frame for column in needed):
        return frame.iloc[0:0].assign(**{column: pd.Series(dtype="Float64") for column in ROOF_COLUMNS})
    rows = latest_rows(frame)
    rows = rows[rows["status"] == "ok"].copy()
    rows["work_flops"] = work_flops(rows)
    seconds = rows["median_s"].astype("Float64")
    moved = rows["bytes_analytic"].astype("Float64")
    peak_flops = rows["peak_flops_probe"].astype("Float64")
    peak_bandwidth = rows["peak_bytes_per_s_probe"].astype("Float64")
    known = (seconds > 0) & (rows["work_flops"] > 0) & (moved > 0) & (peak_flops > 0) & (peak_bandwidth > 0)
    rows = rows[known.fillna(False)].copy()
    seconds, moved = seconds[rows.index], moved[rows.index]
    peak_flops, peak_bandwidth = peak_flops[rows.index], peak_bandwidth[rows.index]
    rows["achieved_flops_per_s"] = rows["work_flops"] / seconds
    rows["achieved_bytes_per_s"] = moved / seconds
    rows["intensity"] = rows["work_flops"] / moved
    rows["roof_flops_per_s"] = roof(rows["intensity"], peak_flops, peak_bandwidth)
    rows["roof_fraction"] = rows["achieved_flops_per_s"] / rows["roof_flops_per_s"]
    memory_bound = rows["intensity"] * peak_bandwidth < peak_flops
    rows["bound"] = memory_bound.map({True: "memory", False: "compute"}).astype("string")
    return rows.reset_index(drop=True)


def above_roof(roofline: pd.DataFrame, tolerance: float = ABOVE_ROOF_TOLERANCE) -> pd.DataFrame:
    """Points more than ``tolerance`` above their roof: a probe or a count is wrong."""
    return roofline[roofline["roof_fraction"] > 1 + tolerance]


def far_below(roofline: pd.DataFrame, fraction: float = FAR_BELOW_FRACTION) -> pd.DataFrame:
    """Points under ``fraction`` of their roof, lowest first."""
    return roofline[roofline["roof_fraction"] < fraction].sort_values("roof_fraction", kind="mergesort")


def typical_fractions(roofline: pd.DataFrame) -> pd.DataFrame:
    """Per layer and mode: points, median, lowest and highest fraction of the roof, and the roof most of
    its points sit under."""
    if roofline.empty:
        return pd.DataFrame(columns=["layer", "mode", "points", "median", "lowest", "highest", "bound"])
    grouped = roofline.groupby(["layer", "mode"], sort=True)
    table = grouped["roof_fraction"].agg(points="count", median="median", lowest="min", highest="max")
    table["bound"] = grouped["bound"].agg(lambda bounds: bounds.mode().iloc[0])
    return table.reset_index()
