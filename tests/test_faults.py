"""Faults during a sweep: each becomes a row, the sweep goes on, finished rows survive kills."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_workers  # tests/ is on sys.path under pytest, and in the workers it spawns
import pandas as pd

from qna_bench import results, runner
from qna_bench.environment import read_environment
from qna_bench.point import SweepPoint, run_points
from qna_bench.problem import Problem
from qna_bench.registry import get_layer
from qna_bench.runner import MeasureSettings
from qna_bench.worker import PointWorker, WorkerLost, WorkerSetup, describe_exit

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY = ["problem=tiny", "plots=false", "plugins=[fault_layers]"]
FAST = [*TINY, "measure.min_run_time_s=0.01", "measure.min_replicates=1"]
ORDER_LOG = "QNA_BENCH_ORDER_LOG"  # fault_layers' order_* layers log each build there


def _command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "run_bench.py"), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)


def test_a_raising_layer_and_an_oversized_point_become_rows_and_the_sweep_completes(tmp_path):
    done = _run("layers=[conv_dw,fault_raises,fault_hog,conv_dense]", "windows=3", "modes=forward",
                "measure.memory_cap_gib=2", *FAST, f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    frame = results.read_results(tmp_path / results.RESULTS_FILE).set_index("layer")
    assert frame.loc["conv_dw", "status"] == "ok" and frame.loc["conv_dense", "status"] == "ok"
    assert frame.loc["fault_raises", "status"] == "error"
    assert frame.loc["fault_raises", "reason"] == "RuntimeError: injected failure inside the layer"
    assert frame.loc["fault_hog", "status"] == "oom"
    assert "can't allocate memory" in frame.loc["fault_hog", "reason"]


def test_a_point_over_its_time_budget_becomes_a_timeout_row(tmp_path):
    # 0.5 s per call: the point cannot finish inside a 0.6 s budget.
    done = _run("layers=fault_sleeps", "windows=5", "modes=forward", "measure.point_budget_s=0.6",
                "measure.min_run_time_s=1", *TINY, f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    row = results.read_results(tmp_path / results.RESULTS_FILE).iloc[0]
    assert row["status"] == "timeout"
    assert "budget" in row["reason"] and row["first_call_s"] >= 0.5
    # One cold call is not a median: the latency statistics stay empty.
    assert all(row[c] is pd.NA for c in ("median_s", "q25_s", "q75_s", "min_s", "mean_s", "n"))


def test_a_larger_budget_measures_the_timeouts_again(tmp_path):
    common = ("layers=fault_sleeps", "windows=[5,7]", "modes=forward", "measure.min_run_time_s=0.01",
              "measure.min_replicates=1", *TINY, f"results_dir={tmp_path}")
    first = _run(*common, "measure.point_budget_s=0.6")
    assert first.returncode == 0, first.stderr[-3000:]
    before = results.read_results(tmp_path / results.RESULTS_FILE).set_index("window")
    assert list(before["status"]) == ["timeout", "skipped"]
    again = _run(*common, "measure.point_budget_s=5")
    assert again.returncode == 0, again.stderr[-3000:]
    after = results.read_results(tmp_path / results.RESULTS_FILE).set_index("window")
    assert list(after["status"]) == ["ok", "ok"] and len(after) == 2


def _wait_for_rows(path: Path, count: int, process: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and len(results.read_results(path)) >= count:
            return
        assert process.poll() is None, "the sweep ended before the kill"
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} rows after {limit_s} s")


SLOW_SWEEP = ("layers=fault_sleeps", "windows=[1,2,3,4]", "modes=forward", "measure.point_budget_s=null")


def test_sigkill_loses_at_most_the_point_in_flight_and_a_rerun_completes(tmp_path):
    path = tmp_path / results.RESULTS_FILE
    process = subprocess.Popen(_command(*SLOW_SWEEP, *FAST, f"results_dir={tmp_path}"), env=_env(), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_rows(path, 2, process)
    finally:
        process.kill()
        process.wait()
    before = results.read_results(path)
    assert len(before) >= 2
    done = _run(*SLOW_SWEEP, *FAST, f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(before)} of 4 points already" in done.stderr
    after = results.read_results(path)
    assert sorted(after["window"]) == [1, 2, 3, 4]
    kept = after.set_index("point_key").loc[before["point_key"]]
    assert (kept["run_id"].to_numpy() == before["run_id"].to_numpy()).all()


def test_sigint_stops_cleanly_with_every_finished_row_written(tmp_path):
    path = tmp_path / results.RESULTS_FILE
    # A shell's background job starts with SIGINT ignored, and Python keeps it so: give the sweep the default.
    process = subprocess.Popen(_command(*SLOW_SWEEP, *FAST, f"results_dir={tmp_path}"), env=_env(), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_rows(path, 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    written = len(results.read_results(path))
    assert 1 <= written < 4
    assert f"interrupted: {written} of 4 points written" in stderr


def test_larger_windows_after_a_timeout_are_skipped_not_run(tmp_path):
    # 0.1 s per call at k=1 fits a 3 s budget easily; 0.9 s per call at k=9 does not.
    done = _run("layers=[fault_sleeps,fault_sleeps_flat]", "windows=[1,9,11,13]", "modes=forward", "measure.point_budget_s=3",
                *FAST, f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    frame = results.read_results(tmp_path / results.RESULTS_FILE)
    flat = frame[frame["layer"] == "fault_sleeps_flat"].set_index("window")
    frame = frame[frame["layer"] == "fault_sleeps"].set_index("window")
    assert frame.loc[1, "status"] == "ok" and frame.loc[9, "status"] == "timeout"
    assert list(frame.loc[[11, 13], "status"]) == ["skipped", "skipped"]
    assert frame.loc[11, "reason"] == "not run: timeout already at window 9 for this layer and problem"
    assert frame.loc[11, "median_s"] is pd.NA and frame.loc[11, "point_seconds"] is pd.NA
    # A layer that does not declare its cost monotone in the window runs every window.
    assert list(flat["status"]) == ["ok", "timeout", "timeout", "timeout"]


def _worker(serve=None) -> PointWorker:
    """A measuring worker of the fault layers and the peers (conv_dw), both imported as it starts; or with
    ``serve`` a stand-in that gets no setup: its process then imports only `fault_workers`, not torch, and
    starts in a fraction of a second."""
    if serve is not None:
        return PointWorker(None, serve)
    settings = MeasureSettings(threads=1, min_run_time_s=0.01, min_replicates=1, point_budget_s=None)
    return PointWorker(WorkerSetup(("fault_layers", "baselines"), settings, read_environment("cpu"), None, False))


def test_a_point_stuck_in_native_code_is_killed_at_the_hard_limit_and_the_next_runs_in_a_fresh_worker(tiny_problem):
    problem = tiny_problem.replace(mode="forward")
    with _worker() as worker:
        start = time.perf_counter()
        assert worker.run("fault_native_hang", problem, "test", timeout_s=2) == WorkerLost(killed=True, exitcode=None)
        assert time.perf_counter() - start < 30
        row = worker.run("conv_dw", problem, "test", timeout_s=120)
    assert row["status"] == "ok" and row["layer"] == "conv_dw"


# A sweep whose worker is killed at its hard limit, as the sweep's process sees it: the worker opened a
# progress bar (as torch.compile does), and the resource tracker reports at the process's end.
_KILL_AT_HARD_LIMIT = """
from qna_bench.environment import read_environment
from qna_bench.point import MeasureSettings
from qna_bench.problem import Problem
from qna_bench.worker import PointWorker, WorkerSetup
settings = MeasureSettings(threads=1, min_run_time_s=0.01, min_replicates=1, point_budget_s=None)
with PointWorker(WorkerSetup(("fault_layers",), settings, read_environment("cpu"), None, False)) as worker:
    print(worker.run("fault_progress_hang", Problem(batch=1, height=10, width=9, channels=8, heads=2), "t", timeout_s=2))
