"""Two result sets side by side, point by point (e.g. two library versions or two commits), with a
regression exit code that holds still when the whole machine drifts.

    python -m qna_bench.compare BASE NEW [--fail-over 5%] [--min-rel 5%] [--min-abs-ms 0.01]
                                [--memory-rel 1%] [--anchor peers|none] [--metric median_s|peak_bytes ...]
                                [--by COLUMN ...]

BASE and NEW are results parquets (or run folders holding a ``results.parquet``). Points match on the
layer and the whole problem (`MATCH_COLUMNS`), never on the environment, which is what is being
compared; ``--by device_name`` (or another environment column) adds a column to the match when a file
holds the same problem several times. A file with several rows for one point is refused, naming it.

Latency is judged against its peers (``--anchor peers``, the default): in each round, a point's time is
divided by the geometric mean of the other layers' times at the same problem, window and mode, measured
seconds apart in the same round (each round's geometric mean over its blocks, `qna_bench.rounds.round_times`;
a row without rounds counts as one round of its median). A machine that runs everything 1.3× slower
leaves these relative times as they were; one layer that got 1.3× slower moves its own. The change is
the ratio of the geometric means over the rounds of the relative times, new over base, and its spread
runs from the smallest new over the largest base to the largest new over the smallest base. A change is *significant* when all three hold: it exceeds ``--min-rel``
(default 5%), the raw medians differ by more than ``--min-abs-ms`` (default 0.01 ms), and the spread
excludes 1 (so with several rounds the noise between rounds holds it back), and it lies beyond the
noise *between the runs*: each run is a fresh process, and a point's time relative to its peers moves
on its own from run to run in a way its rounds cannot see. That noise is estimated from the comparison
itself (`between_runs_noise`: the robust σ of the points' log changes once each layer's mean change is
taken out, from 8 points on); one point counts beyond 4σ, or 4× its own noise over its rounds, or 4×
its layer's noise floor between processes as either run's rows record it (`qna_bench.noise`), whichever
is largest, and each layer is also judged over all its points: the geometric mean of their changes
counts beyond 3σ/√n. A layer that got slower everywhere fails the gate at a change no single point resolves.
Points without a peer on both sides, and ``--anchor none``, use the raw medians instead, with the within-run IQR bands q25..q75
(which must not overlap) in place of the spread. The raw medians and their ratio are printed either way.
Peak memory (``peak_bytes``) is deterministic, so any change beyond ``--memory-rel`` of the base
(default 1%) is reported.

The machine: both runs' rows record its fingerprint (CPU model and instruction set, threads, cache
sizes), the canary timed around every round and the compute and bandwidth probes. Where these differ
beyond their own noise, the output says so on top (`qna_bench.compare.machine`), and neither a layer
whose share of the compute roof explains its move nor a point that became ``timeout`` on the slower
machine counts as a regression; the exit status is then 0 with a warning line on stderr, unless
something else regressed.

Exit status: 1 when a point regressed — significantly slower by more than ``--fail-over``, memory grown
by more than ``--fail-over`` (and ``--memory-rel``), or ``ok`` in BASE and not ``ok`` in NEW — or a
layer did over its points;
2 on bad arguments (one line on stderr); 0 otherwise. Points present on one side only are listed but
do not fail the comparison.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from qna_bench import results
from qna_bench.compare.judge import compare_runs
from qna_bench.compare.points import (
    ANCHORS,
    BY_COLUMNS,
    EXIT_BAD_ARGUMENTS,
    EXIT_OK,
    EXIT_REGRESSION,
    METRICS,
    Thresholds,
)
from qna_bench.compare.text import (
    describe_side,
    format_excused,
    format_layers,
    format_machine,
    format_rule,
    format_summary,
    format_table,
    format_warning,
)


class BadArguments(Exception):
    """What was wrong with the command line, in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadArguments(message)


