"""The forms sections: tuned against as shipped, eager against compiled, and whether QnA's lead survives.
"""

from __future__ import annotations

import json

import pandas as pd

from qna_bench.analysis import (
    Analysis,
    has_compiled,
    sort_rows,
)
from qna_bench.analysis import missing as _missing
from qna_bench.labels import form_label
from qna_bench.report.cells import _fmt, _k_list, _problem_label, _x, markdown_table
from qna_bench.report.rules import FORMS_RULES, SHIPPED_RULES


def _ms(seconds: float) -> str:
    return _fmt(float(seconds) * 1e3, 3)


def _form_cell(row: pd.Series, column: str, status: str, fmt) -> str:
    if not _missing(row[column]):
        return fmt(row[column])
    value = row[status]
    return "—" if _missing(value) else str(value)


def _lead_sentence(leads: pd.DataFrame, subject: str) -> str:
    """Whether QnA's speed lead over each family's best survives when every layer may run compiled."""
    texts = []
    for r in leads.itertuples():
        ranges = (f"eager {_x(r.eager_min)}–{_x(r.eager_max)}, best forms "
                  + (f"{_x(r.best_min)}–{_x(r.best_max)}" if not _missing(r.best_min) else "n/a"))
        if not r.led_at:
            verdict = "QnA had no lead to keep"
        elif len(r.kept_at) == len(r.led_at):
            verdict = f"the lead survives compilation at every window it held (k = {_k_list(r.led_at)})"
        elif r.kept_at:
            verdict = f"the lead survives at k = {_k_list(r.kept_at)} of k = {_k_list(r.led_at)}"
        else:
            verdict = f"the lead (k = {_k_list(r.led_at)}) does not survive compilation"
        texts.append(f"over {r.family}, {verdict} ({ranges})")
    if not texts:
        return ""
    return f"{subject}'s speed lead over each peer family's strongest member: " + "; ".join(texts) + "."


def _winners(data: pd.DataFrame, problem: str, mode: str) -> str:
    """Which form of each layer the verdicts used at this problem and mode, with its windows."""
    here = data[(data["problem"] == problem) & (data["mode"] == mode) & (data["kind"] == "layer")]
    texts = []
    for layer in sort_rows(here.drop_duplicates("layer")[["layer", "role"]], ["role", "layer"])["layer"]:
        own = here[here["layer"] == layer]
        by_form = [f"{form_label(form) or 'eager'} at k = {_k_list(rows['window'])}"
                   for form, rows in own.groupby("compile_mode", sort=True)]
        texts.append(f"{layer} {', '.join(by_form)}")
    return "Forms in the verdicts: " + "; ".join(texts) + "."


def _form_text(record: object) -> str:
    """``plan=fused, gemm=conv1x1`` from a row's ``form`` JSON; "" where none is recorded."""
    if _missing(record) or not record:
        return ""
    try:
        form = json.loads(record)
    except ValueError:
        return str(record)
    return ", ".join(f"{axis}={form[axis]}" for axis in sorted(form)) if isinstance(form, dict) else str(form)


def tuning_section(analysis: Analysis) -> str:
    """As shipped against tuned, per problem and mode: each side's latency and form, the speedup. ""
    for a run without shipped rows."""
    table = analysis.shipped
    if not len(table):
        return ""
    parts = ["### As shipped against tuned", SHIPPED_RULES]
    for (problem, mode), group in table.groupby(["problem", "mode"], sort=False):
        rows = [[r["layer"], int(r["window"]), _form_cell(r, "shipped_s", "shipped_status", _ms),
                 _form_text(r["shipped_form"]), _form_cell(r, "tuned_s", "tuned_status", _ms),
                 _form_text(r["tuned_form"]), r["tuned_source"],
                 "—" if _missing(r["speedup"]) else _x(r["speedup"])]
                for r in (pd.Series(record) for record in group.to_dict("records"))]
        parts += [f"#### {mode}, {_problem_label(problem, analysis.problems)}",
                  markdown_table(["layer", "k", "shipped ms", "shipped form", "tuned ms", "tuned form", "source",
                                  "speedup"], rows)]
    return "\n\n".join(parts)


def forms_section(analysis: Analysis) -> str:
    """Eager against compiled, per problem and mode: each form's latency, the speedup, the compile seconds
    and the form that won; and whether QnA's lead survives compilation. "" for a run of eager rows only."""
    forms = analysis.forms
    if not has_compiled(analysis.every_form) or not len(forms):
        return ""
    compiled = [c[: -len("_speedup")] for c in forms.columns if c.endswith("_speedup")]
    parts = ["### Eager against compiled", FORMS_RULES]
    for (problem, mode), group in forms.groupby(["problem", "mode"], sort=False):
        rows = []
        for r in group.to_dict("records"):
            r = pd.Series(r)
            line = [r["layer"], int(r["window"]), _form_cell(r, "eager_s", "eager_status", _ms)]
            for m in compiled:
                line += [_form_cell(r, f"{m}_s", f"{m}_status", _ms), "—" if _missing(r[f"{m}_speedup"]) else _x(r[f"{m}_speedup"]),
                         _fmt(r[f"{m}_compile_s"])]
            line.append(form_label(r["best"]) or "eager")
            rows.append(line)
        headers = ["layer", "k", "eager ms"]
        for m in compiled:
            headers += [f"{m} ms", f"{m} speedup", f"{m} compile s"]
        parts += [f"#### {mode}, {_problem_label(problem, analysis.problems)}",
                  markdown_table([*headers, "best form"], rows), _winners(analysis.frame, problem, mode)]
        leads = analysis.leads
        for subject, own in leads[(leads["problem"] == problem) & (leads["mode"] == mode)].groupby("subject", sort=True):
            sentence = _lead_sentence(own, subject)
            if sentence:
                parts.append(sentence)
    return "\n\n".join(parts)
