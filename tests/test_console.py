"""A sweep's console holds its progress, its table and the paths it wrote: no library warnings or log lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qna_bench.problem import Problem
from qna_bench.registry import get_layer

REPO = Path(__file__).resolve().parent.parent
# Python warnings, torch's glog-style lines (W1130 12:00:00...), log records, tracebacks.
NOISE = re.compile(r"warn|deprecat|^[WIE]\d{4} |\[(INFO|WARNING|DEBUG)\]|traceback", re.IGNORECASE)
# The sweep's own notice that other work shares the cores (it goes with load_avg in each row): about
# the machine, not the code, and expected on a loaded test machine.
BUSY_MACHINE = "warning: system load"


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line) and not line.startswith(BUSY_MACHINE)]


def test_the_noise_pattern_catches_what_libraries_print():
    assert noise("W1130 15:06:39.608000 6985 torch/utils/cpp_extension.py:183] No CUDA runtime is found")
    assert noise("[2026-11-30 15:39:47,390][matplotlib.font_manager][INFO] - generated new fontManager")
    assert noise("/x/flex_attention.py:2596: UserWarning: flex_attention called without torch.compile()")
    assert not noise("warning: system load 5.5 on 2 cores: other work competes for the cores being timed")
    assert not noise("[3/8] na_flex k=3 forward 1x16x12x16: 61.59 ms, memory n/a | elapsed 0:44, ETA 1:13")


@pytest.mark.slow
def test_a_sweep_of_the_default_layers_and_natten_prints_no_warning_lines(tmp_path):
    # A fresh matplotlib cache makes matplotlib build its font list (its "generated new fontManager").
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    done = subprocess.run(
        [sys.executable, str(REPO / "run_bench.py"), "layers=[qna,swin_fused,na_flex,na,conv_dw]", "windows=[3]",
         "problem=tiny", "measure.min_run_time_s=0.01", "measure.min_replicates=1", f"results_dir={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert noise(done.stdout) == [] and noise(done.stderr) == []
    assert "[10/10]" in done.stderr and "report.md" in done.stderr


@pytest.mark.parametrize("name", ["na_flex", "na"])
def test_flex_layers_refuse_a_dispatch_mode_pass_before_flex_runs(name, monkeypatch):
    """Under a TorchDispatchMode torch.compile would run flex attention eagerly (the dense path) and fail:
    the memory and FLOP passes get the refusal instead, and flex is never called in them."""
    problem = Problem(batch=1, height=9, width=11, channels=16, heads=2, window=3)
    module = get_layer(name).build(problem)
    calls = []
    inner = module if name == "na_flex" else module.attn
    monkeypatch.setattr(inner, "flex" if name == "na_flex" else "forward", lambda *args: calls.append(args))
    with pytest.raises(NotImplementedError, match="HigherOrderOperator"), FlopCounterMode(display=False):
        with torch.inference_mode():
            module(problem.make_input("nhwc"))
    assert calls == []
