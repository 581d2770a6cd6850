"""The result row schema and its parquet file: append (locked, atomic), read, merge.

One row per (layer, problem, mode). The pyarrow `SCHEMA` is the single definition of the columns;
a file whose columns differ is refused rather than overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qna_bench import identity

Status = Literal["ok", "oom", "unsupported", "error", "timeout", "skipped"]
STATUSES: tuple[str, ...] = get_args(Status)

RESULTS_FILE = "results.parquet"

PROBLEM_COLUMNS = identity.problem_fields()

SCHEMA = pa.schema(
    [
        ("point_key", pa.string()),
        ("run_id", pa.string()),
        ("timestamp", pa.string()),
        # layer
        ("layer", pa.string()),
        ("family", pa.string()),
        # subject, peer, baseline or reference, as registered (qna_bench.registry.Role)
        ("role", pa.string()),
        ("implementation", pa.string()),
        ("layout", pa.string()),
        ("uses_window", pa.bool_()),
        ("layer_flags", pa.string()),
        # the form measured: eager, or a torch.compile mode (qna_bench.compile_mode); null in files from
        # before the column, which read as eager
        ("compile_mode", pa.string()),
        # tuned: the layer in the form its tuner chose; shipped: as built (`as_shipped=true`); null in files
        # from before the column, which read as tuned (qna_bench.forms)
        ("tuning", pa.string()),
        # the form that ran, each choice by axis as JSON ({"gemm": "conv1x1"}, QnA's {"plan": ..., "gemm": ...})
        # and where it came from: tuned, cache, default (as built) or forced
        ("form", pa.string()),
        ("form_source", pa.string()),
        # seconds the layer's forms took to time before its first call (0 from the cache)
        ("tune_s", pa.float64()),
        # problem
        ("batch", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("channels", pa.int64()),
        ("heads", pa.int64()),
        ("window", pa.int64()),
        ("stride", pa.int64()),
        ("dilation", pa.int64()),
        ("dtype", pa.string()),
        ("device", pa.string()),
        ("mode", pa.string()),
        ("seed", pa.int64()),
        # outcome
        ("status", pa.string()),
        ("reason", pa.string()),
        # latency, seconds per call
        ("median_s", pa.float64()),
        ("q25_s", pa.float64()),
        ("q75_s", pa.float64()),
        ("min_s", pa.float64()),
        ("mean_s", pa.float64()),
        ("n", pa.int64()),
        ("number_per_run", pa.int64()),
        ("times_s", pa.list_(pa.float64())),
        # each round's median (median_s is their median), each round's geometric mean (what ratios pair,
        # qna_bench.rounds.round_times) and how many rounds are in this row
        ("round_medians_s", pa.list_(pa.float64())),
        ("round_geomeans_s", pa.list_(pa.float64())),
        ("rounds", pa.int64()),
        # the worker processes the rounds ran in; each round's canary (the slower of the canary products
        # timed before and after it, qna_bench.measure.canary); rounds whose canary stayed slow on a re-run
        ("processes", pa.int64()),
        ("canary_s", pa.list_(pa.float64())),
        ("slow_rounds", pa.int64()),
        ("threads", pa.int64()),
        ("first_call_s", pa.float64()),
        # a compiled form: the first (compiling) call's seconds minus the median steady call (≥ 0); null eager
        ("compile_s", pa.float64()),
        # memory, bytes
        ("peak_bytes", pa.int64()),
        ("base_bytes", pa.int64()),
        ("memory_method", pa.string()),
        ("memory_note", pa.string()),
        # work
        ("flops", pa.int64()),
        ("flops_method", pa.string()),
        ("flops_analytic", pa.int64()),
        # the layer's closed-form minimum bytes moved per call (LayerSpec.analytic_bytes)
        ("bytes_analytic", pa.int64()),
        ("params", pa.int64()),
        # this run's machine probes (qna_bench.measure.probes): peak FLOP/s, the bandwidth past the
        # last-level cache (DRAM), of the L2 and of the LLC, the cache sizes assumed, and how measured
        ("peak_flops_probe", pa.float64()),
        ("peak_bytes_per_s_probe", pa.float64()),
        ("peak_bytes_per_s_l2_probe", pa.float64()),
        ("peak_bytes_per_s_llc_probe", pa.float64()),
        ("l2_bytes_probe", pa.int64()),
        ("llc_bytes_probe", pa.int64()),
        ("probe_method", pa.string()),
        # environment
        ("torch_version", pa.string()),
        ("timm_version", pa.string()),
        ("natten_version", pa.string()),
        ("python_version", pa.string()),
        ("device_name", pa.string()),
        ("cpu_model", pa.string()),
        ("hostname", pa.string()),
        ("git_commit", pa.string()),
        # the layer's code version (its modules' source hash, wrapped libraries' versions) and the
        # measurement settings (JSON): a resumed sweep measures a row again when either changed
        ("code_version", pa.string()),
        ("measure_settings", pa.string()),
        ("point_seconds", pa.float64()),
        # 1-minute system load average when the point started: other work on the cores spoils timings.
        ("load_avg", pa.float64()),
        # measure.profile=true: the point's per-op breakdown, relative to the parquet's folder
        ("profile_file", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
# Columns every qna-bench results file has had: a file with these and no unknown ones is ours.
IDENTITY_COLUMNS = ("point_key", "layer", *PROBLEM_COLUMNS, "status", "median_s", "peak_bytes")

_PANDAS_TYPES = {
    pa.int64(): pd.Int64Dtype(),
    pa.float64(): pd.Float64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
    pa.string(): pd.StringDtype(),
}


class ResultsFileError(Exception):
    """The results path holds something that is not a qna-bench results parquet."""


def make_row(**values: Any) -> dict[str, Any]:
    """A complete row: every schema column present (missing ones null), unknown columns refused."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not result columns: {sorted(unknown)}")
    row = {name: values.get(name) for name in COLUMNS}
    if row["status"] not in STATUSES:
        raise ValueError(f"status={row['status']!r}: allowed values are {', '.join(STATUSES)}")
    if isinstance(row["layer_flags"], dict):
        row["layer_flags"] = json.dumps(row["layer_flags"], sort_keys=True, default=str)
    row["point_key"] = identity.point_key(row)
    return row


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def read_table(path: str | os.PathLike) -> pa.Table:
    """The rows at ``path``; refuses a file that is not a results parquet with our columns."""
    path = Path(path)
    try:
        # One open file: a writer renames a new file over this one (`_write_atomic`), and pyarrow given the
        # path opens it again after reading the footer, which may then belong to the file replaced.
        with path.open("rb") as handle:
            table = pq.read_table(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsFileError(f"results path {path}: not a readable parquet file ({exc}); refusing to touch it") from None
    missing = [name for name in SCHEMA.names if name not in table.schema.names]
    extra = sorted(set(table.schema.names) - set(SCHEMA.names))
    if not extra and missing and set(IDENTITY_COLUMNS) <= set(table.schema.names):
        # Written before a column was added: the new columns read as missing values.
        for name in missing:
            column_type = SCHEMA.field(name).type
            table = table.append_column(pa.field(name, column_type), pa.nulls(table.num_rows, column_type))
        table = table.select(SCHEMA.names)
    elif missing or extra or table.schema.names != SCHEMA.names:
        raise ResultsFileError(
            f"results path {path}: not a qna-bench results file (missing columns {sorted(missing)[:5]}, "
            f"unknown columns {extra[:5]}); refusing to touch it"
        )
    return table.cast(SCHEMA)


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """A results parquet as a DataFrame with nullable dtypes (ints stay ints when a value is missing)."""
    return read_table(path).to_pandas(types_mapper=_PANDAS_TYPES.get)


def check_writable(path: str | os.PathLike) -> None:
    """Refuse early: an existing foreign or corrupt file, or a folder we cannot create or write."""
    path = Path(path)
    if path.exists():
        read_table(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsFileError(f"results_dir={folder}: cannot create it ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ResultsFileError(f"results_dir={folder}: not writable")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(table: pa.Table, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def append_rows(path: str | os.PathLike, rows: list[dict[str, Any]], replace_points: bool = True) -> None:
    """Add rows to the parquet at ``path`` under an exclusive lock, atomically.

    With ``replace_points``, an existing row for the same point (same `point_key`) is replaced, so a
    re-measured point appears once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = rows_to_table(rows)
    with _locked(path):
        if path.exists():
            old = read_table(path)
            if replace_points:
                keys = set(new.column("point_key").to_pylist())
                old = old.filter(pa.array([k not in keys for k in old.column("point_key").to_pylist()], pa.bool_()))
            new = pa.concat_tables([old, new])
        _write_atomic(new, path)


def rows_by_key(path: str | os.PathLike, statuses: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Rows already in the file with one of ``statuses``, by point key (for resuming a sweep)."""
    path = Path(path)
    if not path.exists():
        return {}
    wanted = set(statuses)
    return {row["point_key"]: row for row in read_table(path).to_pylist() if row["status"] in wanted}


def merge_results(paths: Iterable[str | os.PathLike], out_path: str | os.PathLike) -> pa.Table:
    """Union of several results files into one (a later file's row wins for the same point)."""
    tables = [read_table(p) for p in paths]
    merged = pa.concat_tables(tables) if tables else rows_to_table([])
    frame = merged.to_pandas(types_mapper=_PANDAS_TYPES.get).drop_duplicates("point_key", keep="last")
    table = pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_path):
        _write_atomic(table, out_path)
    return table
