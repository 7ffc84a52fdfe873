"""Whatever a job parser or a family's check does, the job gets a report, not a crash.

A parser or check that raises something else than JobFileError becomes a JobFileError naming
the parser's plugin (or the family whose code raised) and the line that raised, so the file
is rejected with a report like any other bad job. A file whose bytes are another known format
than its name says (TOML saved as .png) gets a hint to rename it.
"""

from __future__ import annotations

import tomllib
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.contract.faults import describe_fault, owner_files
from daemon.contract.jobfile import JobFileError


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
