"""The paper's claims, their factors (defined here once) and the verdicts on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qna_bench.analysis.rows import missing

# The abstract's factors: "up-to x10 less memory while being up-to x5 faster".
CLAIMED_MEMORY_FACTOR = 10.0
CLAIMED_SPEED_FACTOR = 5.0
# The lines a verdict turns on: who is faster (1×), and the abstract's factors.
VERDICT_LINES: tuple[float, ...] = (1.0, CLAIMED_SPEED_FACTOR, CLAIMED_MEMORY_FACTOR)
# QnA counts as leaner / faster only by at least this factor (a 1.02× difference is no claim).
BEAT_FACTOR = 1.1


HOLDS, PARTLY, NOT_HOLD, NOT_TESTED = "holds", "holds partly", "does not hold on this device", "not tested"


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    quote: str
    ratio_column: str | None = None
    target: float | None = None
    verb: str = ""


MEMORY = Claim("memory", f"Memory: up to {CLAIMED_MEMORY_FACTOR:g}× less", "requiring up-to x10 less memory", "memory_ratio",
               CLAIMED_MEMORY_FACTOR, "leaner")
SPEED = Claim("speed", f"Speed: up to {CLAIMED_SPEED_FACTOR:g}× faster", "while being up-to x5 faster", "latency_ratio",
              CLAIMED_SPEED_FACTOR, "faster")
SCALING = Claim("scaling", "Scaling with window", "scales especially well with window size")
CLAIMS = (MEMORY, SPEED, SCALING)


def ratio_verdict(best_per_point: pd.DataFrame, column: str, target: float) -> str:
    """`holds` when, at some point, QnA is at least ``target`` times better than the strongest opponent
    measured there; `holds partly` at least `BEAT_FACTOR` times; otherwise it does not hold."""
    values = best_per_point[column].dropna()
    if not len(values):
        return NOT_TESTED
    top = float(values.max())
    return HOLDS if top >= target else PARTLY if top >= BEAT_FACTOR else NOT_HOLD


def scaling_verdict(comparisons: pd.DataFrame) -> str:
    """`holds` when QnA grows more slowly in every voting comparison, `holds partly` in some, otherwise it
    does not hold; `not tested` without a voting comparison."""
    votes = [v for v in comparisons["vote"] if v is not None and not missing(v)]
    if not votes:
        return NOT_TESTED
    return HOLDS if all(votes) else PARTLY if any(votes) else NOT_HOLD


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


def crossed_line(low: float, high: float) -> float | None:
    """The first verdict line strictly inside ``[low, high]`` (a ratio's spread), or None: a ratio whose
    spread over rounds reaches across it cannot decide that line."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    for line in VERDICT_LINES:
        if low < line < high:
            return line
    return None
