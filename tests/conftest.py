"""Shared fixtures: tiny problems and a place for results."""

from __future__ import annotations

import pytest

from qna_bench.problem import Problem


@pytest.fixture
def tiny_problem() -> Problem:
    return Problem(batch=1, height=10, width=9, channels=8, heads=2, window=3)
