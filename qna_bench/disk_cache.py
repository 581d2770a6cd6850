"""A small JSON store on disk for what is measured once per machine and reused across runs (machine
probes, QnA's tuned plans): ``$QNA_BENCH_CACHE_DIR``, by default ``~/.cache/qna_bench``.

Each store is one JSON file mapping a key (a string that names everything the entry depends on) to an
entry. Writes are atomic (a temporary file renamed over the old one), so a reader never sees half a file;
a file that does not parse, or holds something else, reads as empty and is rewritten on the next put.
Two processes that write at once may lose one entry, never corrupt the file: the loser measures again
next time.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "QNA_BENCH_CACHE_DIR"
# A sweep's own store, for the length of the sweep (`run_cache`): what its workers choose there holds for
# every round of the sweep, also where it is not kept for later runs (a tuning on a busy machine).
RUN_CACHE_DIR_ENV = "QNA_BENCH_RUN_CACHE_DIR"


def cache_dir() -> Path:
    """``$QNA_BENCH_CACHE_DIR``, else ``~/.cache/qna_bench`` (``$XDG_CACHE_HOME`` respected)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qna_bench"


def run_cache_dir() -> Path | None:
    """The running sweep's own store (`run_cache`), or None outside a sweep."""
    configured = os.environ.get(RUN_CACHE_DIR_ENV)
    return Path(configured) if configured else None


@contextlib.contextmanager
def run_cache() -> Iterator[Path]:
    """A store for the length of a sweep, in a temporary folder its worker processes inherit."""
    previous = os.environ.get(RUN_CACHE_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="qna_bench_run_") as folder:
        os.environ[RUN_CACHE_DIR_ENV] = folder
        try:
            yield Path(folder)
        finally:
            if previous is None:
                os.environ.pop(RUN_CACHE_DIR_ENV, None)
            else:
                os.environ[RUN_CACHE_DIR_ENV] = previous


class JsonStore:
    """One JSON file of entries by key."""

    def __init__(self, name: str, folder: Path | None = None):
        self.path = (folder if folder is not None else cache_dir()) / f"{name}.json"

    def read(self) -> dict[str, Any]:
        """Every entry; empty when the file is missing, unreadable or not a JSON object."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Any | None:
        return self.read().get(key)

    def put(self, key: str, entry: Any) -> None:
        """Add or replace one entry (read, update, atomic rename)."""
        entries = self.read()
        entries[key] = entry
        write_json_atomic(self.path, entries)


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``: written to a temporary file beside it and renamed over the old one.
    An unwritable folder (a read-only home) is not an error: what it held is measured again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
