"""Structured Hydra configs: the schema every composed config is checked against.

The CLI contract: ``layers``, ``windows``, ``modes``, ``compile`` (a value or a list each; the sweep is
their product), ``problem.*`` (the fixed part of the problem), ``variants`` (extra problem overrides swept
as well), ``measure.*``, ``tune`` (how every layer chooses its form), ``as_shipped`` and ``results_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Values are typed Any on purpose: `qna_bench.sweep` validates every one before any work and names
# the field and the allowed values in one line (exit 2), which Hydra's own conversion errors do not.


@dataclass
class ProblemConfig:
    batch: Any = 8
    height: Any = 56
    width: Any = 56
    # When set, overrides height and width (a square map): `problem.size=28,56,112` sweeps map size.
    size: Any = None
    channels: Any = 128
    heads: Any = 4
    stride: Any = 1
    dilation: Any = 1
    dtype: Any = "float32"
    device: Any = "cpu"
    seed: Any = 0


@dataclass
class MeasureConfig:
    # 0: all cores torch sees. Recorded in every row.
    threads: Any = 0
    min_run_time_s: Any = 0.5
    # Slow calls get extra replicates up to this many, so medians and IQRs rest on several samples.
    min_replicates: Any = 5
    # A point whose measurement would take longer stops early with status `timeout`; null: no budget.
    point_budget_s: Any = 120.0
    memory: Any = True
    flops: Any = True
    # CPU only: the process's address-space cap above its size at the start of the sweep, so a point
    # that needs more fails as an `oom` row instead of waking the OOM killer. 0: 80% of available memory.
    memory_cap_gib: Any = 0
    # Once a layer whose cost grows with the window hits `oom` or `timeout` at a window, its larger
    # windows at the same problem are recorded as `skipped` instead of being run.
    skip_larger_after_failure: Any = True
    # Times every point is measured, the layers of a point timed together in an order rotated each round;
    # a row's median_s is the median of its round medians.
    rounds: Any = 1
    # Write a per-op breakdown (torch.profiler, after the timed calls) of every point under profiles/.
    profile: Any = False
    # CUDA: let cuDNN time its convolution algorithms per shape on the first call and keep the fastest
    # (as timm's benchmark script does); the warm-up call absorbs the search. Recorded in every row.
    cudnn_benchmark: Any = True
    # The machine's peak compute and bandwidth per memory level, for the roofline, measured once per machine
    # and settings in the sweep process: `cached` (reuse a probe of the last 24 h from the disk cache,
    # $QNA_BENCH_CACHE_DIR), `fresh` (measure now) or `off` (no probe columns, no roofline).
    probes: Any = "cached"
    # Each round in fresh worker processes (round r of every point in worker r): the spread of a ratio
    # over rounds then covers the noise between processes. false: one worker for the whole sweep.
    fresh_processes: Any = True
    # Time a fixed small matrix product (the canary) before and after each round, recorded per round; a
    # round whose canary ran more than `slow_canary_share` slower than the run's median canary is measured
    # once more, and flagged in its row (`slow_rounds`) if the canary is slow again.
    canary: Any = True
    slow_canary_share: Any = 0.3
    # The measuring worker's CPU heap: `caching` keeps a call's blocks up to 32 MiB in the process for the
    # next call (as CUDA's caching allocator does), `system` leaves glibc's defaults; see `qna_bench.heap`.
    cpu_heap: Any = "caching"


@dataclass
class BenchConfig:
    layers: Any = field(default_factory=lambda: ["qna", "swin_fused", "na_flex", "conv_dw"])
    # Extra modules imported before the sweep; they register their own layers with `register_layer`.
    plugins: Any = field(default_factory=list)
    windows: Any = field(default_factory=lambda: [3, 7, 15])
    modes: Any = field(default_factory=lambda: ["forward", "train"])
    # The forms of every layer: eager and/or torch.compile modes (qna_bench.compile_mode.COMPILE_MODES),
    # each measured as its own row; the verdicts take each layer's fastest form.
    compile: Any = field(default_factory=lambda: ["eager"])
    problem: ProblemConfig = field(default_factory=ProblemConfig)
    variants: Any = field(default_factory=list)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    # How every layer chooses its form per key (QnA its plan and GEMM library, a peer its GEMM library;
    # `python -m qna_bench.registry` lists the candidates): cached (time the candidates on a key's first
    # use unless the disk cache, $QNA_BENCH_CACHE_DIR or ~/.cache/qna_bench, has the winner), always
    # (time them again), off (every layer as built). Each row records its `form` and `form_source`.
    tune: Any = "cached"
    # Also measure every layer that has forms as built (`tuning=shipped` rows), beside its tuned form in
    # the same interleaved rounds: the report then shows what tuning bought each side.
    as_shipped: Any = False
    # Unset: Hydra's output folder for this run or job (see configs/config.yaml).
    results_dir: Any = MISSING
    # Skip points already measured in results_dir's parquet; `resume=false` measures them again.
    resume: Any = True
    # With invalid combinations in the sweep: false refuses the whole sweep, true runs the valid points.
    skip_invalid: Any = False
    plots: Any = True


def register_configs() -> None:
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
