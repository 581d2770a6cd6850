"""Shared fixtures: tiny problems, a place for results, and a plan cache of each test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qna_bench.problem import Problem


@pytest.fixture
def tiny_problem() -> Problem:
    return Problem(batch=1, height=10, width=9, channels=8, heads=2, window=3)


@pytest.fixture(autouse=True)
def qna_plan_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """QnA's plan cache in a fresh folder (inherited by subprocesses): no test reads or writes the user's."""
    folder = tmp_path_factory.mktemp("qna_plans")
    monkeypatch.setenv("QNA_BENCH_CACHE_DIR", str(folder))
    yield folder