"""


def test_a_worker_killed_at_its_hard_limit_leaves_no_resource_tracker_warning():
    done = subprocess.run([sys.executable, "-c", _KILL_AT_HARD_LIMIT], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WorkerLost(killed=True" in done.stdout
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr[-3000:]


def test_a_worker_that_dies_becomes_an_error_row_and_the_sweep_goes_on(tmp_path):
    done = _run("layers=[fault_exits,conv_dw]", "windows=3", "modes=forward", *FAST, f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    frame = results.read_results(tmp_path / results.RESULTS_FILE).set_index("layer")
    assert frame.loc["fault_exits", "status"] == "error"
    assert "worker process died (exit code 3)" in frame.loc["fault_exits", "reason"]
    assert frame.loc["conv_dw", "status"] == "ok"


def test_a_dead_worker_is_reported_with_its_exit_code_or_its_signal(tiny_problem):
    problem = tiny_problem.replace(mode="forward")
    with _worker() as worker:
        assert worker.run("fault_exits", problem, "test", timeout_s=300) == WorkerLost(killed=False, exitcode=3)
        lost = worker.run("fault_kills_itself", problem, "test", timeout_s=300)
    assert lost == WorkerLost(killed=False, exitcode=-signal.SIGKILL)
    assert lost.describe() == "signal SIGKILL" and describe_exit(3) == "exit code 3"


def test_a_worker_that_dies_is_reaped_before_its_exit_code_is_read(tiny_problem):
    # The pipe closes a moment before the process is reaped; read too early, the exit code is None.
    problem = tiny_problem.replace(mode="forward")
    for serve, exitcode in [(fault_workers.exits_on_first_point, 3)] * 3 + [
            (fault_workers.killed_on_first_point, -signal.SIGKILL)] * 3:
        with _worker(serve) as worker:
            assert worker.run("conv_dw", problem, "test", timeout_s=300) == WorkerLost(killed=False, exitcode=exitcode)


def test_the_layers_of_a_point_run_back_to_back_and_rotate_with_the_rounds(tmp_path):
    log = tmp_path / "order.log"
    done = subprocess.run(
        _command("layers=[order_a,order_b,order_c]", "windows=[3,5]", "modes=forward", "measure.rounds=2",
                 "measure.canary=false", *FAST, f"results_dir={tmp_path}"),
        capture_output=True, text=True, timeout=300, env={**_env(), ORDER_LOG: str(log)}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = log.read_text().splitlines()
    # Each round runs in a fresh worker, whose warm-up builds its first point's layer before it runs (the
    # canary is off: a slow canary under load would measure a point again and log it twice).
    warm_up_1, round_1, warm_up_2, round_2 = lines[0], lines[1:7], lines[7], lines[8:]
    assert warm_up_1 == round_1[0] and warm_up_2 == round_2[0]
    assert round_1 + round_2 == [
        "order_a 3 forward", "order_b 3 forward", "order_c 3 forward",
        "order_a 5 forward", "order_b 5 forward", "order_c 5 forward",
        "order_b 3 forward", "order_c 3 forward", "order_a 3 forward",
        "order_b 5 forward", "order_c 5 forward", "order_a 5 forward",
    ]
    frame = results.read_results(tmp_path / results.RESULTS_FILE)
    assert len(frame) == 6 and (frame["rounds"] == 2).all()
    assert all(len(m) == 2 for m in frame["round_medians_s"])
    # Each round's geometric mean, over that round's blocks only: it lies within them.
    for row in frame.to_dict("records"):
        blocks = len(row["times_s"]) // 2
        rounds_of_blocks = [row["times_s"][:blocks], row["times_s"][blocks:]]
        assert all(min(b) * (1 - 1e-12) <= g <= max(b) * (1 + 1e-12)  # exp(log(t)) rounds
                   for g, b in zip(row["round_geomeans_s"], rounds_of_blocks, strict=True))


def test_three_tiny_sweeps_started_at_once_on_a_machine_reporting_a_huge_cache_all_finish_ok(tmp_path):
    """A VM that reports a 480 MiB L3 once made every worker hold 11 GiB to probe bandwidth, and parallel
    sweeps died of it. Now each sweep probes once, within a share of the memory there is."""
    env = {**_env(), "QNA_BENCH_LLC_BYTES": "480M", "QNA_BENCH_CACHE_DIR": str(tmp_path / "cache")}
    folders = [tmp_path / f"sweep{i}" for i in range(3)]
    processes = [
        subprocess.Popen(_command("layers=[conv_dw]", "windows=3", "modes=forward", "measure.probes=fresh", *FAST,
                                  f"results_dir={folder}"),
                         env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for folder in folders
    ]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], errors
    for folder in folders:
        row = results.read_results(folder / results.RESULTS_FILE).iloc[0]
        assert row["status"] == "ok" and row["llc_bytes_probe"] == 480 * 2**20
        assert row["peak_bytes_per_s_probe"] > 0 and "QNA_BENCH_LLC_BYTES" in row["probe_method"]


RESIDENT_LIMIT = int(1.5 * 2**30)
_RESIDENT_SCRIPT = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit_:
    assert not exit_.code, exit_.code
print("resident", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def test_a_tiny_sweep_and_its_worker_stay_under_one_and_a_half_gib_resident_while_probing(tmp_path):
    """The sweep process probes the machine (fresh) and its worker measures QnA and the depthwise
    convolution: neither holds more than 1.5 GiB at its peak (ru_maxrss; the worker is the sweep's
    largest child)."""
    done = subprocess.run(
        [sys.executable, "-c", _RESIDENT_SCRIPT, str(REPO / "run_bench.py"), "layers=[qna,conv_dw]", "windows=[3,5]",
         "measure.probes=fresh", *FAST, f"results_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env={**_env(), "QNA_BENCH_CACHE_DIR": str(tmp_path / "cache"), "QNA_BENCH_CXXFLAGS": "-O0"},
        cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep_bytes, worker_bytes = map(int, done.stdout.split("resident")[-1].split())
    assert 0 < sweep_bytes < RESIDENT_LIMIT and 0 < worker_bytes < RESIDENT_LIMIT, (sweep_bytes, worker_bytes)
    assert (results.read_results(tmp_path / results.RESULTS_FILE)["status"] == "ok").all()


def test_a_layer_over_its_budget_leaves_its_peers_measured_and_none_pays_for_anothers_preparation(tiny_problem):
    import fault_layers  # noqa: F401 - registers the fault layers in this process

    settings = MeasureSettings(threads=1, min_run_time_s=0.01, min_replicates=3, point_budget_s=1.5, memory=False,
                               flops=False, canary=False)
    env = read_environment("cpu")
    # fault_sleeps sleeps k/10 s a call: at k=9 its three timed calls need 2.7 s, over its 1.5 s.
    problem = tiny_problem.replace(window=9, mode="forward")
    over, peer = run_points([SweepPoint(get_layer(n), problem) for n in ("fault_sleeps", "conv_dw")], settings, env, "t")
    assert over["status"] == "timeout" and "budget" in over["reason"]
    assert peer["status"] == "ok" and peer["rounds"] == 1
    # At k=3 each needs 0.9 s of its 1.5: both fit, though each one's preparation (0.6 s of calls) runs
    # while the other waits to be timed.
    problem = problem.replace(window=3)
    rows = run_points([SweepPoint(get_layer(n), problem) for n in ("fault_sleeps", "fault_sleeps_flat")], settings,
                      env, "t")
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["reason"] for r in rows]


def test_a_layer_stuck_while_its_group_is_prepared_is_named_and_its_peers_measured_again(tiny_problem):
    import fault_layers  # noqa: F401 - registers the fault layers in this process

    problem = tiny_problem.replace(mode="forward")
    with _worker() as worker:
        lost = worker.run_together([("conv_dw", "eager"), ("fault_native_hang", "eager")], problem, "t", timeout_s=5)
    assert lost == WorkerLost(killed=True, exitcode=None, layer_index=1)

    class LosesTheSecondLayer:
        pid, calls = 7, []

        def run_together(self, layers, problem, run_id, limit_s, first_round=True):
            self.calls.append([name for name, *_ in layers])
            if len(self.calls) == 1:
                return WorkerLost(killed=True, exitcode=None, layer_index=1)
            return [{"status": "ok", "layer": name, "point_seconds": 0.1} for name, *_ in layers]

    stand_in = LosesTheSecondLayer()
    points = [SweepPoint(get_layer(name), problem) for name in ("conv_dw", "fault_native_hang", "swin")]
    measured = runner._measure_round(stand_in, points, True, [], read_environment("cpu"),
                                     MeasureSettings(threads=1, canary=False), "t", 95.0, io.StringIO())
    assert stand_in.calls == [["conv_dw", "fault_native_hang", "swin"], ["conv_dw", "swin"]]
    assert [row["status"] for row, _ in measured] == ["ok", "timeout", "ok"]
    assert measured[1][0]["layer"] == "fault_native_hang" and measured[1][1] is None


def test_a_new_workers_warm_up_has_a_hard_limit_of_its_own_not_a_share_of_its_first_layers():
    import fault_layers  # noqa: F401 - registers the fault layers in this process

    # fault_sleeps sleeps 0.9 s a call at k=9: the warm-up's three calls take 2.7 s and the preparation's
    # two (the memory pass, the FLOP count) 1.8 s, each under the 3.6 s limit, together over it.
    problem = Problem(batch=1, height=10, width=10, channels=8, heads=2, window=9, mode="forward")
    with _worker() as worker:
        started = time.perf_counter()
        row = worker.run("fault_sleeps", problem, "t", timeout_s=3.6)
    assert not isinstance(row, WorkerLost), row
    assert row["status"] == "ok", row["reason"]
    assert time.perf_counter() - started > 2.7 + 1.8


_FIRST_POINT_IMPORTS = """
import json, sys
import fault_layers
from qna_bench.environment import read_environment
from qna_bench.point import MeasureSettings, SweepPoint, run_points, warm_up_tools
from qna_bench.problem import Problem
from qna_bench.registry import get_layer

env = read_environment("cpu")
warm_up_tools()
before = set(sys.modules)
settings = MeasureSettings(threads=1, min_run_time_s=0.01, min_replicates=1, point_budget_s=None)
for mode in ("forward", "train"):
    problem = Problem(batch=1, height=10, width=9, channels=8, heads=2, window=1, mode=mode)
    rows = run_points([SweepPoint(get_layer("fault_sleeps"), problem)], settings, env, "t")
    assert rows[0]["status"] == "ok", rows
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_a_worker_imports_what_its_points_use_before_their_clocks_start():
    """The memory profiler's first use imports inductor (over a second): `warm_up_tools` does it as the
    worker starts, so no point's first call or hard limit pays for an import."""
    done = subprocess.run([sys.executable, "-c", _FIRST_POINT_IMPORTS], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
