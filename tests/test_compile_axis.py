"""torch.compile as a sweep axis: the config refuses unknown modes, a layer's forms run back to back, a
real compiled sweep records its compile seconds and graph breaks, eager rows keep their keys, and the
analysis and report take each layer at its best form."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from qna_bench import analysis as A
from qna_bench import compare, compile_mode, identity, report, results, runner
from qna_bench.budget import PointTimeout
from qna_bench.environment import read_environment
from qna_bench.point import MeasureSettings, SweepPoint
from qna_bench.problem import Problem
from qna_bench.registry import get_layer
from tests.test_cli import _check_refused, run_cli_in_process
from tests.test_report import power_law_rows, synthetic_row

TINY = Problem(batch=1, height=8, width=8, channels=8, heads=2, window=3)
SETTINGS = MeasureSettings(threads=1, min_run_time_s=0.01, min_replicates=1, flops=False, probes="off",
                           canary=False, fresh_processes=False)


def test_an_unknown_compile_mode_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    code, stderr = run_cli_in_process("compile=[eager,fast]", f"results_dir={out}", cwd=tmp_path)
    _check_refused(code, stderr, "compile='fast': allowed values are eager, default, max-autotune, "
                   "max-autotune-no-cudagraphs, reduce-overhead", out)


def test_a_layers_forms_run_back_to_back_and_all_layers_of_a_point_together():
    layers = [get_layer(name) for name in ("qna", "conv_dw")]
    points = runner.plan_sweep(layers, [3, 5], ["forward"], [Problem()], ["eager", "default"])
    assert [(p.problem.window, p.layer.name, p.compile_mode) for p in points[:4]] == [
        (3, "qna", "eager"), (3, "qna", "default"), (3, "conv_dw", "eager"), (3, "conv_dw", "default"),
    ]
    rotated = [(r, p.problem.window, p.layer.name, p.compile_mode) for r, p in runner.plan_rounds(points, 2)]
    assert rotated[8:12] == [(1, 3, "conv_dw", "eager"), (1, 3, "conv_dw", "default"), (1, 3, "qna", "eager"),
                             (1, 3, "qna", "default")]
    assert points[1].label == "qna[compiled:default] k=3 forward 8x56x56x128"
    assert points[0].label == "qna k=3 forward 8x56x56x128"


@pytest.fixture(scope="module")
def compiled_sweep(tmp_path_factory):
    """conv_dw eager and compiled (default), forward and train, on an 8×8 map: two real compiles."""
    path = tmp_path_factory.mktemp("compiled") / results.RESULTS_FILE
    points = runner.plan_sweep([get_layer("conv_dw")], [3], ["forward", "train"], [TINY], ["eager", "default"])
    stream = io.StringIO()
    outcome = runner.run_sweep(points, path, SETTINGS, read_environment("cpu"), stream=stream)
    return points, path, outcome


def test_a_compiled_sweep_records_each_form_with_its_compile_seconds_and_graph_breaks(compiled_sweep):
    _, path, outcome = compiled_sweep
    assert outcome.statuses == {"ok": 4}
    frame = results.read_results(path)
    assert sorted(zip(frame["mode"], frame["compile_mode"])) == [
        ("forward", "default"), ("forward", "eager"), ("train", "default"), ("train", "eager")]
    eager, compiled = frame[frame["compile_mode"] == "eager"], frame[frame["compile_mode"] == "default"]
    assert eager["compile_s"].isna().all() and (compiled["compile_s"] >= 0).all()
    assert all(json.loads(flags)["graph_breaks"] == 0 for flags in compiled["layer_flags"])
    assert all("graph_breaks" not in json.loads(flags) for flags in eager["layer_flags"])
    assert (frame["median_s"] > 0).all() and frame["peak_bytes"].notna().all()


def test_rerunning_a_compiled_sweep_measures_nothing_and_eager_rows_keep_their_old_keys(compiled_sweep):
    points, path, _ = compiled_sweep
    before = results.read_results(path)
    stream = io.StringIO()
    again = runner.run_sweep(points, path, SETTINGS, read_environment("cpu"), stream=stream)
    assert again.rows_written == 0 and "4 of 4 points already" in stream.getvalue()
    assert results.read_results(path).equals(before)
    for row in before.to_dict("records"):
        without = {k: v for k, v in row.items() if k != "compile_mode"}
        same = identity.point_key(without) == row["point_key"]
        assert same == (row["compile_mode"] == "eager")


def test_cuda_graphs_on_a_cpu_problem_are_an_unsupported_row():
    point = SweepPoint(get_layer("conv_dw"), TINY, "reduce-overhead")
    row = runner.run_point(point, SETTINGS, read_environment("cpu"), "t")
    assert row["status"] == "unsupported" and row["compile_mode"] == "reduce-overhead"
    assert row["reason"] == "compile=reduce-overhead: CUDA graphs need a CUDA device"


class _FailsToCompile(torch.nn.Module):
    """Stands in for a compiled module whose first call fails in the compiler's backend with ``inner``."""

    def __init__(self, inner: Exception):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        raise BackendCompilerFailed(self.forward, self.inner, None) from None


