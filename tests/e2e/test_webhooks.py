"""Per-event webhooks (`[[webhooks]]`): a receiver gets exactly the events it subscribed to,
with the job's state, outputs and page; a dead or slow receiver holds up no render, and a
delivery that never gets through is recorded as an event."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from daemon.config import ConfigError, config_from_dict
from daemon.runtime.runner import Daemon
from daemon.store.models import Event, Store
from tests.conftest import Farm, sdxl_job
from tests.support.helpers import run_in_thread


class Receiver:
    """A local HTTP server that records what is posted to it; with `hold`, each request
    waits until `release` is set (a slow receiver)."""

    def __init__(self, hold: bool = False) -> None:
        self.got: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.release = threading.Event()
        if not hold:
            self.release.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.in_flight += 1
                receiver.release.wait(timeout=120)
                receiver.in_flight -= 1
                receiver.got.append(json.loads(body))
                receiver.headers.append(dict(self.headers))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?secret=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[str]:
        return [body["event"] for body in self.got]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def _closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/hook"


def _with_webhooks(farm: Farm, hooks: list[dict[str, Any]]) -> Farm:
    """The farm's config with `[[webhooks]]` tables, read as config.toml would be."""
    farm.config = config_from_dict({**farm.data, "webhooks": hooks}, base=farm.root,
                                   source=farm.root / "config.toml")
    return farm



def _events(farm: Farm, kind: str) -> list[Event]:
    store = Store.for_url(farm.config.database_url)
    with store.session() as session:
        rows = list(session.scalars(select(Event).where(Event.kind == kind)))
    store.dispose()
    return rows


def test_a_receiver_gets_exactly_the_events_it_subscribed_to(make_farm, receivers) -> None:  # type: ignore[no-untyped-def]
    some, every = Receiver(), Receiver()
    receivers += [some, every]
    farm = _with_webhooks(make_farm(web={"enabled": True, "port": 0}), [
        {"url": some.url, "events": ["job_accepted", "job_finished"]},
        {"url": every.url, "headers": {"Authorization": "Bearer hook-secret"}},
    ])
    daemon = farm.daemon()
    thread = run_in_thread(daemon)
    try:
        farm.drop("lighthouse.toml", sdxl_job(count=2))
        farm.wait_for(lambda: "queue_drained" in every.events() and len(some.got) == 2,
                      timeout=240)
        base = daemon.web.url if daemon.web else ""
    finally:
        daemon.stop()
        thread.join(timeout=120)
    assert some.events() == ["job_accepted", "job_finished"]
    assert sorted(every.events()) == sorted(["job_accepted", "render_done", "render_done",
                                             "job_finished", "queue_drained"])
    assert every.events()[0] == "job_accepted"
    assert all(h["Authorization"] == "Bearer hook-secret" for h in every.headers)
    assert all("Authorization" not in h for h in some.headers)
    [job] = farm.history()
    accepted, finished = some.got
    assert accepted["job_id"] == finished["job_id"] == job["id"]
    assert finished["state"] == "done" and finished["file"] == "lighthouse.toml"
    assert finished["page_url"] == f"{base}jobs/{job['id']}"
    assert [o["path"] for o in finished["outputs"]] == [r["output"] for r in job["renders"]]
    assert all(Path(o["path"]).is_file() and o["url"].startswith(f"{base}files/")
               for o in finished["outputs"])
    done = [body for body in every.got if body["event"] == "render_done"]
    assert sorted(body["render"]["index"] for body in done) == [0, 1]
    assert all(body["render"]["output"]["path"] for body in done)
    drained = next(body for body in every.got if body["event"] == "queue_drained")
    assert drained["done"] == 2 and drained["failed"] == 0
    assert _events(farm, "webhook_failed") == []


