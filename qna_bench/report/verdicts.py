"""The verdicts section: one headline per claim, problem, mode and subject, with its conditions and the
per-family and growth tables behind it.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from qna_bench.analysis import (
    CAUTION_SHARE,
    CLAIMS,
    MIN_GROWTH_POINTS,
    PEER,
    SUBJECT,
    Analysis,
    Claim,
    mode_order,
    overall,
    ratio_verdict,
    strongest,
    timings_unreliable,
    unmeasured,
    weakest,
)
from qna_bench.analysis import missing as _missing
from qna_bench.labels import is_compiled, mode_of
from qna_bench.report.cells import _fmt, _k_list, _problem_label, _spread, _versus, _where, markdown_table
from qna_bench.report.forms import forms_section, tuning_section
from qna_bench.report.rules import RULES
from qna_bench.report.setup import _flags_of
from qna_bench.report.tables import _by_head_size


def _slice(frame: pd.DataFrame, problem: str, mode: str, subject: str) -> pd.DataFrame:
    return frame[(frame["problem"] == problem) & (frame["mode"] == mode) & (frame["subject"] == subject)]


def _peer_ratios(analysis: Analysis, claim: Claim, problem: str, mode: str, subject: str) -> pd.DataFrame:
    ratios = _slice(analysis.ratios, problem, mode, subject)
    return ratios[(ratios["role"] == PEER) & ratios[claim.ratio_column].notna()]


def _ratio_headline(best: pd.DataFrame, claim: Claim) -> str:
    """What the verdict rests on: the range against the strongest peer, where QnA reaches T, where it loses."""
    if not len(best):
        return "no attention peer measured next to QnA"
    column, target = claim.ratio_column, claim.target
    low, high = best.loc[best[column].idxmin()], best.loc[best[column].idxmax()]
    loses = best[best[column] < 1]
    return (f"vs the strongest peer {_spread(low, column)} (k={int(low['window'])}) to {_spread(high, column)} "
            f"(k={int(high['window'])}); ≥{claim.target:g}× {_where(best[best[column] >= target])}; "
            f"QnA loses {_where(loses)}" + (f" (vs {_versus(loses)})" if len(loses) else ""))


def _scaling_headline(comparisons: pd.DataFrame) -> str:
    if not len(comparisons):
        return "no attention peer that uses the window measured next to QnA"
    votes = comparisons[comparisons["vote"].notna()]
    wins = int(votes["vote"].astype(bool).sum())
    by_metric = ", ".join(
        f"{metric} {int(votes.loc[votes['metric'] == metric, 'vote'].astype(bool).sum())} of "
        f"{int((votes['metric'] == metric).sum())}"
        for metric in ("latency", "memory")
    )
    silent = len(comparisons) - len(votes)
    return (f"QnA grows more slowly in {wins} of {len(votes)} voting comparisons ({by_metric})"
            + (f"; {silent} do not vote (poor fit or < {MIN_GROWTH_POINTS} shared windows)" if silent else ""))


def _headline(analysis: Analysis, claim: Claim, problem: str, mode: str, subject: str) -> str:
    if claim.ratio_column:
        return _ratio_headline(strongest(_peer_ratios(analysis, claim, problem, mode, subject), claim.ratio_column), claim)
    return _scaling_headline(_slice(analysis.comparisons, problem, mode, subject))


def _conditions(analysis: Analysis, claim: Claim, problem: str, mode: str, subject: str) -> list[str]:
    """The detail under a ratio verdict: who the strongest peers were, the weakest-peer figure, the gaps."""
    column = claim.ratio_column
    peers = _peer_ratios(analysis, claim, problem, mode, subject)
    out = []
    best = strongest(peers, column)
    if len(best):
        out.append(f"Strongest peer per window: {_versus(best)}.")
        top = weakest(peers, column)
        out.append(f"Against the weakest peer (not the verdict): up to {_spread(top, column)} at k={int(top['window'])} "
                   f"vs {top['layer']}.")
    data = analysis.frame
    here = data[(data["problem"] == problem) & (data["mode"] == mode)]
    gaps = unmeasured(here[(here["role"] != SUBJECT) | (here["layer"] == subject)], column)
    if len(gaps):
        gaps = gaps.assign(status=gaps["status"].where(gaps["status"] != "ok", "no memory reading"))
        texts = [f"{layer} {status} at k = {_k_list(group['window'])}"
                 for (layer, status), group in gaps.groupby(["layer", "status"], sort=True)]
        out.append("Peers without a number where QnA has one (in no ratio): " + "; ".join(texts) + ".")
    return out


def _backend_of(flags: dict) -> str:
    """What ran for a row, as its flags record it: a backend, and the fallback it is when it is one."""
    backend = (flags.get("backend") or (f"NATTEN {flags['natten_backend']}" if flags.get("natten_backend") else "")
               or ("torch.compile(flex_attention)" if flags.get("flex_compiled") else ""))
    fallback = flags.get("fallback", "")
    return f"{backend} (fallback: {fallback})" if backend and fallback else backend


def _ran_as(flags: object, compile_mode: object) -> str:
    """A row's backend, and its compiled form when it ran compiled."""
    backend = _backend_of(_flags_of(flags))
    if not is_compiled(compile_mode):
        return backend
    form = f"compiled ({mode_of(compile_mode)})"
    return f"{backend}, {form}" if backend else form


