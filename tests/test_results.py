"""The results parquet: full schema round trip, atomic append, refusal of foreign files."""

from __future__ import annotations

import multiprocessing
import threading

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qna_bench import results


def _row(layer="conv_dw", window=3, status="ok", **extra):
    values = dict(
        run_id="r1", timestamp="2026-01-01T00:00:00+00:00", layer=layer, family="conv", implementation="x",
        layout="nchw", uses_window=True, layer_flags={"fused": True}, batch=1, height=8, width=8, channels=4,
        heads=2, window=window, stride=1, dilation=1, dtype="float32", device="cpu", mode="forward", seed=0,
        status=status, reason=None, median_s=0.001, q25_s=0.0009, q75_s=0.0011, min_s=0.0008, mean_s=0.001, n=3,
        number_per_run=10, times_s=[0.001, 0.0009, 0.0011], threads=2, first_call_s=0.01, peak_bytes=1024,
        base_bytes=2048, memory_method="cpu_live_storages", memory_note="", flops=100, flops_method="flop_counter",
        flops_analytic=None, params=40, torch_version="2", timm_version="1", natten_version="0", python_version="3",
        device_name="cpu: test", cpu_model="test", hostname="h", git_commit="abc", point_seconds=1.5, load_avg=0.5,
    )
    values.update(extra)
    return results.make_row(**values)


def test_round_trip_keeps_every_column_and_dtype(tmp_path):
    path = tmp_path / "results.parquet"
    results.append_rows(path, [_row(), _row(window=5, status="oom", median_s=None, peak_bytes=None, times_s=None)])
    frame = results.read_results(path)
    assert tuple(frame.columns) == results.COLUMNS
    assert pq.read_schema(path).equals(results.SCHEMA, check_metadata=False)
    assert frame["peak_bytes"].dtype == pd.Int64Dtype()
    assert frame["median_s"].dtype == pd.Float64Dtype()
    assert frame["layer"].dtype == pd.StringDtype()
    assert frame["uses_window"].dtype == pd.BooleanDtype()
    assert frame.loc[1, "peak_bytes"] is pd.NA
    assert list(frame.loc[0, "times_s"]) == [0.001, 0.0009, 0.0011]
    assert frame.loc[0, "layer_flags"] == '{"fused": true}'
    again = tmp_path / "again.parquet"
    results.append_rows(again, frame.to_dict("records"))
    assert results.read_table(again).equals(results.read_table(path))


def test_make_row_refuses_unknown_columns_and_statuses():
    with pytest.raises(KeyError, match="bogus"):
        _row(bogus=1)
    with pytest.raises(ValueError, match="status='great'"):
        _row(status="great")


def test_a_remeasured_point_replaces_its_row(tmp_path):
    path = tmp_path / "results.parquet"
    results.append_rows(path, [_row(window=3), _row(window=5)])
    results.append_rows(path, [_row(window=3, median_s=0.5)])
    frame = results.read_results(path)
    assert len(frame) == 2
    assert frame.set_index("window").loc[3, "median_s"] == 0.5


@pytest.mark.parametrize("content", [b"not a parquet at all", None])
def test_a_foreign_or_corrupt_file_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / "results.parquet"
    if content is None:
        pq.write_table(pa.table({"a": [1, 2]}), path)
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(results.ResultsFileError, match="refusing"):
        results.append_rows(path, [_row()])
    with pytest.raises(results.ResultsFileError):
        results.check_writable(path)
    assert path.read_bytes() == before


def _write_many(args):
    path, writer = args
    for window in range(1, 11):
        results.append_rows(path, [_row(layer=f"writer{writer}", window=window)])


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "results.parquet")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_write_many, [(path, w) for w in range(4)])
    frame = results.read_results(path)
    assert len(frame) == 40
    assert set(zip(frame["layer"], frame["window"])) == {(f"writer{w}", k) for w in range(4) for k in range(1, 11)}


def test_a_reader_sees_one_whole_file_while_a_writer_replaces_it(tmp_path):
    """A sweep replaces its file (a temporary file renamed over it) while a reader polls it: the reader
    gets the old rows or the new ones, never a file read half from each (pyarrow given a path opened it
    twice, the footer from one file and the pages from the next: "Deserializing page header failed")."""
    path = tmp_path / "results.parquet"
    tables = [results.rows_to_table([_row(window=k) for k in range(1, count)]) for count in (40, 80)]
    results._write_atomic(tables[0], path)
    stop = threading.Event()

    def replace_again_and_again() -> None:
        while not stop.is_set():
            for table in tables:
                results._write_atomic(table, path)

    writer = threading.Thread(target=replace_again_and_again)
    writer.start()
    try:
        lengths = {len(results.read_table(path)) for _ in range(300)}
    finally:
        stop.set()
        writer.join()
    assert lengths <= {39, 79}


def test_merge_is_the_union(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    results.append_rows(a, [_row(window=3), _row(window=5)])
    results.append_rows(b, [_row(window=7)])
    merged = results.merge_results([a, b], tmp_path / "merged.parquet")
    assert sorted(merged.column("window").to_pylist()) == [3, 5, 7]


def test_a_file_written_before_a_column_was_added_still_reads(tmp_path):
    path = tmp_path / "results.parquet"
    old = results.rows_to_table([_row()]).drop_columns(["load_avg", "first_call_s"])
    pq.write_table(old, path)
    frame = results.read_results(path)
    assert tuple(frame.columns) == results.COLUMNS
    assert frame.loc[0, "load_avg"] is pd.NA and frame.loc[0, "median_s"] == 0.001
    results.append_rows(path, [_row(window=5)])
    assert len(results.read_results(path)) == 2
