"""The whole report: its sections in order, written next to the parquet (with the figures), and the CLI.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from qna_bench import plots
from qna_bench.analysis import (
    MEMORY,
    SPEED,
    Analysis,
    analyse,
)
from qna_bench.report.appendix import figures_section, roofline_section
from qna_bench.report.models import models_section
from qna_bench.report.rules import REPORT_FILE
from qna_bench.report.setup import header_section
from qna_bench.report.tables import failures_section, growth_section, measurements_section, ratio_section
from qna_bench.report.verdicts import verdict_section
from qna_bench.results import read_results


def render(analysis: Analysis, figures: Sequence[Path | str] = ()) -> str:
    """The whole report as markdown (deterministic: sorted rows, fixed precision, no dates)."""
    if not analysis.rows_in_file:
        return "# QnA claims report\n\nThe results file has no rows.\n"
    layers = (analysis.frame["kind"] == "layer").any()
    sections = [
        "# QnA claims report",
        "QnA (arXiv 2112.11435) “scales especially well with window size, requiring up-to x10 less memory while "
        "being up-to x5 faster than existing methods”. This report checks each part against the peers measured "
        "in this results file.",
        header_section(analysis),
        *([verdict_section(analysis), ratio_section(analysis, MEMORY), ratio_section(analysis, SPEED),
           growth_section(analysis)] if layers else []),
        models_section(analysis),
        failures_section(analysis),
        *([measurements_section(analysis)] if layers else []),
        roofline_section(analysis),
        figures_section(figures),
    ]
    return "\n\n".join(s for s in sections if s).rstrip() + "\n"


def write_report(results_path: str | Path, out_dir: str | Path | None = None, draw: bool = True) -> Path:
    """Write report.md (and, with ``draw``, the figures) next to the parquet or into ``out_dir``."""
    results_path = Path(results_path)
    out_dir = Path(out_dir) if out_dir is not None else results_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(read_results(results_path))
    figures = plots.draw_figures(results_path, out_dir, analysis=analysis) if draw else []
    text = render(analysis, figures)
    path = out_dir / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    return path


def newest_results(root: str | Path) -> Path | None:
    """The most recently written ``results/**/results.parquet`` under ``root``, or None."""
    found = sorted(Path(root).glob("results/**/results.parquet"), key=lambda p: (p.stat().st_mtime, str(p)))
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the claims report (report.md) and its figures from a results parquet.")
    parser.add_argument("results", type=Path, help="a results parquet written by run_bench.py")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.md and the figures (default: next to the parquet)")
    parser.add_argument("--no-figures", action="store_true", help="write report.md only")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results={args.results}: no such file (give a results.parquet written by run_bench.py)")
    print(write_report(args.results, args.out, draw=not args.no_figures))
