"""What the daemon shows in a terminal: a live progress display in the foreground, plain or
JSON log lines in the background.

The display reads the same state the status page does (the database: running renders with
their step progress, queue counts, the batches table for rates), so what a user sees in the
terminal and on the page always agree.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from daemon.store import queries
from daemon.store.models import Store

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: for journald, Loki, or `jq` over a night's log."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, json_lines: bool, verbose: bool) -> None:
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def quiet_libraries() -> None:
    """The libraries log loudly about what is expected here (no CUDA, no torchvision) and draw
    progress bars per component; the daemon reports progress itself. Imports diffusers and
    transformers: only for commands that render or load models."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # watchdog logs a harmless error when its inotify thread is stopped mid-read.
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)


def render_table(state: dict[str, Any]) -> Table:
    from rich.table import Table
    figures = state["stats"]
    counts = state["counts"]
    eta = figures.get("eta_seconds")
    title = (f"lorafarm  queued {counts.get('queued', 0)}  running {counts.get('running', 0)}  "
             f"done {counts.get('done', 0)}  failed {counts.get('failed', 0)}"
             + (f"  ETA {_duration(eta)}" if eta else ""))
    table = Table(title=title, expand=True)
    for column in ("job", "render", "worker", "checkpoint", "step"):
        table.add_column(column)
    for row in state["running"]:
        step = (f"{row['progress_step'] or 0}/{row['progress_total']}"
                if row["progress_total"] else "loading")
        table.add_row(row["name"], f"#{row['index']} seed {row['seed']}", row["worker"] or "",
                      row["checkpoint"], step)
    return table


class LiveDisplay:
    """A rich Live table refreshed twice a second from the database, on its own thread."""

    def __init__(self, store: Store, console: Console | None = None) -> None:
        from rich.console import Console

        self.store = store
        self.console = console or Console(stderr=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-display", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from rich.live import Live

        with Live(console=self.console, refresh_per_second=2, transient=False) as live:
            while not self._stop.wait(0.5):
                try:
                    live.update(render_table(queries.console_snapshot(self.store)))
                except Exception:  # the display must never take the daemon down
                    continue


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
