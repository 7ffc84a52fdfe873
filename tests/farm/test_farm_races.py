"""Two hosts of a farm touching one job at the same moment (PostgreSQL, which runs
transactions side by side; SQLite's single writer cannot race): reseeding two of its renders
must not give the new renders the same index and seed, ending its last two renders must end
the job, two copies of one job file taken at once are queued once; a host whose lease ran out
records nothing over the host that took its render over; a cancel racing a re-queue or a
claim leaves nothing of the job to run, without a deadlock."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import event, select

import daemon.queue.control as control
import daemon.queue.lifecycle as lifecycle
from daemon.contract.results import PostProcessResult
from daemon.contract.spec import RenderSpec
from daemon.output.postprocess import _queue_next_seed, record_result
from daemon.queue.lifecycle import (
    _settle_job,
    mark_done,
    mark_failed,
    put_back,
    recover_interrupted,
    stale_outputs,
)
from daemon.queue.scheduler import claim_next_batch
from daemon.store.models import Job, Render, Store, utcnow


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
    import daemon.intake.hot_folder as intake_module
    from daemon.runtime.runner import Daemon
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


# --- a host whose lease ran out, cancels, reseeds ----------------------------------------

CONFIG = SimpleNamespace(paths=SimpleNamespace(jobs=Path("/nonexistent-jobs")))  # no files
RESEED = PostProcessResult(scores={"aesthetic": 0.1}, gate="reseed", gate_reason="low",
                           gate_score=0.1)


def _farm_job(postgres_url: str, renders: list[tuple[str, str | None]], *,
              job_state: str = "running", stale: bool = True) -> tuple[Store, int, list[int]]:
    """A job with renders in the given (state, worker) pairs; `stale`: their leases ran out
    an hour ago, as a dead host's do."""
    store = Store.for_url(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    store.migrate()
    beat = utcnow() - dt.timedelta(hours=1) if stale else utcnow()
    ids = []
    with store.session() as session:
        job = Job(name="night", file_name="night.toml", content_hash="x", state=job_state)
        session.add(job)
        session.flush()
        for index, (state, worker) in enumerate(renders):
            spec = _spec(100 + index)
            render = Render(job_id=job.id, index=index, seed=spec.seed, state=state,
                            attempts=1 if worker else 0, priority=0, checkpoint="tiny",
                            worker=worker, heartbeat_at=beat, batch_key=spec.batch_key(),
                            spec_json=spec.to_json())
            session.add(render)
            session.flush()
            ids.append(render.id)
        job_id = job.id
    return store, job_id, ids


def _state(store: Store, render_id: int) -> tuple[str, str | None]:
    with store.session() as session:
        render = session.get(Render, render_id)
        assert render is not None
        return render.state, render.worker


def _job_state(store: Store, job_id: int) -> str:
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def test_a_render_being_recorded_is_not_taken_over_meanwhile(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host A, whose lease has just run out, is recording its render as failed. Host B's
    heartbeat must not hand that render to host C in the middle of it (C's success would
    then be overwritten by A's stale failure): the render row is locked while A records."""
    store, job_id, (mine,) = _farm_job(postgres_url, [("running", "A/w0")])
    inside, release = threading.Event(), threading.Event()
    real_settle = lifecycle._settle_job

    def held_settle(session, settled_job):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "host-a":
            inside.set()
            release.wait(10)
        return real_settle(session, settled_job)

    monkeypatch.setattr(lifecycle, "_settle_job", held_settle)
    host_a = threading.Thread(target=mark_failed, args=(store, mine, "A: CUDA error"),
                              kwargs={"worker": "A/w0"}, name="host-a")
    host_a.start()
    assert inside.wait(10)
    requeued, _ = recover_interrupted(store, 3, lease_seconds=60)  # host B's heartbeat
    claimed = claim_next_batch(store, 4, worker="C/w0")
    release.set()
    host_a.join(10)
    assert requeued == [] and claimed == []
    assert _state(store, mine) == ("failed", "A/w0")
    assert _job_state(store, job_id) == "failed"
    store.dispose()


def test_a_late_host_puts_back_or_scores_only_renders_it_still_holds(
        postgres_url: str) -> None:
    """A's lease ran out and C took its render over. A's put-back (disk full, second stop
    signal) and A's post-processing result must leave C's render alone: no second run, no
    second reseed."""
    store, job_id, (render,) = _farm_job(postgres_url, [("running", "A/w0")])
    recover_interrupted(store, 3, lease_seconds=60)
    assert [c.render_id for c in claim_next_batch(store, 4, worker="C/w0")] == [render]
    put_back(store, [render], "aborted by a second stop signal", worker="A/w0")
    assert _state(store, render) == ("running", "C/w0")
    assert record_result(store, render, RESEED, worker="A/w0") is None
    assert record_result(store, render, RESEED, worker="C/w0") is not None
    with store.session() as session:
        count = len(session.scalars(select(Render.id).where(Render.job_id == job_id)).all())
    store.dispose()
    assert count == 2  # one reseed, C's


def test_a_render_requeued_while_its_job_is_cancelled_does_not_run(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host B's heartbeat is putting a dead host's render back in the queue when the user
    cancels the job. The cancel waits for it and then cancels the re-queued render; nothing
    of the job is claimed afterwards."""
    store, job_id, (render, _) = _farm_job(postgres_url, [("running", "A/w0"),
                                                          ("queued", None)])
    inside, release = threading.Event(), threading.Event()
    real_ended = lifecycle._job_ended

    def held_ended(session, row):  # type: ignore[no-untyped-def]
        ended = real_ended(session, row)
        inside.set()
        release.wait(10)
        return ended

    monkeypatch.setattr(lifecycle, "_job_ended", held_ended)
    heartbeat = threading.Thread(target=recover_interrupted, args=(store, 3),
                                 kwargs={"lease_seconds": 60})
    heartbeat.start()
    assert inside.wait(10)
    result: dict[str, Any] = {}
    cancel = threading.Thread(
        target=lambda: result.setdefault("cancel", control.cancel_job(CONFIG, store, job_id)))
    cancel.start()
    cancel.join(0.5)
    assert cancel.is_alive(), "the cancel did not wait for the heartbeat's re-queue"
    release.set()
    heartbeat.join(10)
    cancel.join(10)
    assert "2 queued render(s) cancelled" in result["cancel"].message
    assert _state(store, render)[0] == "cancelled"
    assert claim_next_batch(store, 4, worker="C/w0") == []
    store.dispose()


def test_a_reseed_after_a_cancel_queues_nothing(postgres_url: str) -> None:
    """A render left running by a cancel finishes below the quality gate: the job has ended,
    so no new seed is queued (it would run in a cancelled job, and nothing would end it)."""
    store, job_id, (render,) = _farm_job(postgres_url, [("running", "A/w0")], stale=False)
    control.cancel_job(CONFIG, store, job_id)
    assert record_result(store, render, RESEED, worker="A/w0") is None
    assert mark_done(store, render, "/out/a.png", 1.0, worker="A/w0") is None
    assert _job_state(store, job_id) == "failed"
    assert claim_next_batch(store, 4, worker="B/w0") == []
    store.dispose()


def test_a_queued_render_of_an_ended_job_is_cancelled_not_claimed(postgres_url: str) -> None:
    """Whatever left it queued, a render of a job that has ended is never rendered: the
    claim ends it cancelled and hands out the next work instead."""
    store, job_id, (render,) = _farm_job(postgres_url, [("queued", None)], job_state="failed",
                                         stale=False)
    assert claim_next_batch(store, 4, worker="C/w0") == []
    assert _state(store, render) == ("cancelled", None)
    store.dispose()


def test_a_cancel_and_a_claim_at_once_neither_deadlock_nor_overwrite(
        postgres_url: str) -> None:
    """Host C is claiming the job's first render (it holds the render row and is about to
    mark the job running) when the user cancels. The cancel does not wait for C's render
    (that would deadlock: C waits for the job row) but leaves it to C, as it leaves running
    renders; it cancels the other one. C's render is not overwritten."""
    store, job_id, (first, second) = _farm_job(postgres_url, [("queued", None),
                                                              ("queued", None)],
                                               job_state="queued", stale=False)
    at_job_update, go = threading.Event(), threading.Event()

    @event.listens_for(store.engine, "before_cursor_execute")
    def hold(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "claim" and statement.startswith("UPDATE jobs"):
            at_job_update.set()
            go.wait(10)

    outcome: dict[str, Any] = {}

    def run(key: str, call: Any) -> None:
        try:
            outcome[key] = call()
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            outcome[key] = exc

    claim = threading.Thread(target=run, name="claim", args=(
        "claim", lambda: claim_next_batch(store, 1, worker="C/w0")))
    claim.start()
    assert at_job_update.wait(10)
    cancel = threading.Thread(target=run, args=(
        "cancel", lambda: control.cancel_job(CONFIG, store, job_id)))
    cancel.start()
    cancel.join(10)
    go.set()
    claim.join(10)
    assert not isinstance(outcome.get("cancel"), Exception), outcome
    assert not isinstance(outcome.get("claim"), Exception), outcome
    assert [c.render_id for c in outcome["claim"]] == [first]
    assert "1 queued render(s) cancelled" in outcome["cancel"].message
    assert _state(store, first) == ("running", "C/w0")
    assert _state(store, second)[0] == "cancelled"
    assert _job_state(store, job_id) == "failed"
    store.dispose()


def test_start_up_keeps_the_output_of_a_render_another_host_finished_meanwhile(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host starting looks for output files of queued renders (left by a crash before the
    render was recorded) to remove them. Looking takes a while on a share; another host
    renders and records one of those renders meanwhile: its output is not removed."""
    import daemon.folders as outputs_module

    store, _, (render,) = _farm_job(postgres_url, [("queued", None)], job_state="queued",
                                    stale=False)
    real_path = outputs_module.output_path
    finished: list[Path] = []

    def path_while_another_host_finishes(*args: Any) -> Path:
        path = real_path(*args)
        if not finished:  # host C renders and records it while this host looks
            assert [c.render_id for c in claim_next_batch(store, 1, worker="C/w0")] == [render]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"png")
            mark_done(store, render, str(path), 1.0, worker="C/w0")
            finished.append(path)
        return path

    monkeypatch.setattr(outputs_module, "output_path", path_while_another_host_finishes)
    assert stale_outputs(store, tmp_path / "outputs") == []
    assert _state(store, render)[0] == "done"
    store.dispose()


def test_leases_are_judged_by_the_databases_clock(postgres_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Host B's clock runs an hour ahead of host A's. A render A heartbeats now is not taken
    from it by B's lease check: leases are written and judged by the database's clock."""
    import daemon.queue.hosts as hosts_module
    import daemon.queue.scheduler as scheduler_module

    store, _, (render,) = _farm_job(postgres_url, [("running", "A/w0")])  # lease ran out
    hosts_module.heartbeat(store, "A", {})  # host A renews it
    ahead = utcnow() + dt.timedelta(hours=1)
    for module in (lifecycle, hosts_module, scheduler_module):
        monkeypatch.setattr(module, "utcnow", lambda: ahead, raising=False)
    requeued, _ = recover_interrupted(store, 3, lease_seconds=60)  # host B's heartbeat
    assert requeued == []
    assert _state(store, render) == ("running", "A/w0")
    store.dispose()
