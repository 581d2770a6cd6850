"""The appendix: the cache-aware roofline section, and the figures with their captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qna_bench.analysis import (
    Analysis,
    mode_order,
    sort_rows,
    with_roles,
)
from qna_bench.analysis import missing as _missing
from qna_bench.plots.specs import CAPTIONS
from qna_bench.report.cells import _fmt, _problem_label, markdown_table


def figures_section(figures: Sequence[Path | str]) -> str:
    if not figures:
        return ""
    lines = ["## Figures"]
    for figure in figures:
        name = Path(figure).name
        lines.append(f"![{CAPTIONS.get(Path(figure).stem, name)}]({name})")
    return "\n\n".join(lines)


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
