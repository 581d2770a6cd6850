"""Progress lines for long sweeps: point i of n, what it is, elapsed time and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Prints ``[i/n] label ... result | elapsed m:ss, ETA m:ss`` as each point finishes."""

    def __init__(self, total: int, stream: TextIO | None = None, clock=time.monotonic):
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self._clock = clock
        self._start = clock()
        self._label = ""

    def start(self, label: str) -> None:
        self._label = label
        print(f"[{self.done + 1}/{self.total}] {label} ...", file=self.stream, flush=True)

    def eta_s(self) -> float | None:
        if not self.done:
            return None
        return (self._clock() - self._start) / self.done * (self.total - self.done)

    def finish(self, result: str, label: str | None = None) -> None:
        """One point done; ``label`` names it when it differs from the started one (a group's member)."""
        self.done += 1
        elapsed = format_duration(self._clock() - self._start)
        eta = self.eta_s()
        eta_text = format_duration(eta) if eta is not None else "?"
        print(
            f"[{self.done}/{self.total}] {label or self._label}: {result} | elapsed {elapsed}, ETA {eta_text}",
            file=self.stream,
            flush=True,
        )
