"""A run's noise floor, from its own rows: how much the canary (the fixed matrix product timed around
every round, `qna_bench.measure.canary`) moved, and how far each layer's time moved between the worker
processes its rounds ran in. A ratio whose spread over rounds reaches across a verdict line
(`qna_bench.analysis.claims.crossed_line`) cannot decide that line. The report and `compare` read the same floor. Pure functions, no torch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qna_bench.rounds import round_times


def _floats(values: object) -> list[float]:
    if isinstance(values, list | tuple | np.ndarray):
        return [float(v) for v in values if v is not None and np.isfinite(v)]
    return []


# The mean range of n draws of a unit normal (the d2 of control charts): range / d2 estimates σ.
_MEAN_RANGE = {2: 1.128, 3: 1.693, 4: 2.059, 5: 2.326, 6: 2.534, 7: 2.704, 8: 2.847, 9: 2.970, 10: 3.078}


def range_sigma(spread: float, count: int) -> float:
    """σ of the log of one round's time, from the max / min − 1 ``spread`` of ``count`` rounds."""
    return float(np.log1p(spread)) / _MEAN_RANGE[min(max(count, 2), 10)]


def process_spread(round_times: Iterable[float]) -> float | None:
    """max / min − 1 of a row's round times (`qna_bench.rounds.round_times`; None for fewer than two)."""
    values = [v for v in round_times if v > 0]
    return max(values) / min(values) - 1.0 if len(values) > 1 else None


@dataclass(frozen=True)
class NoiseFloor:
    """``canary_*``: over every round's canary of the rows (median seconds, (q75 − q25) / median,
    max / median − 1); ``slow_rounds``: rounds whose canary stayed slow on a re-run; ``layers``: per
    layer, over its rows whose rounds ran in several processes, the median and largest `process_spread`
    and the median σ they imply (`range_sigma`)."""

    canaries: int
    canary_median_s: float | None
    canary_spread: float | None
    canary_worst: float | None
    slow_rounds: int
    layers: pd.DataFrame  # layer, points, processes, median_spread, max_spread, sigma (`range_sigma`)

    def summary(self) -> str:
        """One line: the canary's spread and each layer's median spread between processes."""
        canary = (f"canary {self.canaries} rounds, spread {self.canary_spread:.1%}, slowest +{self.canary_worst:.1%}, "
                  f"{self.slow_rounds} slow round(s)" if self.canaries else "no canary")
        layers = ", ".join(f"{r.layer} {r.median_spread:.1%}" for r in self.layers.itertuples())
        return f"{canary}; between processes: {layers or 'no rows with rounds from several processes'}"

    def layer_sigma(self, layer: str) -> float:
        """σ of the log of one round of ``layer`` between processes (0 when the run has no such rows)."""
        row = self.layers[self.layers["layer"] == layer]
        return float(row["sigma"].iloc[0]) if len(row) else 0.0


def noise_floor(frame: pd.DataFrame) -> NoiseFloor:
    """The floor of the ``ok`` rows of ``frame`` (a results frame; older files without canaries or
    process counts give an empty floor)."""
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    canaries = [c for values in ok.get("canary_s", pd.Series(dtype=object)) for c in _floats(values)]
    median = float(np.median(canaries)) if canaries else None
    spread = worst = None
    if canaries and median:
        q25, q75 = np.quantile(canaries, [0.25, 0.75])
        spread, worst = float((q75 - q25) / median), float(max(canaries) / median - 1.0)
    slow = int(pd.to_numeric(ok.get("slow_rounds", pd.Series(dtype=float)), errors="coerce").fillna(0).sum())
    layers = []
    if "processes" in ok and ("round_geomeans_s" in ok or "round_medians_s" in ok):
        several = ok[pd.to_numeric(ok["processes"], errors="coerce").fillna(0) > 1]
        for layer, rows in several.groupby("layer", sort=True):
            rounds = [_floats(round_times(r)) for r in rows.to_dict("records")]
            pairs = [(s, len(r)) for s, r in ((process_spread(r), r) for r in rounds) if s is not None]
            if pairs:
                spreads = [s for s, _ in pairs]
                layers.append(dict(layer=layer, points=len(spreads), processes=int(rows["processes"].max()),
                                   median_spread=float(np.median(spreads)), max_spread=float(max(spreads)),
                                   sigma=float(np.median([range_sigma(s, n) for s, n in pairs]))))
    table = pd.DataFrame(layers, columns=["layer", "points", "processes", "median_spread", "max_spread", "sigma"])
    return NoiseFloor(len(canaries), median, spread, worst, slow, table)