@pytest.mark.parametrize("inner, status, reason", [
    (RuntimeError("no C++ compiler"), "unsupported",
     "torch.compile(mode=default) failed: BackendCompilerFailed: backend='forward' raised (RuntimeError: no C++ "
     "compiler)"),
    (PointTimeout("the first call ran past its budget of 1 s"), "timeout", "the first call ran past its budget"),
    (MemoryError(), "oom", "MemoryError"),
])
def test_a_compiler_failure_is_an_unsupported_row_naming_the_mode_unless_a_budget_or_memory_stopped_it(
        monkeypatch, inner, status, reason):
    monkeypatch.setattr(compile_mode, "compile_module", lambda module, mode: _FailsToCompile(inner))
    row = runner.run_point(SweepPoint(get_layer("conv_dw"), TINY, "default"), SETTINGS, read_environment("cpu"), "t")
    assert row["status"] == status and row["reason"].startswith(reason), row["reason"]


def _frame(rows):
    return pd.DataFrame(rows).astype({"window": "Int64"})


def compiled_rows() -> list[dict]:
    """QnA eager and compiled (compiled 2× faster at every window), Swin eager only, 1.5× QnA's eager time."""
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += [synthetic_row("qna", k, "forward", 0.5e-3 * k, 1000 * k, compile_mode="default", compile_s=3.0)
             for k in (3, 5, 7, 9, 11)]
    rows += power_law_rows("swin", "forward", (1.5e-3, 1.0), (2000, 1.0))
    return rows


def test_the_analysis_takes_each_layer_at_its_fastest_form():
    analysis = A.analyse(_frame(compiled_rows()))
    qna = analysis.frame[analysis.frame["layer"] == "qna"]
    assert set(qna["compile_mode"]) == {"default"} and len(qna) == 5
    assert len(analysis.every_form) == 15
    assert analysis.ratios["latency_ratio"].round(6).tolist() == [3.0] * 5
    assert set(analysis.ratios["compile_mode_qna"]) == {"default"}
    forms = analysis.forms
    assert len(forms) == 5 and set(forms["best"]) == {"default"}
    assert forms["default_speedup"].round(6).tolist() == [2.0] * 5 and set(forms["default_compile_s"]) == {3.0}
    (lead,) = analysis.leads.to_dict("records")
    assert lead["led_at"] == (3, 5, 7, 9, 11) and lead["kept_at"] == lead["led_at"]


def test_a_failed_compiled_form_leaves_the_eager_one_and_is_named_among_the_failures():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += [synthetic_row("qna", k, "forward", status="unsupported", compile_mode="reduce-overhead",
                           reason="compile=reduce-overhead: CUDA graphs need a CUDA device") for k in (3, 5, 7, 9, 11)]
    analysis = A.analyse(_frame(rows))
    assert set(analysis.frame["compile_mode"]) == {"eager"} and (analysis.frame["status"] == "ok").all()
    assert set(analysis.failures["layer"]) == {"qna[compiled:reduce-overhead]"}


def test_the_report_has_an_eager_against_compiled_section_only_with_compiled_rows():
    text = report.render(A.analyse(_frame(compiled_rows())))
    assert "### Eager against compiled" in text
    assert "| qna | 3 | 3.000 | 1.500 | 2.00× | 3.00 | compiled:default |" in text
    assert "the lead survives compilation at every window it held (k = 3–11)" in text
    assert "Forms in the verdicts: qna compiled:default at k = 3–11; swin eager at k = 3–11." in text
    swin_compiled = [synthetic_row("swin", k, "forward", 1.0e-3 * k, 2000 * k, compile_mode="default",
                                   layer_flags={"backend": "fused"}) for k in (3, 5)]
    text = report.render(A.analyse(_frame([*compiled_rows(), *swin_compiled])))
    assert "| swin | P1 | forward | swin ×5 | 2.00× to 3.00× | nowhere | nowhere | holds partly | swin: fused, compiled " \
           "(default) |" in text
    old_file = [row for row in compiled_rows() if row["compile_mode"] is None]  # as files before the column
    plain = report.render(A.analyse(_frame(old_file)))
    assert len(old_file) == 10 and "compiled" not in plain and "Eager against" not in plain
    recorded = [results.make_row(**{**row, "compile_mode": "eager"}) for row in old_file]
    assert [row["point_key"] for row in recorded] == [row["point_key"] for row in old_file]
    assert report.render(A.analyse(_frame(recorded))) == plain


def test_compare_matches_each_form_with_the_same_form_and_old_eager_rows_with_eager_ones():
    rows = compiled_rows()
    old_side = [row for row in rows if row["compile_mode"] is None]
    points = compare.compare_results(_frame(old_side), _frame(rows), compare.Thresholds())
    assert len(points) == 15
    assert sum(p.base is not None and p.new is not None for p in points) == 10
    only_new = [compare.describe_point(p.key) for p in points if p.base is None]
    assert len(only_new) == 5 and all(text.startswith("qna[compiled:default] window=") for text in only_new)
