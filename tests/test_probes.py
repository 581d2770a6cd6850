"""The machine probes are timed calls whose work is known: twice the work takes about twice the time."""

from __future__ import annotations

import pytest
import torch

from qna_bench.measure import probes
from qna_bench.results import COLUMNS

CPU = torch.device("cpu")
# Rates at one size and at four times it (two doublings) agree within this factor; a probe whose time
# did not follow the work would be off by 4×. Loose on purpose: other processes load the cores.
RATE_TOLERANCE = 2.0


def _rates(probe, small, large, rounds: int = 3) -> tuple[float, float, int, int]:
    """Best rate of each size over interleaved rounds (load spikes hit both sizes alike)."""
    best_small = best_large = 0.0
    for _ in range(rounds):
        a, b = probe(small), probe(large)
        best_small, best_large = max(best_small, a.rate), max(best_large, b.rate)
    return best_small, best_large, a.work, b.work


@pytest.mark.parametrize(
    "name,probe,small,large",
    [
        ("gemm", lambda s: probes.gemm_probe(CPU, torch.float32, s, repeats=2), 1, 4),
        ("depthwise", lambda s: probes.depthwise_probe(CPU, torch.float32, s, repeats=2), 1, 4),
        ("dense conv", lambda s: probes.dense_conv_probe(CPU, torch.float32, s, repeats=2), 1, 4),
        ("copy", lambda s: probes.copy_probe(CPU, torch.float32, s, repeats=2), 64 * 2**20, 256 * 2**20),
        ("triad", lambda s: probes.triad_probe(CPU, torch.float32, s, repeats=2), 64 * 2**20, 256 * 2**20),
    ],
)
def test_a_probe_doubled_twice_does_four_times_the_work_in_about_four_times_the_time(name, probe, small, large):
    rate_small, rate_large, work_small, work_large = _rates(probe, small, large)
    assert work_large == 4 * work_small
    assert 1 / RATE_TOLERANCE < rate_large / rate_small < RATE_TOLERANCE, (name, rate_small, rate_large)


def test_measure_machine_reports_positive_peaks_and_what_measured_them():
    measured = probes.measure_machine("cpu", "float32", threads=1, target_s=0.005)
    assert measured.peak_flops > 1e8 and measured.peak_bytes_per_s > 1e8
    assert "gemm" in measured.method and "dense conv" in measured.method and "copy" in measured.method and "1 threads" in measured.method
    assert set(measured.columns()) <= set(COLUMNS)


def test_grown_doubles_the_scale_until_a_call_takes_the_target():
    scales = []

    def probe(scale: int) -> probes.Timed:
        scales.append(scale)
        return probes.Timed(work=scale, seconds=0.01 * scale, size=str(scale))

    assert probes.grown(probe, target_s=0.05).seconds == 0.08
    assert scales == [1, 2, 4, 8]


def test_bandwidth_buffers_are_far_larger_than_the_last_level_cache():
    assert probes.stream_bytes(CPU) >= probes.CACHE_MULTIPLE * probes.last_level_cache_bytes()
    assert probes.stream_bytes(CPU) >= probes.MIN_STREAM_BYTES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_probes_run_on_the_gpu():
    measured = probes.measure_machine("cuda", "float32", threads=0, target_s=0.005)
    assert measured.peak_flops > 1e11 and measured.peak_bytes_per_s > 1e10
