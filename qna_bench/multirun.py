"""Hydra callback that merges a multirun's per-job parquets into one and draws its figures.

Each job writes ``results.parquet`` in its own output folder; at the end of the sweep, in the
launching process, the union goes to ``<sweep dir>/results.parquet``. The same holds whether the jobs
ran in-process, as local subprocesses or on cluster nodes sharing the filesystem.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qna_bench.results import RESULTS_FILE, merge_results

log = logging.getLogger(__name__)


def job_results(sweep_dir: Path) -> list[Path]:
    """The jobs' parquets below the sweep folder (not the merged one), in a stable order."""
    merged = sweep_dir / RESULTS_FILE
    return sorted(p for p in sweep_dir.rglob(RESULTS_FILE) if p != merged)


def merge_sweep(sweep_dir: Path, plots: bool = True) -> Path | None:
    parts = job_results(sweep_dir)
    if not parts:
        return None
    target = sweep_dir / RESULTS_FILE
    table = merge_results(parts, target)
    log.info("merged %d job results (%d rows) into %s", len(parts), table.num_rows, target)
    if plots:
        from qna_bench.report import write_report

        log.info("report and figures: %s", write_report(target))
    return target


class MergeMultirunResults(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        merge_sweep(Path(config.hydra.sweep.dir), plots=bool(config.get("plots", True)))
