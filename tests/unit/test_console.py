"""The terminal side: JSON log lines and the live display's content."""

from __future__ import annotations

import io
import json
import logging

from rich.console import Console

from daemon.queue.scheduler import claim_next_batch
from daemon.runtime.console import JsonLogFormatter, render_table
from daemon.store.queries import console_snapshot
from tests.conftest import sdxl_job


def test_json_log_lines_are_one_object_each() -> None:
    record = logging.LogRecord("daemon.render.worker", logging.WARNING, __file__, 1,
                               "w0: loaded %s", ("tiny-sdxl",), None)
    line = JsonLogFormatter().format(record)
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["message"] == "w0: loaded tiny-sdxl"
    assert entry["logger"] == "daemon.render.worker" and "\n" not in line


def test_the_live_display_shows_running_renders_and_the_queue(farm) -> None:
    farm.drop("live.toml", sdxl_job(count=3))
    daemon = farm.daemon()
    daemon.start()
    claimed = claim_next_batch(daemon.store, 2, worker="w0")
    from daemon.queue.scheduler import record_progress

    record_progress(daemon.store, [c.render_id for c in claimed], 2, 3, "w0")
    state = console_snapshot(daemon.store)
    daemon.close()
    assert state["counts"] == {"running": 2, "queued": 1}
    out = io.StringIO()
    Console(file=out, width=120).print(render_table(state))
    text = out.getvalue()
    assert "queued 1  running 2" in text and "2/3" in text and "live" in text
