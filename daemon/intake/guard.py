"""The intake boundary: whatever sits in jobs/, a scan goes on.

An entry that cannot even be read (a folder, a FIFO, a dangling or looping symbolic link, a
file without read permission) is reported once, as a log line and an event, and left where
it is. (A job parser or check that raises is turned into a report by
daemon/resolver/parse_faults.py, on the resolver's side.)
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from pathlib import Path

from daemon.store.models import Store, add_event

log = logging.getLogger(__name__)


def unreadable_reason(path: Path) -> str | None:
    """Why a jobs/ entry cannot be taken as a job file, or None when it can be tried."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None  # gone meanwhile
    if stat.S_ISLNK(info.st_mode):
        try:
            info = path.stat()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "a symbolic link that loops (it points back at itself)"
            return "a symbolic link whose target does not exist"
    if stat.S_ISDIR(info.st_mode):
        return "a folder; job files go directly into jobs/, not into folders inside it"
    if stat.S_ISFIFO(info.st_mode):
        return "a named pipe (FIFO), not a file; lorafarm does not read from pipes"
    if stat.S_ISSOCK(info.st_mode):
        return "a socket, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "a device or other special file, not a job file"
    if not os.access(path, os.R_OK):
        return "not readable by lorafarm (permission denied)"
    return None


class UnreadableEntries:
    """Reports each unreadable jobs/ entry once, until it goes away or changes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._reported: dict[str, str] = {}
        self._lock = threading.Lock()

    def report(self, path: Path, reason: str) -> bool:
        """Log and record `reason` for `path` unless already reported; True when reported now."""
        with self._lock:
            if self._reported.get(path.name) == reason:
                return False
            self._reported[path.name] = reason
        log.warning("left %s alone in %s: it is %s; move it away or replace it with a job "
                    "file", path.name, path.parent, reason)
        try:
            with self.store.session() as session:
                add_event(session, "job_file_unreadable", f"{path.name}: it is {reason}",
                          file=path.name, reason=reason)
        except Exception:  # the history is a report here, not a must
            log.exception("could not record that %s is unreadable", path.name)
        return True

    def forget_missing(self, present: set[str]) -> None:
        """Entries gone from jobs/ are reported again if they come back broken."""
        with self._lock:
            for name in [n for n in self._reported if n not in present]:
                del self._reported[name]
