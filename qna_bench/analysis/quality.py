"""Timing quality: which timed points ran on a busy machine, with few replicates or a wide spread.
"""

from __future__ import annotations

import pandas as pd

# Timing spread (q75 − q25) / median above which a point counts as noisy.
NOISY_SPREAD = 0.25
MIN_REPLICATES = 3
# Above this share of timed points with a warning, the verdicts carry a caution.
CAUTION_SHARE = 0.05


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
