"""The single-owner lock on a state folder (state/daemon.lock), and who holds it.

Only one daemon may own a state folder at a time: SQLite wants a single writer, and two
daemons on one folder would render everything twice. The lock is an exclusive `flock` held
for the daemon's lifetime; the file holds the owner's pid so that `lorafarm status` and the
status page can name it. This module imports nothing heavy: the CLI's read-only verbs use it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_FILE = "daemon.lock"


class DaemonLockedError(RuntimeError):
    """Another daemon owns this state folder."""


class StateLock:
    """The exclusive lock a running daemon holds on its state folder."""

    def __init__(self, state: Path) -> None:
        self.path = Path(state) / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise DaemonLockedError(
                f"another lorafarm daemon is already running on {self.path.parent}; "
                "stop it first (or use another config with its own state folder)") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def daemon_pid(state: Path) -> int | None:
    """The pid of the daemon holding `state`'s lock, -1 when one holds it but its pid is
    unreadable, or None when no daemon runs there."""
    path = Path(state) / LOCK_FILE
    if not path.exists():
        return None
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None
