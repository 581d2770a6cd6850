"""Stand-ins for the measuring worker's main function: workers that die on their first point."""

from __future__ import annotations

import os
import signal


def exits_on_first_point(conn, setup) -> None:
    conn.send(None)  # started, no memory cap
    conn.recv()
    os._exit(3)


def killed_on_first_point(conn, setup) -> None:
    conn.send(None)
    conn.recv()
    os.kill(os.getpid(), signal.SIGKILL)
