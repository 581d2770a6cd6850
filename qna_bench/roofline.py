"""The cache-aware roofline from a results frame: each point's achieved FLOP/s and bytes/s, its arithmetic
intensity, the memory level its working set fits in, and the fraction it reaches of that level's roof,
min(peak FLOP/s, intensity × the level's probed bytes/s). Derived here from the stored columns, never
stored; pure functions over the newest rows (`qna_bench.analysis` hands them in).

A point's working set is its closed-form bytes (``bytes_analytic``: every byte its algorithm moves, so at
least its footprint): one that fits the L2 of the measuring threads is judged against the L2 roof, one
that fits the last-level cache against the LLC roof, any other against the DRAM roof, after the
cache-aware rooflines of LBNL's Empirical Roofline Toolkit and Intel Advisor. Rows measured before the
cache probes carry only the DRAM roof, and are judged against it.
"""

from __future__ import annotations

import functools
import math

import pandas as pd

from qna_bench.layer_facts import find_layer

# A point this far above its roof means a probe or a count is wrong, not a fast layer.
ABOVE_ROOF_TOLERANCE = 0.10
# Points under this fraction of their roof are "far below" it: the report lists them with their profiles.
FAR_BELOW_FRACTION = 0.10
# Memory levels from the innermost out: (name, bandwidth column, capacity column); DRAM has no capacity.
LEVELS = (
    ("L2", "peak_bytes_per_s_l2_probe", "l2_bytes_probe"),
    ("LLC", "peak_bytes_per_s_llc_probe", "llc_bytes_probe"),
    ("DRAM", "peak_bytes_per_s_probe", None),
)
ROOF_COLUMNS = (
    "work_flops",
    "achieved_flops_per_s",
    "achieved_bytes_per_s",
    "intensity",
    "roof_level",
    "level_bytes_per_s",
    "roof_flops_per_s",
    "roof_fraction",
    "bound",
)


@functools.cache
def in_image_taps(size: int, window: int, stride: int = 1, dilation: int = 1) -> float:
    """Along one axis of a "same"-padded window: the share of the window's taps, over all outputs, that
    land inside the image rather than on the padding."""
    pad = dilation * (window - 1) // 2
    outputs = (size + 2 * pad - dilation * (window - 1) - 1) // stride + 1
    inside = sum(
        0 <= out * stride - pad + tap * dilation < size for out in range(outputs) for tap in range(window)
    )
    return inside / (outputs * window)


def _padding_share(frame: pd.DataFrame) -> pd.Series:
    """Per row: the share of a k×k window's taps inside the image for a padded convolution
    (`LayerSpec.padded_convolution`), else 1."""
    share = pd.Series(1.0, index=frame.index, dtype="Float64")
    padded = frame["layer"].map(lambda name: bool(getattr(find_layer(name), "padded_convolution", False)))
    for index, row in frame[padded.astype(bool)].iterrows():
        stride, dilation = (int(row[key]) if pd.notna(row.get(key)) else 1 for key in ("stride", "dilation"))
        share[index] = math.prod(
            in_image_taps(int(row[axis]), int(row["window"]), stride, dilation) for axis in ("height", "width")
        )
    return share


def work_flops(frame: pd.DataFrame) -> pd.Series:
    """FLOPs of one call: the counter's where it saw the layer, else the closed form (flex attention);
    for a padded convolution, only its taps inside the image (`LayerSpec.padded_convolution`)."""
    counted = frame["flops"].astype("Float64")
    return counted.where(counted > 0, frame["flops_analytic"].astype("Float64")) * _padding_share(frame)


def roof(intensity: pd.Series | float, peak_flops: pd.Series | float, peak_bytes_per_s: pd.Series | float):
    """Attainable FLOP/s at ``intensity`` (FLOPs per byte): the lower of the compute and memory roofs."""
    memory_roof = intensity * peak_bytes_per_s
    if isinstance(memory_roof, pd.Series):
        return memory_roof.where(memory_roof < peak_flops, peak_flops)
    return min(memory_roof, peak_flops)


def _column(frame: pd.DataFrame, name: str | None) -> pd.Series:
    if name is None or name not in frame:
        return pd.Series(pd.NA, index=frame.index, dtype="Float64")
    return frame[name].astype("Float64")


def memory_level(rows: pd.DataFrame, working_set: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Per row: the innermost level whose probed capacity holds ``working_set`` and whose bandwidth was
    probed (else DRAM), and that level's bandwidth."""
    level = pd.Series("DRAM", index=rows.index, dtype="string")
    bandwidth = _column(rows, "peak_bytes_per_s_probe")
    decided = pd.Series(False, index=rows.index)
    for name, rate_column, size_column in LEVELS[:-1]:
        rate, size = _column(rows, rate_column), _column(rows, size_column)
        fits = ((working_set <= size) & (rate > 0)).fillna(False).astype(bool) & ~decided
        level = level.mask(fits, name)
        bandwidth = bandwidth.mask(fits, rate)
        decided |= fits
    return level, bandwidth


def roofline_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The ``ok`` rows (one per point: the newest) that have a time, a FLOP and byte count and their
    run's probes, with `ROOF_COLUMNS` added (``bound``: ``compute``, or the memory level whose roof is the
    lower at the point's intensity)."""
    needed = ("bytes_analytic", "peak_flops_probe", "peak_bytes_per_s_probe")
    if rows.empty or any(column not in rows for column in needed):
        return rows.iloc[0:0].assign(**{column: pd.Series(dtype="Float64") for column in ROOF_COLUMNS})
    rows = rows[rows["status"] == "ok"].copy()
    rows["work_flops"] = work_flops(rows)
    seconds = rows["median_s"].astype("Float64")
    moved = rows["bytes_analytic"].astype("Float64")
    peak_flops = rows["peak_flops_probe"].astype("Float64")
    dram = rows["peak_bytes_per_s_probe"].astype("Float64")
    known = (seconds > 0) & (rows["work_flops"] > 0) & (moved > 0) & (peak_flops > 0) & (dram > 0)
    rows = rows[known.fillna(False).astype(bool)].copy()
    seconds, moved, peak_flops = seconds[rows.index], moved[rows.index], peak_flops[rows.index]
    rows["achieved_flops_per_s"] = rows["work_flops"] / seconds
    rows["achieved_bytes_per_s"] = moved / seconds
    rows["intensity"] = rows["work_flops"] / moved
    rows["roof_level"], rows["level_bytes_per_s"] = memory_level(rows, moved)
    rows["roof_flops_per_s"] = roof(rows["intensity"], peak_flops, rows["level_bytes_per_s"])
    rows["roof_fraction"] = rows["achieved_flops_per_s"] / rows["roof_flops_per_s"]
    memory_bound = (rows["intensity"] * rows["level_bytes_per_s"] < peak_flops).astype(bool)
    rows["bound"] = rows["roof_level"].where(memory_bound, "compute").astype("string")
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


def level_roofs(roofline: pd.DataFrame) -> list[tuple[str, float]]:
    """The memory levels these points' probes measured, innermost first, with their median bytes/s."""
    roofs = []
    for name, rate_column, _ in LEVELS:
        rate = _column(roofline, rate_column).dropna()
        rate = rate[rate > 0]
        if len(rate):
            roofs.append((name, float(rate.median())))
    return roofs
