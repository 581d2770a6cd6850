"""The claims report: does QnA need up to 10× less memory, run up to 5× faster and scale better with
window than existing methods? Verdicts against the strongest attention peer at each point, per problem
shape, then per peer family, with the rule of each verdict; all numbers come from `qna_bench.analysis`.
The same parquet always gives the same bytes.

    python -m qna_bench.report RESULTS.parquet [--out DIR]

One part a module: rules (the stated rules), cells (text pieces), setup (the header), verdicts, forms,
tables, models, appendix (roofline, figures) and document (the whole report, the CLI).
"""

from __future__ import annotations

from qna_bench.analysis import MEMORY, SCALING, SPEED, analyse
from qna_bench.report.appendix import FAR_BELOW_LISTED, figures_section, roofline_section
from qna_bench.report.cells import markdown_table, timing_warnings
from qna_bench.report.document import main, newest_results, render, write_report
from qna_bench.report.forms import forms_section, tuning_section
from qna_bench.report.models import models_section
from qna_bench.report.rules import FORMS_RULES, MODELS_RULES, REPORT_FILE, RULES, SHIPPED_RULES
from qna_bench.report.setup import form_rows, header_section, noise_text, plan_rows
from qna_bench.report.tables import failures_section, growth_section, measurements_section, ratio_section
from qna_bench.report.verdicts import verdict_section

__all__ = ["MEMORY", "SCALING", "SPEED", "FAR_BELOW_LISTED", "FORMS_RULES", "MODELS_RULES", "REPORT_FILE", "RULES", "SHIPPED_RULES", "analyse", "failures_section", "figures_section", "form_rows", "forms_section", "growth_section", "header_section", "main", "markdown_table", "measurements_section", "models_section", "newest_results", "noise_text", "plan_rows", "ratio_section", "render", "roofline_section", "timing_warnings", "tuning_section", "verdict_section", "write_report"]
