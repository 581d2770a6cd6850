"""Statistics of measured times, apart from their users: geometric means, per-round times and ratio
spreads (`qna_bench.rounds`), the noise estimators (`qna_bench.noise`) and power-law growth fits.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from qna_bench.analysis.rows import missing
from qna_bench.noise import NoiseFloor, noise_floor, process_spread, range_sigma
from qna_bench.rounds import geometric_mean, ratio_spread, round_times

__all__ = ["POOR_FIT_R2", "POOR_FIT_RMS", "NoiseFloor", "fit_growth", "geometric_mean", "noise_floor",
           "poor_fit", "process_spread", "range_sigma", "ratio_spread", "round_times"]

# A growth fit below this R² is poor: it is shown, and it does not vote.
POOR_FIT_R2 = 0.9
# ... and points straying from the power law by more than this (RMS of log residuals, ~5%).
POOR_FIT_RMS = 0.05


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
