"""Every preset under configs/experiment composes and passes the sweep's checks, and the GPU preset
measures what the GPU reference run needs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qna_bench import config, sweep

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def plan_of(experiment: str, *overrides: str) -> sweep.SweepPlan:
    config.register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=[f"+experiment={experiment}", "results_dir=unused", *overrides])
    return sweep.plan_from_config(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_composes_and_passes_the_checks(experiment):
    assert plan_of(experiment, "problem.device=cpu").points


def test_the_gpu_preset_sets_qna_against_each_familys_gpu_best_in_both_dtypes_modes_and_three_rounds():
    plan = plan_of("gpu_sweep", "problem.device=cpu")
    problems = [point.problem for point in plan.points]
    assert {point.layer.name for point in plan.points} == {"qna", "swin_fused", "na_flex", "global_attn", "halo", "conv_dw"}
    assert sorted({p.window for p in problems}) == [3, 7, 15, 31]
    assert {p.dtype for p in problems} == {"float32", "bfloat16"}
    assert {p.mode for p in problems} == {"forward", "train"}
    assert plan.settings.rounds == 3
