"""Two result sets side by side, point by point, with a regression exit code that holds still when the
whole machine drifts, and says when the machine itself changed (docs/compare.md).

``points``: what is matched and recorded; ``judge``: the verdicts; ``machine``: whether the two runs
ran on the same machine; ``text``: the output; ``cli``: ``python -m qna_bench.compare``.
"""

from qna_bench.compare.cli import main, parse_fraction
from qna_bench.compare.judge import (
    LAYER_Z,
    MIN_NOISE_POINTS,
    POINT_Z,
    BetweenRuns,
    Comparison,
    between_runs_noise,
    compare_results,
    compare_runs,
    layer_changes,
    relative_rounds,
)
from qna_bench.compare.machine import Level, MachineChange, machine_change
from qna_bench.compare.points import (
    BY_COLUMNS,
    EXIT_BAD_ARGUMENTS,
    EXIT_OK,
    EXIT_REGRESSION,
    FORM_COLUMN,
    MATCH_COLUMNS,
    METRICS,
    DuplicatePointError,
    LayerChange,
    MetricComparison,
    Observation,
    PointComparison,
    Thresholds,
    describe_point,
    shape_summary,
)
from qna_bench.compare.text import format_layers, format_machine, format_rule, format_summary, format_table

__all__ = [
    "BY_COLUMNS", "EXIT_BAD_ARGUMENTS", "EXIT_OK", "EXIT_REGRESSION", "FORM_COLUMN", "LAYER_Z", "MATCH_COLUMNS",
    "METRICS", "MIN_NOISE_POINTS", "POINT_Z", "BetweenRuns", "Comparison", "DuplicatePointError", "LayerChange",
    "Level", "MachineChange", "MetricComparison", "Observation", "PointComparison", "Thresholds",
    "between_runs_noise", "compare_results", "compare_runs", "describe_point", "format_layers", "format_machine",
    "format_rule", "format_summary", "format_table", "layer_changes", "machine_change", "main", "parse_fraction",
    "relative_rounds", "shape_summary",
]