def test_a_dead_or_slow_receiver_holds_up_no_render(make_farm, receivers) -> None:  # type: ignore[no-untyped-def]
    slow = Receiver(hold=True)
    receivers.append(slow)
    dead = _closed_port_url()
    farm = _with_webhooks(make_farm(), [
        {"url": dead, "events": ["job_accepted", "job_finished"], "retries": 2,
         "backoff_seconds": 0.1, "timeout_seconds": 2},
        {"url": slow.url, "timeout_seconds": 60, "retries": 0},
    ])
    daemon = farm.daemon()
    thread = run_in_thread(daemon)
    try:
        farm.drop("lighthouse.toml", sdxl_job(count=2))
        # The job renders to the end while the slow receiver still holds the very first
        # delivery (job_accepted) open: no render waited for it.
        farm.wait_for(lambda: [j["state"] for j in farm.history()] == ["done"], timeout=120)
        assert slow.in_flight == 1 and slow.got == []
        # The dead receiver's deliveries were tried 3 times each and recorded as failed.
        farm.wait_for(lambda: len(_events(farm, "webhook_failed")) == 2, timeout=30)
        slow.release.set()
        farm.wait_for(lambda: "queue_drained" in slow.events(), timeout=30)
    finally:
        daemon.stop()
        thread.join(timeout=120)
    failed = _events(farm, "webhook_failed")
    assert sorted(json.loads(e.data_json)["event"] for e in failed) == ["job_accepted",
                                                                        "job_finished"]
    for row in failed:
        data = json.loads(row.data_json)
        assert data["attempts"] == 3 and data["url"] == dead
        assert "refused" in data["error"].lower()
        assert row.job_id is not None
    assert sorted(slow.events()) == sorted(["job_accepted", "render_done", "render_done",
                                            "job_finished", "queue_drained"])


def test_webhook_settings_are_checked(tmp_path: Path) -> None:
    def load(hooks: Any) -> Any:
        return config_from_dict({"webhooks": hooks}, base=tmp_path)

    assert load([{"url": "https://x.example/h"}]).webhooks[0].events == (
        "job_accepted", "render_done", "render_failed", "job_finished", "queue_drained")
    config = load([{"url": "https://x.example/h", "events": ["render_failed"],
                    "headers": {"X-Key": "k"}, "retries": 3}])
    [hook] = config.webhooks
    assert hook.events == ("render_failed",) and hook.headers == (("X-Key", "k"),)
    assert hook.retries == 3 and hook.backoff_seconds == 2.0
    for bad, says in (
            ([{"url": "ftp://x"}], "webhooks[1].url must be an http:// or https:// URL"),
            ([{"url": "http://x", "events": ["render_don"]}],
             "unknown event 'render_don'; did you mean 'render_done'?"),
            ([{"url": "http://x", "event": ["render_done"]}],
             "unknown setting webhooks[1].event; did you mean webhooks[1].events?"),
            ([{"url": "http://x", "headers": {"X": 1}}], "headers must be a table of strings"),
            ([{"url": "http://x", "retries": 1.5}], "retries must be a whole number"),
            ({"url": "http://x"}, "webhooks must be a list of tables")):
        with pytest.raises(ConfigError) as caught:
            load(bad)
        assert says in str(caught.value), (bad, str(caught.value))


def test_render_failed_and_job_finished_carry_the_reason(tmp_path: Path, receivers) -> None:  # type: ignore[no-untyped-def]
    from bench.sim_gpu import write_sim_checkpoint, write_sim_lora
    from daemon.contract.loader import Plugins
    from daemon.queue import control

    receiver = Receiver()
    receivers.append(receiver)
    write_sim_checkpoint(tmp_path / "models" / "sim-a.safetensors", step_seconds=0.01)
    lora = write_sim_lora(tmp_path / "loras" / "ink.safetensors")
    config = config_from_dict({
        "plugins": ["bench.sim_gpu"],
        "intake": {"settle_seconds": 0.0, "retry_young_seconds": 0.0},
        "web": {"enabled": False},
        "webhooks": [{"url": receiver.url, "events": ["render_failed", "job_finished"]}],
    }, base=tmp_path, source=tmp_path / "config.toml")
    daemon = Daemon(config, plugins=Plugins(config.plugins))
    store = Store.for_url(config.database_url)
    store.migrate()
    control.pause(store)  # accepted, not rendered, until the LoRA is gone
    thread = run_in_thread(daemon)
    try:
        jobs = config.paths.jobs
        (jobs / "inked.toml").write_text('checkpoint = "sim-a"\nprompt = "a barn"\ncount = 1\n'
                                         'steps = 2\n[[loras]]\nname = "ink"\n')
        deadline = time.monotonic() + 60
        while not _accepted(store) and time.monotonic() < deadline:
            time.sleep(0.05)
        lora.unlink()
        control.resume(store)
        deadline = time.monotonic() + 60
        while len(receiver.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        daemon.stop()
        thread.join(timeout=120)
        store.dispose()
    assert receiver.events() == ["render_failed", "job_finished"]
    failed, finished = receiver.got
    assert "LoRA 'ink' is no longer in the library" in failed["render"]["error"]
    assert finished["state"] == "failed" and finished["outputs"] == []
    assert finished["renders"] == {"failed": 1}


def _accepted(store: Store) -> bool:
    with store.session() as session:
        return bool(session.scalars(select(Event).where(Event.kind == "job_accepted")).first())
