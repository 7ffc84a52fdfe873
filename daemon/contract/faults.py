"""Saying whose code raised, and where: the boundary between lorafarm and plugin code.

An exception from a family, a job parser or a hook is reported with the plugin's name and
the file:line of the innermost frame inside the plugin's own module (the line a plugin
author has to look at), not the innermost frame overall (which is often deep in the standard
library, e.g. `<frozen genericpath>:42`). Its traceback is logged once per distinct fault,
not once per file, rescan or render.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import traceback
from collections.abc import Hashable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _module_file(module_name: str | None) -> str | None:
    module = sys.modules.get(module_name or "")
    file = getattr(module, "__file__", None)
    return str(Path(file).resolve()) if file else None


def owner_files(owner: Any) -> list[str]:
    """The source files of `owner` (a family object, a function or a module), most specific
    first: a family's own class module, then the modules of its base classes (not lorafarm's
    `Family` base)."""
    if inspect.ismodule(owner):
        names = [owner.__name__]
    elif inspect.isfunction(owner) or inspect.ismethod(owner) or inspect.isbuiltin(owner):
        names = [getattr(owner, "__module__", None)]
    else:
        names = [cls.__module__ for cls in type(owner).__mro__
                 if cls.__module__ not in ("builtins", "abc", "daemon.contract.family")]
    files: list[str] = []
    for name in names:
        file = _module_file(name)
        if file and file not in files:
            files.append(file)
    return files


def fault_frame(exc: BaseException, owner: Any = None) -> traceback.FrameSummary | None:
    """The innermost frame of `exc` inside `owner`'s own module(s); else the innermost."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if not frames:
        return None
    for file in owner_files(owner) if owner is not None else []:
        for frame in reversed(frames):
            try:
                if str(Path(frame.filename).resolve()) == file:
                    return frame
            except OSError:
                continue
    return frames[-1]


def fault_location(exc: BaseException, owner: Any = None) -> str:
    """`file.py:LINE` of `fault_frame`, or "" when the exception carries no traceback."""
    frame = fault_frame(exc, owner)
    if frame is None:
        return ""
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"


def describe_fault(exc: BaseException, owner: Any = None) -> str:
    """`TypeError: message (at plugin.py:42)`."""
    where = fault_location(exc, owner)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"{text} (at {where})" if where else text


class FaultLog:
    """Logs a fault's traceback the first time it is seen (by key) and a short line never
    again, so a plugin that fails on every file or event does not flood the log."""

    def __init__(self) -> None:
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        """True the first time `key` is seen."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def exception(self, key: Hashable, message: str, exc: BaseException) -> bool:
        """Log `message` with `exc`'s traceback once per key; True when it was logged now."""
        if not self.first(key):
            log.debug("%s (seen before)", message)
            return False
        log.error("%s", message, exc_info=(type(exc), exc, exc.__traceback__))
        return True


def fault_key(exc: BaseException, *context: Hashable) -> tuple[Hashable, ...]:
    """What makes two faults the same: the context, the type and the raising line."""
    frame = fault_frame(exc)
    return (*context, type(exc).__name__, frame.filename if frame else None,
            frame.lineno if frame else None)


# What the core contains around plugin code: any error, and a plugin's sys.exit() (in a
# daemon thread an exception like any other, which would end that thread). Ctrl-C and the
# daemon's own stop reach the main thread only and are not caught with these.
PLUGIN_ERRORS: tuple[type[BaseException], ...] = (Exception, SystemExit)
