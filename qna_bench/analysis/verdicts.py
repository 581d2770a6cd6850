"""The verdict table: one verdict per device, problem, subject, mode and claim, against the attention peers."""

from __future__ import annotations

import pandas as pd

from qna_bench.analysis.claims import CLAIMS, ratio_verdict, scaling_verdict
from qna_bench.analysis.ratios import strongest
from qna_bench.analysis.rows import PEER, SUBJECT, mode_order, sort_rows


def verdict_table(data: pd.DataFrame, ratios: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """One verdict per device, problem, subject, mode and claim, against the attention peers only."""
    records = []
    peers = ratios[ratios["role"] == PEER]
    for (device, problem), here in data.groupby(["device_name", "problem"], sort=True, dropna=False):
        subjects = sorted(here.loc[here["role"] == SUBJECT, "layer"].unique())
        for subject in subjects:
            for mode in mode_order(here["mode"].unique()):
                for claim in CLAIMS:
                    if claim.ratio_column:
                        mine = peers[(peers["problem"] == problem) & (peers["mode"] == mode) & (peers["subject"] == subject)]
                        verdict = ratio_verdict(strongest(mine, claim.ratio_column), claim.ratio_column, claim.target)
                    else:
                        verdict = scaling_verdict(comparisons[(comparisons["problem"] == problem)
                                                              & (comparisons["mode"] == mode)
                                                              & (comparisons["subject"] == subject)])
                    records.append(dict(device_name=device, problem=problem, subject=subject, mode=mode,
                                        claim=claim.key, verdict=verdict))
    table = pd.DataFrame(records, columns=["device_name", "problem", "subject", "mode", "claim", "verdict"])
    return sort_rows(table, ["device_name", "problem", "subject", "mode"])