def parse_fraction(text: str) -> float:
    """``5%`` or ``0.05`` → 0.05. A bare number of 1 or more is refused as ambiguous (5 % or 500 %?)."""
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a percentage (5%) or a fraction (0.05)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite amount >= 0, e.g. 5% or 0.05")
    if not percent and value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: ambiguous; write a percentage ({text}%) or a fraction below 1")
    return value / 100 if percent else value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of milliseconds, e.g. 0.01") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of milliseconds >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    defaults = Thresholds()
    parser = _Parser(prog="python -m qna_bench.compare", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="BASE results parquet (or a run folder holding results.parquet)")
    parser.add_argument("new", type=Path, help="NEW results parquet (or a run folder holding results.parquet)")
    parser.add_argument("--fail-over", type=parse_fraction, default=defaults.fail_over, metavar="FRACTION",
                        help="exit 1 when a point is significantly slower (or uses more memory) by more than this "
                             "(5%% or 0.05; default %(default)s)")
    parser.add_argument("--min-rel", type=parse_fraction, default=defaults.min_rel, metavar="FRACTION",
                        help="a latency change smaller than this fraction of the base median is noise (default %(default)s)")
    parser.add_argument("--min-abs-ms", type=_milliseconds, default=defaults.min_abs_s * 1e3, metavar="MS",
                        help="a latency change smaller than this many ms is noise (default %(default)s)")
    parser.add_argument("--memory-rel", type=parse_fraction, default=defaults.memory_rel, metavar="FRACTION",
                        help="a peak-memory change smaller than this fraction is not reported (default %(default)s)")
    parser.add_argument("--anchor", choices=ANCHORS, default="peers",
                        help="judge latency relative to the other layers at the same point, measured in the same "
                             "rounds (peers: machine drift cancels), or on the raw medians (none); default %(default)s")
    parser.add_argument("--metric", action="append", choices=METRICS, default=None,
                        help="compare only this metric (repeatable; default: both)")
    parser.add_argument("--by", action="append", choices=BY_COLUMNS, default=None, metavar="COLUMN",
                        help="also match on this environment column, when a file holds a problem several times "
                             f"({', '.join(BY_COLUMNS)})")
    return parser


def _read(path: Path, side: str) -> pd.DataFrame:
    if path.is_dir() and (path / results.RESULTS_FILE).is_file():
        path = path / results.RESULTS_FILE
    if not path.exists():
        raise BadArguments(f"{side} {path}: no such file")
    if path.is_dir():
        raise BadArguments(f"{side} {path}: a folder without a {results.RESULTS_FILE}")
    try:
        return results.read_results(path)
    except results.ResultsFileError as exc:
        raise BadArguments(f"{side} {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison; return 0, 1 (a regression) or 2 (bad arguments)."""
    try:
        args = _parser().parse_args(argv)
        thresholds = Thresholds(args.min_rel, args.min_abs_ms / 1e3, args.fail_over, args.memory_rel)
        metrics = tuple(dict.fromkeys(args.metric or METRICS))
        by = tuple(dict.fromkeys(args.by or ()))
        base, new = _read(args.base, "BASE"), _read(args.new, "NEW")
        comparison = compare_runs(base, new, thresholds, by=by, metrics=metrics, anchor=args.anchor)
    except (BadArguments, ValueError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    print(describe_side("BASE", args.base, base))
    print(describe_side("NEW ", args.new, new))
    print(format_machine(comparison.machine))
    for line in format_excused(comparison):
        print(line)
    print(format_rule(thresholds, args.anchor))
    for name, floor in zip(("BASE", "NEW "), comparison.floors):
        print(f"noise floor {name}: {floor.summary()}")
    print()
    if comparison.points:
        print(format_table(comparison.points, metrics, by))
        print()
    if "median_s" in metrics and args.anchor == "peers":
        print(format_layers(comparison.layers, comparison.noise))
        print()
    print(format_summary(comparison.points, thresholds, metrics, comparison.layers))
    warning = format_warning(comparison)
    if warning:
        print(warning, file=sys.stderr)
    return EXIT_REGRESSION if comparison.regressed else EXIT_OK
