"""The intake boundary: whatever sits in jobs/ and whatever a job parser does, a scan goes on.

A parser or check that raises something else than JobFileError becomes a JobFileError naming
the parser's plugin (or the family whose code raised) and the line that raised, so the file
is rejected with a report like any other bad job. An entry that cannot even be read (a
folder, a FIFO, a dangling or looping symbolic link, a file without read permission) is
reported once, as a log line and an event, and left where it is.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import tomllib
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.contract.faults import describe_fault, owner_files
from daemon.contract.jobfile import JobFileError
from daemon.store.models import Store, add_event

log = logging.getLogger(__name__)


def parser_fault(suffix: str, parser: Any, plugin: str | None, exc: Exception) -> JobFileError:
    """The report for a job parser that raised instead of saying what is wrong."""
    kind = "image" if suffix in (".png", ".jpg", ".jpeg", ".webp") else (
        "video" if suffix in (".mp4", ".webm", ".mov") else "job")
    return JobFileError(
        f"the {suffix} job parser (plugin {plugin!r}) could not read this file: "
        f"{describe_fault(exc, parser)}",
        fix=f"a {suffix} file in jobs/ must be a {kind} file lorafarm can read; check that the "
            "file is complete and that its name ends in what it really is (TOML text saved as "
            f".png, say, must be renamed to .toml). If the file is fine, this is a bug in "
            f"plugin {plugin!r}")


def looks_like(raw: bytes) -> str | None:
    """The job-file suffix these bytes look like, from their first bytes (None: unknown)."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if raw[4:8] == b"ftyp":
        return ".mp4"
    try:
        text = raw.decode("utf-8").lstrip("\ufeff \t\r\n")
    except UnicodeDecodeError:
        return None
    if text.startswith(("{", "[{")):
        return ".json"
    try:
        tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError):
        return None
    return ".toml" if text else None


def wrong_suffix(error: JobFileError, file_name: str, raw: bytes,
                 known: Iterable[str]) -> JobFileError:
    """`error` with a hint to rename the file when its bytes are another known format (the
    TOML job saved as .png); else `error` unchanged."""
    suffix = Path(file_name).suffix.lower()
    real = looks_like(raw)
    if real is None or real == suffix or real not in known:
        return error
    hint = (f"this file looks like a {real} file saved with a {suffix} name: rename it to "
            f"{Path(file_name).stem}{real} and drop it again")
    return JobFileError(error.what, key=error.key, line=error.line,
                        fix=f"{hint}; or {error.fix}" if error.fix else hint)


def check_fault(exc: Exception, plugins: Any) -> JobFileError:
    """The report for an exception while checking or resolving a parsed job: it names the
    family whose code raised (the innermost frame in a family's own module), if any."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    files = [_resolved(frame.filename) for frame in frames]
    culprit, depth = None, -1
    for name, family in plugins.families.items():
        own = owner_files(family)[:1]
        for index in range(len(files) - 1, depth, -1):
            if own and files[index] == own[0]:
                culprit, depth = name, index
                break
    if culprit is not None:
        plugin = plugins.plugin_of_family(culprit)
        return JobFileError(
            f"family {culprit} (plugin {plugin!r}) raised while checking this job: "
            f"{describe_fault(exc, plugins.families[culprit])}",
            fix=f"this is a bug in plugin {plugin!r}; try another checkpoint meanwhile")
    return JobFileError(f"lorafarm could not check this job: {describe_fault(exc)}",
                        fix="this is a bug in lorafarm; report it with the job file")


def _resolved(file: str) -> str:
    try:
        return str(Path(file).resolve())
    except OSError:
        return file


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
