"""The machine probes: timed calls whose work is known, working sets sized per memory level and bounded
by the memory there is, measured once per machine and settings (a disk cache), and harmless when they fail."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qna_bench.disk_cache import JsonStore
from qna_bench.measure import probes
from qna_bench.results import COLUMNS

CPU = torch.device("cpu")
MIB = 2**20


@pytest.mark.parametrize(
    "name,probe,small,large",
    [
        ("gemm", lambda s: probes.gemm_probe(CPU, torch.float32, s, repeats=2), 1, 4),
        ("depthwise", lambda s: probes.depthwise_probe(CPU, torch.float32, s, repeats=2), 1, 4),
        ("dense conv", lambda s: probes.dense_conv_probe(CPU, torch.float32, s, repeats=2), 1, 4),
        ("copy", lambda s: probes.copy_probe(CPU, torch.float32, s, repeats=2), 2 * MIB, 8 * MIB),
        ("triad", lambda s: probes.triad_probe(CPU, torch.float32, s, repeats=2), 3 * MIB, 12 * MIB),
    ],
)
def test_a_probe_doubled_twice_does_four_times_the_work(name, probe, small, large):
    """The work a probe counts follows its size (its rate is work over its own timing, which a test on a
    shared machine does not judge: timed assertions fail under load and on other caches)."""
    small_run, large_run = probe(small), probe(large)
    assert large_run.work == 4 * small_run.work, name
    assert small_run.rate > 0 and large_run.rate > 0


def test_a_bandwidth_probe_moves_its_whole_working_set():
    assert probes.copy_probe(CPU, torch.float32, 8 * MIB).work == 8 * MIB  # read 4 MiB, write 4 MiB
    assert probes.triad_probe(CPU, torch.float32, 3 * MIB).work == 3 * MIB


def test_measure_machine_reports_every_level_and_what_measured_them(monkeypatch):
    monkeypatch.delenv(probes.LLC_OVERRIDE_ENV, raising=False)  # the caches as the sysfs reports them
    measured = probes.measure_machine("cpu", "float32", threads=1, target_s=0.005)
    assert measured.peak_flops > 1e8 and measured.peak_bytes_per_s > 1e8
    for part in ("gemm", "dense conv", "DRAM ", "1 threads", "(sysfs)"):
        assert part in measured.method, part
    if measured.l2_bytes:
        assert measured.peak_bytes_per_s_l2 > 1e8
    assert set(measured.columns()) <= set(COLUMNS)


def test_sizes_parse_with_and_without_units():
    assert probes.parse_size("480M") == probes.parse_size("480MiB") == 480 * MIB
    assert probes.parse_size("32K\n") == 32 * 2**10 and probes.parse_size("1048576") == MIB
    with pytest.raises(ValueError):
        probes.parse_size("lots")


def test_the_llc_override_sets_the_cache_the_working_sets_are_sized_from():
    caches = probes.cache_sizes("cpu", threads=2, environ={probes.LLC_OVERRIDE_ENV: "480M"})
    assert caches.llc_bytes == 480 * MIB and probes.LLC_OVERRIDE_ENV in caches.source


@pytest.mark.parametrize("llc_mib", [0, 1, 32, 480, 4096])
def test_working_sets_fit_their_level_and_never_exceed_the_memory_budget(llc_mib):
    caches = probes.CacheSizes(l2_bytes=2 * MIB, llc_bytes=llc_mib * MIB, source="test")
    budget = 512 * MIB
    sets = probes.working_sets(caches, budget)
    assert sets.l2 == MIB  # half the L2
    assert sets.llc == (min(llc_mib * MIB // 2, budget) if llc_mib * MIB >= 4 * caches.l2_bytes else 0)
    assert sets.dram <= budget and max(sets.l2, sets.llc, sets.dram) <= budget
    assert sets.dram >= min(budget, probes.DRAM_MIN_BYTES)
    assert bool(sets.note) == (probes.DRAM_CACHE_MULTIPLE * llc_mib * MIB > budget)


def test_the_dram_probe_holds_a_small_share_of_available_memory_at_most():
    budget = probes.memory_budget_bytes(CPU)
    assert budget <= probes.DRAM_MAX_BYTES
    assert probes.memory_budget_bytes(CPU, cap_bytes=64 * MIB) == 8 * MIB


class _Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_measure(monkeypatch):
    """`measure_machine` replaced by a counter that returns made-up probes."""
    calls = []

    def measure(device, dtype, threads, **kwargs):
        calls.append((device, dtype, threads))
        return probes.MachineProbes(1e11, 1e10, 5e10, 3e10, 2 * MIB, 32 * MIB, f"fake {len(calls)}")

    monkeypatch.setattr(probes, "measure_machine", measure)
    return calls


def test_probes_are_measured_once_per_machine_and_settings_then_read_from_the_cache(tmp_path, fake_measure):
    store, clock = JsonStore("probes", tmp_path), _Clock()
    first = probes.machine_probes("cpu", "float32", 2, store=store, now=clock)
    again = probes.machine_probes("cpu", "float32", 2, store=store, now=clock)
    assert len(fake_measure) == 1 and again.peak_flops == first.peak_flops
    assert first.method == "fake 1" and again.method.startswith("fake 1; cached, measured ")
    probes.machine_probes("cpu", "float32", 1, store=store, now=clock)  # other settings: measured
    assert len(fake_measure) == 2
    clock.now += probes.MAX_AGE_S + 1  # too old: measured again
    probes.machine_probes("cpu", "float32", 2, store=store, now=clock)
    assert len(fake_measure) == 3
    probes.machine_probes("cpu", "float32", 2, "fresh", store=store, now=clock)
    assert len(fake_measure) == 4
    assert probes.machine_probes("cpu", "float32", 2, "off", store=store) == probes.MachineProbes.none()
    assert len(fake_measure) == 4


def test_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(tmp_path, fake_measure):
    store = JsonStore("probes", tmp_path)
    store.path.write_text("{ not json")
    probes.machine_probes("cpu", "float32", 2, store=store)
    key = probes.probe_key("cpu", "float32", 2)
    assert json.loads(store.path.read_text())[key]["probes"]["method"] == "fake 1"
    store.put(key, {"probes": {"unknown_field": 1}, "measured_at_s": 0})
    probes.machine_probes("cpu", "float32", 2, store=store)
    assert len(fake_measure) == 2


def test_probes_with_a_cache_level_slower_than_dram_keep_only_the_dram_roof_and_are_not_cached(
    tmp_path, monkeypatch, capsys
):
    """Measured while other work held the cores, a 1 MiB copy once read 0.1 GB/s against DRAM's 11.2: such
    cache roofs are dropped for the run and never kept for the next."""
    busy = probes.MachineProbes(4.5e10, 1.12e10, 1e8, 1.4e9, 2 * MIB, 32 * MIB, "busy")
    monkeypatch.setattr(probes, "measure_machine", lambda *args, **kwargs: busy)
    store = JsonStore("probes", tmp_path)
    got = probes.machine_probes("cpu", "float32", 2, store=store)
    assert got.peak_bytes_per_s == busy.peak_bytes_per_s and got.peak_flops == busy.peak_flops
    assert got.peak_bytes_per_s_l2 is None and got.peak_bytes_per_s_llc is None
    assert "the L2 copy ran at 0.1 GB/s, below the LLC copy's 1.4 GB/s" in got.method
    assert store.get(probes.probe_key("cpu", "float32", 2)) is None
    assert capsys.readouterr().err.count("warning: the machine probes look wrong") == 1
    in_order = probes.MachineProbes(4.5e10, 2.5e10, 1e11, 5e10, 2 * MIB, 32 * MIB, "quiet")
    alike = probes.MachineProbes(4.5e10, 2.5e10, 1.448e11, 1.549e11, 2 * MIB, 32 * MIB, "L2 and LLC alike")
    assert probes.levels_out_of_order(in_order) is None and probes.levels_out_of_order(alike) is None
    assert probes.levels_out_of_order(probes.MachineProbes.none()) is None


def test_a_failing_probe_gives_no_probes_and_one_warning_line(tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(probes, "measure_machine", fail)
    got = probes.machine_probes("cpu", "float32", 2, store=JsonStore("probes", tmp_path))
    assert got == probes.MachineProbes.none()
    assert all(value is None for value in got.columns().values())
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the machine probes failed (RuntimeError")


def test_the_cache_key_names_the_llc_override(monkeypatch):
    plain = probes.probe_key("cpu", "float32", 2, environ={})
    overridden = probes.probe_key("cpu", "float32", 2, environ={probes.LLC_OVERRIDE_ENV: "480M"})
    assert plain != overridden and torch.__version__ in plain


def test_no_probes_are_all_empty_columns():
    none = probes.MachineProbes.none()
    assert replace(none) == none and set(none.columns()) <= set(COLUMNS)


def test_grown_doubles_the_scale_until_a_call_takes_the_target_and_keeps_the_fastest_rate():
    scales = []

    def probe(scale: int) -> probes.Timed:
        scales.append(scale)
        seconds = 0.01 * scale * (0.8 if scale == 2 else 1.0)  # scale 2 fits the caches: the fastest rate
        return probes.Timed(work=scale, seconds=seconds, size=str(scale))

    assert probes.grown(probe, target_s=0.05).size == "2"
    assert scales == [1, 2, 4, 8]


def test_a_probe_of_an_older_method_is_not_read_from_the_cache():
    assert f"method={probes.PROBE_METHOD_VERSION}" in probes.probe_key("cpu", "float32", 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_probes_run_on_the_gpu():
    measured = probes.measure_machine("cuda", "float32", threads=0, target_s=0.005)
    assert measured.peak_flops > 1e11 and measured.peak_bytes_per_s > 1e10 and measured.peak_bytes_per_s_l2 > 1e10
