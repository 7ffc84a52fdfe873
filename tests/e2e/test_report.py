"""The morning report: what the user opens first, from disk, after the queue drained; and the
webhook that tells a phone about it (and never stops the daemon when it is down)."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from daemon.output.report import (
    DrainWatch,
    on_queue_drained,
    post_webhook,
    write_morning_report,
)
from daemon.queue import control
from daemon.store.models import Store
from daemon.store.queries import night_summary
from tests.conftest import Farm, sdxl_job
from tests.support.night_farm import Night, night  # noqa: F401  (the shared rendered night)

LONG_AGO = dt.datetime(2000, 1, 1)


def test_the_report_shows_the_renders_the_failures_and_the_figures(night: Night) -> None:  # noqa: F811
    path = write_morning_report(night.farm.config, night.store, LONG_AGO)
    outputs = night.farm.outputs
    assert path.parent == outputs and re.fullmatch(r"morning-report-\d{8}-\d{6}\.html",
                                                   path.name)
    assert (outputs / "morning-report.html").read_text() == path.read_text()
    html = path.read_text()
    assert 'id="done">4<' in html and 'id="failed">1<' in html
    assert "patched no module" in html and "dud" in html  # the failure and its reason
    assert "tiny-sdxl" in html  # the per-checkpoint table
    assert "an inked &lt;lighthouse&gt;" in html  # user text escaped
    # The contact sheet refers to the outputs relatively: it works opened from disk.
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 4
    for source in sources:
        assert not source.startswith(("/", "http")) and (outputs / unquote(source)).is_file()


def test_the_summary_counts_only_what_ended_since_then(night: Night) -> None:  # noqa: F811
    with night.store.session() as session:
        everything = night_summary(session, night.farm.outputs, LONG_AGO)
        later = night_summary(session, night.farm.outputs,
                              dt.datetime.now(dt.UTC).replace(tzinfo=None)
                              + dt.timedelta(minutes=1))
    assert (everything["done"], everything["failed"]) == (4, 1)
    assert everything["per_checkpoint"]["tiny-sdxl"]["done"] == 4
    assert everything["busy_seconds"] > 0 and 0 < everything["busy_fraction"] <= 1
    assert everything["pipeline_loads"] >= 1
    assert (later["done"], later["failed"], later["renders"]) == (0, 0, [])


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, object]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        _Receiver.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Receiver.received.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook?secret=1"
    server.shutdown()
    server.server_close()


def test_the_webhook_gets_the_figures_when_the_queue_drains(night: Night, receiver: str,  # noqa: F811
                                                            tmp_path: Path) -> None:
    import dataclasses

    from daemon.config import ReportSettings

    config = dataclasses.replace(night.farm.config,
                                 report=ReportSettings(webhook_url=receiver))
    path = on_queue_drained(config, night.store, LONG_AGO)
    assert path is not None and path.is_file()
    [sent] = _Receiver.received
    assert sent["event"] == "queue_drained" and sent["report"] == str(path)
    assert (sent["done"], sent["failed"]) == (4, 1) and "renders" not in sent
    off = dataclasses.replace(config, report=ReportSettings(enabled=False))
    assert on_queue_drained(off, night.store, LONG_AGO) is None


def test_a_webhook_that_is_down_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert post_webhook(f"http://127.0.0.1:{port}/hook?token=hidden", {"done": 1}) is False
    assert post_webhook("file:///etc/passwd", {"done": 1}) is False
    assert post_webhook("not a url", {"done": 1}) is False
    assert "hidden" not in caplog.text  # the query (often a secret) is not logged


def test_the_runner_s_drain_watch_reports_once_when_the_queue_empties(farm: Farm) -> None:
    daemon = farm.daemon()
    daemon.start()
    farm.drop("short.toml", sdxl_job(count=2))
    [job_id] = daemon.intake.scan().accepted
    daemon.close()
    store = Store.for_path(farm.config.paths.database)
    watch = DrainWatch(farm.config, store)
    assert watch.check() is None  # work is waiting: the night goes on
    control.pause(store)
    assert watch.check() is None  # paused is not drained
    control.cancel_job(farm.config, store, job_id)  # the last work leaves the queue
    path = watch.check()
    assert path is not None and path.parent == farm.outputs
    html = path.read_text()
    assert 'id="done">0<' in html and "Nothing finished" in html
    assert re.search(r"<b>2</b><span class=\"muted\">cancelled", html)
    assert watch.check() is None and watch.reports == [path]  # one report per night
    store.dispose()
