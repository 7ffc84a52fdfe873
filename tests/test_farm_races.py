"""Two hosts of a farm touching one job at the same moment (PostgreSQL, which runs
transactions side by side; SQLite's single writer cannot race): reseeding two of its renders
must not give the new renders the same index and seed, ending its last two renders must end
the job, and two copies of one job file taken at once are queued once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from daemon.lifecycle import _settle_job, mark_done
from daemon.postprocess import _queue_next_seed
from daemon.spec import RenderSpec
from daemon.store import Job, Render, Store


def _spec(seed: int) -> RenderSpec:
    return RenderSpec(family="sdxl", checkpoint="tiny", prompt="p", negative_prompt="",
                      seed=seed, steps=2, cfg=5.0, sampler="Euler", schedule=None,
                      width=64, height=64)


def _job_with_two_running_renders(postgres_url: str) -> tuple[Store, int, int, int]:
    store = Store.for_url(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    store.migrate()
    with store.session() as session:
        job = Job(name="night", file_name="night.toml", content_hash="x", state="running")
        session.add(job)
        session.flush()
        job_id = job.id
        for index in range(2):
            spec = _spec(100 + index)
            session.add(Render(job_id=job.id, index=index, seed=spec.seed, state="running",
                               attempts=1, priority=0, checkpoint="tiny",
                               batch_key=spec.batch_key(), spec_json=spec.to_json()))
    with store.session() as session:
        first_id, second_id = session.scalars(select(Render.id).order_by(Render.id)).all()
    return store, job_id, first_id, second_id


def test_concurrent_reseeds_of_one_job_get_distinct_indexes(postgres_url: str) -> None:
    store, _, first_id, second_id = _job_with_two_running_renders(postgres_url)

    first_queued = threading.Event()
    release_first = threading.Event()
    second_done = threading.Event()
    errors: list[BaseException] = []

    def reseed_first() -> None:
        try:
            with store.session() as session:
                _queue_next_seed(session, session.get(Render, first_id))
                first_queued.set()
                release_first.wait(10)  # keep the transaction open: the race window
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            first_queued.set()

    def reseed_second() -> None:
        try:
            with store.session() as session:
                _queue_next_seed(session, session.get(Render, second_id))
            second_done.set()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            second_done.set()

    one = threading.Thread(target=reseed_first)
    one.start()
    assert first_queued.wait(10)
    two = threading.Thread(target=reseed_second)
    two.start()
    # The second reseed waits for the first one's transaction (the job row is locked).
    assert not second_done.wait(0.5), "the second reseed did not wait for the first"
    release_first.set()
    one.join(10)
    two.join(10)
    assert not errors, errors
    with store.session() as session:
        rows = session.execute(select(Render.index, Render.seed).order_by(Render.index)).all()
    store.dispose()
    assert [row.index for row in rows] == [0, 1, 2, 3]
    assert len({row.seed for row in rows}) == 4, rows


def test_two_hosts_ending_a_jobs_last_renders_at_once_end_the_job(postgres_url: str) -> None:
    """Host A records render 1 done and, before it commits, host B records render 2 done.
    Each transaction alone sees the other render still running; without the job row lock
    neither ends the job, which then stays `running` with every render done (its file never
    reaches done/). With it, B waits for A and ends the job."""
    store, job_id, first_id, second_id = _job_with_two_running_renders(postgres_url)
    ended: list[int | None] = []
    b_done = threading.Event()

    def host_b() -> None:
        ended.append(mark_done(store, second_id, "/out/2.png", 0.1))
        b_done.set()

    with store.session() as session:  # host A's transaction
        render = session.get(Render, first_id)
        assert render is not None
        render.state, render.output_path = "done", "/out/1.png"
        assert _settle_job(session, job_id) is None  # render 2 is still running for A
        other = threading.Thread(target=host_b)
        other.start()
        assert not b_done.wait(0.5), "host B did not wait for host A's transaction"
    other.join(10)
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        state = job.state
    store.dispose()
    assert ended == [job_id]
    assert state == "done"


def test_two_hosts_taking_copies_of_one_job_at_once_queue_it_once(
        postgres_url: str, assets: Any, plugins: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies of one job file (a.toml, b.toml) dropped into a shared jobs/ and taken by two
    hosts at once: each finds no unfinished twin before the other has committed. Host A is
    held inside its insert; host B must wait for it, look again, and reject its copy as a
    duplicate instead of queueing the same content a second time."""
    import daemon.intake as intake_module
    from daemon.runner import Daemon
    from tests.conftest import Farm, sdxl_job

    monkeypatch.setenv("LORAFARM_DATABASE_URL", postgres_url)
    shared = tmp_path / "jobs"
    hosts = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        farm = Farm(tmp_path / name, assets, plugins, paths={"jobs": str(shared)})
        hosts.append(Daemon(farm.config, plugins=plugins, name=f"host-{name}"))
    dropper = farm  # either host's Farm drops into the shared jobs/
    host_a, host_b = hosts
    host_a.start()
    host_b.start()

    inside, release = threading.Event(), threading.Event()
    real_add_event = intake_module.add_event

    def held_add_event(session, kind, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kind == "job_accepted" and threading.current_thread().name == "host-a":
            inside.set()
            release.wait(10)  # host A's transaction stays open: the race window
        return real_add_event(session, kind, *args, **kwargs)

    monkeypatch.setattr(intake_module, "add_event", held_add_event)
    results: dict[str, Any] = {}

    def scan(host: Daemon, key: str) -> None:
        results[key] = host.intake.scan()

    text = sdxl_job(count=1)
    dropper.drop("a.toml", text)
    one = threading.Thread(target=scan, args=(host_a, "a"), name="host-a")
    one.start()
    assert inside.wait(10)
    dropper.drop("b.toml", text)
    two = threading.Thread(target=scan, args=(host_b, "b"), name="host-b")
    two.start()
    two.join(0.5)
    assert two.is_alive(), "host B did not wait for host A's insert"
    release.set()
    one.join(10)
    two.join(10)
    host_a.close()
    host_b.close()
    assert len(results["a"].accepted) == 1
    assert results["b"].accepted == [] and results["b"].rejected == ["b.toml"]
    report = (shared / "rejected" / "b.toml.error.txt").read_text()
    assert "already queued as job" in report and "a.toml" in report
