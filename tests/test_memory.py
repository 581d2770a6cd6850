"""The CPU live-storage tracker: exact on known allocations, and in line with the process's RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from qna_bench.measure.memory import CPU_LIVE_STORAGES, LiveStorageTracker, measure_peak_memory, untracked

MIB = 2**20


def test_a_freed_tensor_counts_once_at_its_size():
    def work():
        t = torch.empty(2**20, dtype=torch.float32)
        t.fill_(1.0)
        del t

    stats = measure_peak_memory(work, torch.device("cpu"), base_bytes=0)
    assert stats.method == CPU_LIVE_STORAGES
    assert stats.peak_bytes == 4 * MIB


def test_views_and_inplace_results_are_not_counted_again():
    with LiveStorageTracker() as tracker:
        t = torch.zeros(1024, 1024)
        views = [t.view(-1), t[:10], t.t(), t.reshape(1024, 1024)]
        t.add_(1.0).mul_(2.0)
        assert tracker.live_bytes == 4 * MIB
        del views
    assert tracker.peak_bytes == 4 * MIB


def test_peak_is_the_maximum_not_the_sum():
    with LiveStorageTracker() as tracker:
        for _ in range(3):
            a = torch.ones(256, 1024)  # 1 MiB, freed when rebound
            b = a * 2  # 1 MiB
            del a, b
        assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 2 * MIB


def test_tensors_existing_before_the_region_are_not_counted():
    x = torch.randn(512, 512)
    with LiveStorageTracker() as tracker:
        y = x.view(-1)
        x.add_(1)
        del y
    assert tracker.peak_bytes == 0


def test_storage_kept_alive_by_autograd_stays_counted_until_backward():
    x = torch.randn(1024, 256, requires_grad=True)  # 1 MiB
    with LiveStorageTracker() as tracker:
        loss = (x * 2).exp().sum()  # exp saves its 1 MiB result; x * 2 is freed at once
        held = tracker.live_bytes
        loss.backward()
        del loss
    assert held == MIB + 4  # the saved exp result and the scalar loss
    assert tracker.live_bytes == x.grad.untyped_storage().nbytes()


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from qna_bench.measure.memory import measure_peak_memory
    torch.set_num_threads(1)
    q = torch.randn(8, 4, 1024, 64); k = torch.randn(8, 4, 1024, 64); v = torch.randn(8, 4, 1024, 64)

    def attention():
        scores = q @ k.transpose(-1, -2) / 8.0
        weights = scores.softmax(-1)
        del scores
        return weights @ v

    # Warm the kernels on a small problem so library initialisation is not counted.
    (q[:1, :1, :16] @ k[:1, :1, :16].transpose(-1, -2)).softmax(-1) @ v[:1, :1, :16]
    def status_bytes(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    if sys.argv[1] == "rss":
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets the peak-RSS mark (VmHWM) to the current RSS
        before = status_bytes("VmRSS")
        out = attention()
        print(json.dumps(status_bytes("VmHWM") - before))
    else:
        print(json.dumps(measure_peak_memory(attention, torch.device("cpu"), 0).peak_bytes))
    """
)


def _run(kind: str) -> int:
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, kind], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tracker_agrees_with_max_rss_growth_of_a_fresh_process():
    tracked = _run("tracker")
    rss_growth = _run("rss")
    # two (8, 4, 1024, 1024) float32 tensors (128 MiB each) live together at the peak
    assert tracked == 256 * MIB
    assert abs(tracked - rss_growth) / tracked < 0.05, (tracked, rss_growth)


def test_storages_made_untracked_are_not_counted():
    with LiveStorageTracker() as tracker:
        with untracked():
            kept = torch.empty(2**20)
        t = torch.empty(2**18)
        del t
    assert tracker.peak_bytes == MIB
    assert kept.numel() == 2**20
