"""Shared fixtures: tiny problems, a private disk cache, and the committed reference runs."""

from __future__ import annotations

import gc
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qna_bench.disk_cache import CACHE_DIR_ENV
from qna_bench.problem import Problem
from qna_bench.qna import code_version
from qna_bench.qna.fused_cpu import KERNELS_SUBDIR


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every module the tests import is loaded: freeze its objects, so that each of the many
    `gc.collect()` calls of a point (its memory pass, its release) does not scan them again (0.2 s each
    with every layer's library loaded). Objects made later are collected as before."""
    gc.freeze()


REPO = Path(__file__).resolve().parent.parent


def committed_results(name: str) -> list[Path]:
    """The files called ``name`` under results/ that git tracks: the committed reference runs, never a
    user's own runs (results/runs/ and results/multirun/ are ignored)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--", "results"], capture_output=True,
                            text=True, check=True).stdout
    return sorted(REPO / path for path in listed.split("\0") if path and Path(path).name == name)


@pytest.fixture(autouse=True, scope="session")
def private_disk_cache(tmp_path_factory):
    """Every test (and the sweeps it starts) reads and writes a disk cache of its own session, never the
    user's ~/.cache/qna_bench: the probes and QnA's plans are measured once per session and shared."""
    folder = tmp_path_factory.mktemp("qna_bench_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(folder))
        # Inductor's cache keys do not cover a custom op's schema: one compiled before QnA's ops changed
        # calls them with the old arguments. A cache per version of the qna package's code never does.
        inductor = Path(tempfile.gettempdir()) / f"torchinductor_qna_bench_{code_version()}"
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor))
        yield folder


@pytest.fixture
def tiny_problem() -> Problem:
    return Problem(batch=1, height=10, width=9, channels=8, heads=2, window=3)


@pytest.fixture
def qna_plan_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                   private_disk_cache: Path) -> Iterator[Path]:
    """A disk cache of this test's own, for the tests of QnA's plan cache (inherited by subprocesses). Its
    compiled kernels are the session's: a subprocess loads the fused loops, it does not compile them again."""
    folder = tmp_path_factory.mktemp("qna_plans")
    kernels = private_disk_cache / KERNELS_SUBDIR
    kernels.mkdir(exist_ok=True)
    (folder / KERNELS_SUBDIR).symlink_to(kernels, target_is_directory=True)
    monkeypatch.setenv("QNA_BENCH_CACHE_DIR", str(folder))
    yield folder