def _what_ran(data: pd.DataFrame, problem: str, mode: str, layers: Iterable[str]) -> str:
    """Each layer's recorded backend at this problem and mode, and its form where it won compiled ("" when
    none of them records either)."""
    texts = []
    for layer in sorted(set(layers)):
        rows = data[(data["problem"] == problem) & (data["mode"] == mode) & (data["layer"] == layer)]
        forms = rows["compile_mode"] if "compile_mode" in rows else [None] * len(rows)
        ran = sorted({_ran_as(flags, form) for flags, form in zip(rows.get("layer_flags", [None] * len(rows)), forms)}
                     - {""})
        if ran:
            texts.append(f"{layer}: {'; '.join(ran)}")
    return "; ".join(texts)


def _family_table(analysis: Analysis, claim: Claim, subject: str, device: str) -> str:
    column = claim.ratio_column
    problems = analysis.problems[analysis.problems["device_name"] == device]["problem"]
    rows = []
    for problem in problems:
        for mode in mode_order(analysis.frame["mode"].unique()):
            peers = _peer_ratios(analysis, claim, problem, mode, subject)
            best = strongest(peers, column, by=("family",))
            for family, own in best.groupby("family", sort=True):
                verdict = ratio_verdict(own, column, claim.target)
                loses = own[own[column] < 1]
                rows.append([family, problem, mode, _versus(own),
                             f"{_spread(own.loc[own[column].idxmin()], column)} to {_spread(own.loc[own[column].idxmax()], column)}",
                             _where(own[own[column] >= claim.target]), _where(loses), verdict,
                             _what_ran(analysis.frame, problem, mode, own["layer"])])
    if not rows:
        return ""
    headers = ["family", "problem", "mode", "strongest member per window", "ratio range",
               f"≥{claim.target:g}×", "QnA loses", "verdict", "what ran"]
    if not any(row[-1] for row in rows):
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    return markdown_table(headers, rows)


def _comparison_table(analysis: Analysis, subject: str, device: str) -> str:
    problems = set(analysis.problems[analysis.problems["device_name"] == device]["problem"])
    comparisons = analysis.comparisons[analysis.comparisons["problem"].isin(problems)
                                       & (analysis.comparisons["subject"] == subject)]
    rows = []
    for r in comparisons.itertuples():
        vote = "no vote: " + r.why if r.vote is None or _missing(r.vote) else ("QnA slower-growing" if r.vote else "QnA not slower-growing")
        rows.append([r.problem, r.mode, r.layer, r.metric, _k_list(r.windows) if r.windows else "none",
                     _growth_text(r.subject_exponent, r.subject_r2, r.subject_poor),
                     _growth_text(r.peer_exponent, r.peer_r2, r.peer_poor), vote])
    if not rows:
        return ""
    return markdown_table(["problem", "mode", "peer", "metric", "shared k", "QnA", "peer", "vote"], rows)


def _growth_text(exponent: float, r2: float, poor: bool) -> str:
    if _missing(exponent):
        return "n/a"
    return f"k^{_fmt(exponent)} (R² {_fmt(r2)}{', poor fit' if poor else ''})"


def verdict_section(analysis: Analysis) -> str:
    verdicts = analysis.verdicts
    if not len(verdicts):
        return "\n\n".join(part for part in ("## Verdicts", "No rows.", forms_section(analysis),
                                               tuning_section(analysis)) if part)
    parts = ["## Verdicts"]
    problems = analysis.problems
    for (device, subject), on_device in verdicts.groupby(["device_name", "subject"], sort=True):
        modes = mode_order(on_device["mode"].unique())
        parts.append(f"### On {device}, {subject} against the attention peers")
        rows = []
        for claim in CLAIMS:
            for problem in sorted(on_device["problem"].unique(), key=lambda p: int(p[1:])):
                mine = on_device[(on_device["claim"] == claim.key) & (on_device["problem"] == problem)].set_index("mode")
                cells = [f"**{mine.loc[m, 'verdict']}**: {_headline(analysis, claim, problem, m, subject)}"
                         if m in mine.index else "—" for m in modes]
                rows.append([claim.title, _problem_label(problem, problems), *cells,
                             f"**{overall(mine['verdict'].tolist())}**"])
        parts.append(markdown_table(["claim", "problem", *modes, "overall"], rows))
        parts.append("\n".join(_by_head_size(on_device, problems)))
        if timings_unreliable(analysis.frame[analysis.frame["device_name"] == device]):
            parts.append(f"**Caution:** the timings on this device are noisy (over {CAUTION_SHARE:.0%} of the timed points "
                         "carry a warning, see *Reliability of the timings*): the speed and latency-growth verdicts may "
                         "not survive a re-measurement on a quiet machine. Peak memory does not depend on load.")
        bullets = []
        for claim in CLAIMS[:2]:
            for problem in sorted(on_device["problem"].unique(), key=lambda p: int(p[1:])):
                for mode in modes:
                    found = _conditions(analysis, claim, problem, mode, subject)
                    if found:
                        bullets.append(f"- **{claim.title}, {mode}, {_problem_label(problem, problems)}**")
                        bullets += [f"  - {text}" for text in found]
        if bullets:
            parts += ["Conditions:", "\n".join(bullets)]
        for claim in CLAIMS[:2]:
            table = _family_table(analysis, claim, subject, device)
            if table:
                parts += [f"#### {claim.title}: per peer family (each family's strongest member at each window)", table]
        table = _comparison_table(analysis, subject, device)
        if table:
            parts += ["#### Scaling: QnA against each peer over the windows both measured", table]
    parts += [section for section in (forms_section(analysis), tuning_section(analysis)) if section]
    parts += ["### How the verdicts are decided", RULES.strip()]
    return "\n\n".join(parts)
