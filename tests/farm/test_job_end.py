"""The end of a job is acted on once, whatever ended it (daemon/runtime/job_end.py): its job
file is filed, a sweep gets its grid, and plugins get exactly one `job_finished`, for a job
ended by this daemon, recovered at start-up, or cancelled from the CLI in another process."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from daemon import hookimpl
from daemon.contract.loader import Plugins
from daemon.queue import control
from daemon.runtime.job_end import JobEnd
from daemon.runtime.runner import Daemon
from daemon.store.models import Event, Job, Store
from tests.conftest import Farm, sdxl_job
from tests.support.helpers import die_in_the_last_attempt, run_in_thread

SWEEP_JOB = """\
checkpoint = "tiny-sdxl"
prompt = "a red lighthouse"
seed = 5
steps = 2
width = 64
height = 64
sampler = "Euler"

[sweep]
cfg = [3.0, 7.0]
"""


class EventRecorder:
    """A plugin that keeps every event the daemon tells plugins (`on_event`)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    @hookimpl
    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((kind, data.get("job_id")))

    def finished(self) -> list[Any]:
        with self._lock:
            return [job_id for kind, job_id in self.events if kind == "job_finished"]


@pytest.fixture
def recorder() -> EventRecorder:
    return EventRecorder()


@pytest.fixture
def recorded_farm(tmp_path: Path, assets: Any, recorder: EventRecorder):  # type: ignore[no-untyped-def]
    """A farm whose daemons tell `recorder` their events (plugins of its own: the session's
    are shared by every test)."""
    def make(**overrides: Any) -> Farm:
        plugins = Plugins()
        plugins.manager.register(recorder, name="event-recorder")
        return Farm(tmp_path, assets, plugins, **overrides)
    return make


def finished_events(farm: Farm, job_id: int) -> int:
    """How many `job_finished` event rows (what [[webhooks]] send) job `job_id` has."""
    store = Store.for_url(farm.config.database_url)
    with store.session() as session:
        count = session.scalar(select(func.count()).select_from(Event).where(
            Event.kind == "job_finished", Event.job_id == job_id))
    store.dispose()
    return int(count or 0)


def only_job_id(farm: Farm) -> int:
    [job] = farm.history()
    return int(job["id"])


def start_and_stop(farm: Farm) -> None:
    daemon = farm.daemon()
    daemon.start()
    daemon.close()



# -- this daemon ends the job ----------------------------------------------------------------

def test_a_job_this_daemon_ends_is_acted_on_once(recorded_farm, recorder) -> None:  # type: ignore[no-untyped-def]
    farm = recorded_farm()
    farm.drop("plain.toml", sdxl_job(count=2, steps=2))
    assert farm.run() == 0
    job_id = only_job_id(farm)
    assert farm.files_in("done") == ["plain.toml"]
    assert recorder.finished() == [job_id]
    assert finished_events(farm, job_id) == 1
    # Acting on it again, or the next start's look for ends nobody acted on, does nothing.
    daemon = farm.daemon()
    daemon.start()
    assert daemon.job_end.ended(job_id) is False
    daemon.close()
    assert recorder.finished() == [job_id]
    assert finished_events(farm, job_id) == 1
    assert farm.files_in("done") == ["plain.toml"]


# -- recovered at start-up -------------------------------------------------------------------

