"""The real CLI in a subprocess: a tiny sweep end to end, and bad input refused before any work."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from qna_bench import results

REPO = Path(__file__).resolve().parent.parent
FAST = ["problem=tiny", "measure.min_run_time_s=0.01"]


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300, path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(REPO / "run_bench.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def run_cli_in_process(*args: str, cwd: Path) -> tuple[int, str]:
    """``run_bench.py`` as its own ``__main__`` in this process: its exit status and stderr. The same
    code path as `run_cli` without the ~10 s of a fresh interpreter's imports, for checks of bad input."""
    argv, here = sys.argv, Path.cwd()
    sys.argv = [str(REPO / "run_bench.py"), *args]
    stderr = io.StringIO()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stderr(stderr):
            runpy.run_path(str(REPO / "run_bench.py"), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(here)
    return code, stderr.getvalue()


def test_a_tiny_sweep_writes_every_row_and_its_figures(tmp_path):
    done = run_cli("layers=[conv_dw,conv_dense]", "windows=[3,5]", *FAST, f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    frame = results.read_results(tmp_path / results.RESULTS_FILE)
    assert len(frame) == 8
    assert set(frame["status"]) == {"ok"}
    assert set(zip(frame["layer"], frame["window"], frame["mode"])) == {
        (layer, k, mode) for layer in ("conv_dw", "conv_dense") for k in (3, 5) for mode in ("forward", "train")
    }
    assert (frame["median_s"] > 0).all() and (frame["peak_bytes"] > 0).all() and (frame["flops"] > 0).all()
    assert (frame["flops"] == frame["flops_analytic"]).all()
    assert frame["threads"].notna().all() and frame["git_commit"].notna().all()
    assert set(frame["role"]) == {"baseline"}
    for figure in ("latency.png", "memory.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
    assert "[8/8]" in done.stderr and "ETA" in done.stderr


def test_rerunning_a_sweep_measures_nothing_new_and_resume_false_remeasures(tmp_path):
    args = ("layers=conv_dw", "windows=3", "modes=forward", *FAST, f"results_dir={tmp_path}", "plots=false")
    assert run_cli_in_process(*args, cwd=tmp_path)[0] == 0
    first = results.read_results(tmp_path / results.RESULTS_FILE)
    code, stderr = run_cli_in_process(*args, cwd=tmp_path)
    assert code == 0 and "1 of 1 points already" in stderr
    assert results.read_results(tmp_path / results.RESULTS_FILE).equals(first)
    assert run_cli_in_process(*args, "resume=false", cwd=tmp_path)[0] == 0
    remeasured = results.read_results(tmp_path / results.RESULTS_FILE)
    assert len(remeasured) == 1 and remeasured.loc[0, "run_id"] != first.loc[0, "run_id"]


PLUGIN = """
from torch import nn
from qna_bench.registry import register_layer

@register_layer("{name}", role="baseline", family="plugin", implementation="tests: a 1x1 convolution", layout="nchw")
def build(problem):
    return nn.Conv2d(problem.channels, problem.channels, 1)
"""


def test_editing_a_layers_source_remeasures_that_layer_only(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in ("plug_a", "plug_b"):
        (plugins / f"{name}.py").write_text(PLUGIN.format(name=name))
    args = ("layers=[plug_a,plug_b,conv_dw]", "plugins=[plug_a,plug_b]", "windows=3", "modes=forward", *FAST,
            f"results_dir={tmp_path}", "plots=false")
    assert run_cli(*args, path=plugins).returncode == 0
    first = results.read_results(tmp_path / results.RESULTS_FILE).set_index("layer")
    (plugins / "plug_a.py").write_text(PLUGIN.format(name="plug_a") + "# edited\n")
    again = run_cli(*args, path=plugins)
    assert again.returncode == 0 and "2 of 3 points already" in again.stderr, again.stderr[-3000:]
    second = results.read_results(tmp_path / results.RESULTS_FILE).set_index("layer")
    assert len(second) == 3
    assert second.loc["plug_a", "run_id"] != first.loc["plug_a", "run_id"]
    assert second.loc["plug_a", "code_version"] != first.loc["plug_a", "code_version"]
    assert (second.loc[["plug_b", "conv_dw"], "run_id"] == first.loc[["plug_b", "conv_dw"], "run_id"]).all()


BAD_INPUTS = [
    (["layers=nope"], "layers='nope': unknown layer; known layers are"),
    (["layers=[conv_dw,42]"], "layers=42: unknown layer"),
    (["layers=[]"], "layers=[]: the list is empty"),
    (["windows=[3,x]"], "windows='x': must be a positive integer"),
    (["windows=0"], "windows=0: must be a positive integer"),
    (["layers=conv_dw", "windows=4"], "window=4: layer conv_dw needs an odd window"),
    (["modes=backward"], "modes='backward': allowed values are forward, train"),
    (["problem.batch=0"], "problem.batch=0: must be a positive integer"),
    (["problem.height=-3"], "problem.height=-3: must be a positive integer"),
    (["problem.channels=abc"], "problem.channels='abc': must be a positive integer"),
    (["problem.heads=5"], "problem.heads=5: must divide problem.channels=128"),
    (["problem.dtype=float8"], "problem.dtype='float8': allowed values are float32, float64, float16, bfloat16"),
    (["problem.device=tpu"], "problem.device='tpu': allowed values are cpu, cuda"),
    (["problem.size=big"], "problem.size='big': must be a positive integer"),
    (["measure.point_budget_s=-1"], "measure.point_budget_s=-1: must be a positive number or null"),
    (["measure.threads=1.5"], "measure.threads=1.5: must be 0 (all idle cores) or a positive integer"),
    (["measure.rounds=0"], "measure.rounds=0: must be a positive number"),
    (["measure.rounds=1.5"], "measure.rounds=1.5: must be a positive integer"),
    (["resume=maybe"], "resume='maybe': allowed values are true, false"),
    (["tune=sometimes"], "tune='sometimes': allowed values are cached, always, off"),
    (["results_dir=/proc/forbidden/place"], "results_dir=/proc/forbidden/place: cannot create it"),
]
if not __import__("torch").cuda.is_available():
    BAD_INPUTS.append((["problem.device=cuda"], "problem.device='cuda': no CUDA device is available"))


def _check_refused(code: int, stderr: str, message: str, out: Path) -> None:
    assert code == 2, (code, stderr[-2000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "[1/" not in stderr
    assert not (out / results.RESULTS_FILE).exists()


def _results_dir(overrides: list[str], out: Path) -> list[str]:
    return [] if any(o.startswith("results_dir=") for o in overrides) else [f"results_dir={out}"]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_before_any_work(tmp_path, overrides, message):
    out = tmp_path / "out"
    code, stderr = run_cli_in_process(*overrides, *_results_dir(overrides, out), cwd=tmp_path)
    _check_refused(code, stderr, message, out)


def test_bad_input_in_a_real_process_exits_2_with_one_line(tmp_path):
    overrides, message = BAD_INPUTS[0]
    out = tmp_path / "out"
    done = run_cli(*overrides, *_results_dir(overrides, out), cwd=tmp_path)
    _check_refused(done.returncode, done.stderr, message, out)


def test_every_invalid_combination_is_reported_at_once_and_skip_invalid_runs_the_rest(tmp_path):
    args = ("layers=[conv_dw,conv_dense]", "windows=[2,3,4]", "modes=forward", *FAST, f"results_dir={tmp_path}", "plots=false")
    code, stderr = run_cli_in_process(*args, cwd=tmp_path)
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert sum("needs an odd window" in e for e in errors) == 4  # k=2 and k=4 for both layers
    assert not (tmp_path / results.RESULTS_FILE).exists()
    code, stderr = run_cli_in_process(*args, "skip_invalid=true", cwd=tmp_path)
    assert code == 0, stderr
    frame = results.read_results(tmp_path / results.RESULTS_FILE)
    assert sorted(frame["window"]) == [3, 3]


def test_a_foreign_parquet_at_the_results_path_is_refused_and_kept(tmp_path):
    target = tmp_path / results.RESULTS_FILE
    target.write_bytes(b"PAR1 definitely not ours")
    code, stderr = run_cli_in_process("layers=conv_dw", "windows=3", *FAST, f"results_dir={tmp_path}", cwd=tmp_path)
    assert code == 2
    assert "refusing to touch it" in stderr
    assert target.read_bytes() == b"PAR1 definitely not ours"


def test_unknown_config_keys_are_bad_input_too(tmp_path):
    assert run_cli_in_process("problem.colour=blue", f"results_dir={tmp_path}", cwd=tmp_path)[0] == 2