def test_a_sweep_whose_daemon_died_before_acting_on_its_end_is_acted_on_at_start(
        recorded_farm, recorder, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    farm = recorded_farm()
    farm.drop("sweep.toml", SWEEP_JOB)
    # The daemon records the last render done (the job ends in the database) and is killed
    # before it acts on the end: no grid, the file still in processing/, no event.
    monkeypatch.setattr(JobEnd, "ended", lambda self, job_id: False)
    assert farm.run() == 0
    monkeypatch.undo()
    job_id = only_job_id(farm)
    assert farm.files_in("processing") == ["sweep.toml"]
    assert list(farm.outputs.rglob("grid.png")) == []
    assert recorder.finished() == []

    start_and_stop(farm)
    assert farm.files_in("processing") == []
    assert farm.files_in("done") == ["sweep.toml"]
    [grid] = list(farm.outputs.rglob("grid.png"))
    assert recorder.finished() == [job_id]
    assert finished_events(farm, job_id) == 1  # written with the end, not again

    start_and_stop(farm)  # once: the next start finds nothing to do
    assert recorder.finished() == [job_id]
    assert list(farm.outputs.rglob("grid.png")) == [grid]


def test_a_job_whose_daemon_was_killed_while_it_ran_is_acted_on_when_start_up_ends_it(
        recorded_farm, recorder) -> None:  # type: ignore[no-untyped-def]
    farm = recorded_farm(worker={"max_attempts": 2})
    # At its last attempt when the process dies: start-up recovery ends the render failed,
    # and with it the job.
    die_in_the_last_attempt(farm, attempts=2)
    assert recorder.finished() == []

    start_and_stop(farm)
    job_id = only_job_id(farm)
    assert farm.files_in("failed") == ["poison.toml", "poison.toml.error.txt"]
    assert "worker.max_attempts" in (farm.jobs / "failed" / "poison.toml.error.txt").read_text()
    assert recorder.finished() == [job_id]
    assert finished_events(farm, job_id) == 1
    start_and_stop(farm)
    assert recorder.finished() == [job_id]


# -- ended in another process ----------------------------------------------------------------

def test_a_cancel_from_the_cli_is_acted_on_once_and_a_retried_job_again_when_it_ends(
        recorded_farm, recorder) -> None:  # type: ignore[no-untyped-def]
    farm = recorded_farm()
    # A short lease: the heartbeat, which looks for ends in other processes, beats often.
    farm.config = dataclasses.replace(farm.config, lease_seconds=5.0)
    farm.config.ensure_folders()
    store = Store.for_path(farm.config.paths.database)
    store.migrate()
    control.pause(store, by="test")  # the job is taken in but not rendered
    daemon = farm.daemon()
    thread = run_in_thread(daemon)
    try:
        farm.drop("harbour.toml", sdxl_job(count=2, steps=2))
        farm.wait_for(lambda: farm.files_in("processing") == ["harbour.toml"])
        job_id = only_job_id(farm)

        cancelled = farm.cli("cancel", str(job_id), "--config", str(farm.root / "config.toml"))
        assert cancelled.returncode == 0, cancelled.stderr
        farm.wait_for(lambda: recorder.finished() == [job_id], timeout=60)
        time.sleep(3.0)  # more heartbeats: nothing more happens
        assert recorder.finished() == [job_id]
        assert finished_events(farm, job_id) == 1  # written by the daemon that acted
        assert farm.files_in("failed") == ["harbour.toml", "harbour.toml.error.txt"]
        # The cancel's own report, not overwritten by the daemon filing the file.
        report = (farm.jobs / "failed" / "harbour.toml.error.txt").read_text()
        assert "was cancelled by the user" in report

        control.retry_job(farm.config, store, job_id, by="test")
        control.resume(store, by="test")
        farm.wait_for(lambda: recorder.finished() == [job_id, job_id], timeout=120)
        assert farm.files_in("done") == ["harbour.toml"]
        assert finished_events(farm, job_id) == 2  # one per end
    finally:
        daemon.stop()
        thread.join(timeout=120)
        store.dispose()
    assert recorder.finished() == [job_id, job_id]


def test_two_hosts_acting_on_one_cancelled_job_act_once(
        recorded_farm, recorder, postgres_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LORAFARM_DATABASE_URL", postgres_url)
    farm = recorded_farm()
    daemon = Daemon(farm.config, plugins=farm.plugins, name="a")
    daemon.start()
    farm.drop("twice.toml", sdxl_job(count=1))
    [job_id] = daemon.intake.scan().accepted
    control.cancel_job(farm.config, daemon.store, job_id, by="test")
    # Both hosts' heartbeats look at once: one acts, the other finds the end claimed.
    stores = [Store.for_url(postgres_url) for _ in range(2)]
    ends = [JobEnd(s, farm.outputs, daemon.intake.file_finished_job, farm.plugins)
            for s in stores]
    barrier = threading.Barrier(2)
    acted: list[bool] = []

    def look(end: JobEnd) -> None:
        barrier.wait()
        acted.append(end.ended(job_id))

    threads = [threading.Thread(target=look, args=(end,)) for end in ends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(acted) == [False, True]
    for end in ends:
        assert end.sweep(older_than=0) == 0
    for s in stores:
        s.dispose()
    with daemon.store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.closed_at is not None
    daemon.close()
    assert recorder.finished() == [job_id]
    assert finished_events(farm, job_id) == 1
    assert farm.files_in("failed") == ["twice.toml", "twice.toml.error.txt"]
