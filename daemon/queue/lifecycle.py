"""State changes of renders and jobs after the claim: done, failed, put back, recovered.

Every change here happens in one transaction together with its event row, so the history
always says why a render is in the state it is in.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
from pathlib import Path

from sqlalchemy import func, or_, select, update

from daemon.store.models import (
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    RENDER_CANCELLED,
    RENDER_DONE,
    RENDER_FAILED,
    RENDER_QUEUED,
    RENDER_RUNNING,
    Batch,
    Event,
    Job,
    Render,
    Store,
    add_event,
    lease_now,
    utcnow,
)


def _holds(render: Render | None, worker: str | None) -> bool:
    """Whether `worker` still holds this render's running attempt. A daemon whose lease
    expired may finish late: its render was re-queued (perhaps rendered by another host), and
    its result must not be recorded a second time."""
    return (render is not None and render.state == RENDER_RUNNING
            and (worker is None or render.worker == worker))


def _locked(session, render_id: int) -> Render | None:  # type: ignore[no-untyped-def]
    """The render row, locked and read afresh: between a check of who holds it and the
    write, another host's heartbeat may re-queue it and a third host claim it (PostgreSQL;
    the lease recovery skips locked rows, so it passes over this one)."""
    return session.get(Render, render_id, with_for_update=True, populate_existing=True)


def mark_done(store: Store, render_id: int, output_path: str, seconds: float,
              lora_report: dict[str, dict[str, int]] | None = None,
              video: tuple[int, int] | None = None, worker: str | None = None) -> int | None:
    """Record a finished render; returns its job id when that job has now ended."""
    with store.session() as session:
        render = _locked(session, render_id)
        if not _holds(render, worker):
            return None  # cancelled or lease lost meanwhile: not counted twice
        render.state, render.output_path, render.error = RENDER_DONE, output_path, None
        render.lora_report_json = json.dumps(lora_report) if lora_report else None
        if video is not None:
            render.frames, render.fps = video
        render.finished_at = utcnow()
        add_event(session, "render_done", output_path, job_id=render.job_id,
                  render_id=render_id, seconds=round(seconds, 4))
        return _settle_job(session, render.job_id)


def mark_failed(store: Store, render_id: int, error: str,
                worker: str | None = None) -> int | None:
    """Record a render that cannot succeed; returns its job id when that job has now ended."""
    with store.session() as session:
        render = _locked(session, render_id)
        if not _holds(render, worker):
            return None
        render.state, render.error, render.finished_at = RENDER_FAILED, error, utcnow()
        add_event(session, "render_failed", error, job_id=render.job_id, render_id=render_id)
        return _settle_job(session, render.job_id)


def put_back(store: Store, render_ids: list[int], reason: str, *,
             count_attempt: bool = False, max_attempts: int | None = None,
             worker: str | None = None) -> list[int]:
    """Return running renders to the queue (an abort, or a transient error such as a full
    disk). With `count_attempt`, a render that has used `max_attempts` ends failed instead.
    `worker`: only renders it still holds (another host may have taken one over after this
    one's lease ran out). Returns the ids of jobs that ended."""
    ended: list[int] = []
    query = select(Render).where(Render.id.in_(render_ids), Render.state == RENDER_RUNNING)
    if worker is not None:
        query = query.where(Render.worker == worker)
    with store.session() as session:
        for render in session.scalars(query.with_for_update()):
            if count_attempt and max_attempts is not None and render.attempts >= max_attempts:
                render.state, render.finished_at = RENDER_FAILED, utcnow()
                render.error = f"{reason} (gave up after {render.attempts} attempts)"
                add_event(session, "render_failed", render.error, job_id=render.job_id,
                          render_id=render.id)
                if _settle_job(session, render.job_id) is not None:
                    ended.append(render.job_id)
                continue
            if _job_ended(session, render):
                continue
            render.state = RENDER_QUEUED
            render.worker = None
            if not count_attempt:
                render.attempts = max(0, render.attempts - 1)
            add_event(session, "render_requeued", reason, job_id=render.job_id,
                      render_id=render.id)
    return ended


# A render that was running alone when the process died, but had not reached its pipeline
# call (loading its model, its LoRAs), is not blamed: a kill from outside lands there as
# often as anywhere. Dying there this many times the attempt cap is evidence all the
# same (a model whose load kills the process), so that it cannot restart the daemon forever.
LOADING_DEATHS_PER_ATTEMPT = 10


def recover_interrupted(store: Store, max_attempts: int, *, holder_prefix: str | None = None,
                        lease_seconds: float | None = None) -> tuple[list[int], list[int]]:
    """Renders left `running` by a dead process go back to the queue, marked to run alone
    before the rest of it, unless the evidence says they kill the process.

    Only evidence counts against a render: a death uses up an attempt only when the render
    was running alone (a batch of one) and had reached its pipeline
    call (the worker records progress step 0 just before it). A batch-mate, or a render
    caught while its model loaded, gets its attempt back; run alone next time, it is either
    rendered or caught in the act. A render that kills the process every time ends failed
    at `max_attempts`, with the reason.

    With neither filter (a lone daemon at start-up, which holds the state lock): every
    running render. In a farm: those held by `holder_prefix` (this daemon's earlier life)
    and those whose lease expired (no heartbeat for `lease_seconds`).
    Returns (requeued render ids, job ids that ended)."""
    requeued: list[int] = []
    ended_jobs: list[int] = []
    query = select(Render).where(Render.state == RENDER_RUNNING)
    conditions = []
    if holder_prefix is not None:
        conditions.append(Render.worker.startswith(holder_prefix))
    with store.session() as session:
        if lease_seconds is not None:
            cutoff = lease_now(session) - dt.timedelta(seconds=lease_seconds)
            conditions.append(Render.heartbeat_at < cutoff)
        if conditions:
            query = query.where(or_(*conditions))
        stale = session.scalars(query.with_for_update(skip_locked=True)).all()
        batch_sizes = dict(session.execute(select(Batch.id, Batch.renders).where(
            Batch.id.in_({r.batch_id for r in stale if r.batch_id is not None}))).all())
        for render in stale:
            alone = batch_sizes.get(render.batch_id) == 1
            blamed = alone and render.progress_total is not None
            render.deaths += 1
            if not blamed:
                render.attempts = max(0, render.attempts - 1)
            loading_limit = LOADING_DEATHS_PER_ATTEMPT * max_attempts
            reason: str | None = None
            if blamed and render.attempts >= max_attempts:
                reason = (f"the daemon died during this render {render.attempts} times "
                          f"(limit worker.max_attempts = {max_attempts}; only deaths while it "
                          "rendered alone count); it may crash the process (out of memory?), "
                          "so it is not tried again")
            elif alone and render.deaths >= loading_limit:
                reason = (f"the daemon died {render.deaths} times while this render was "
                          f"starting (limit {LOADING_DEATHS_PER_ATTEMPT} x worker.max_attempts "
                          f"= {loading_limit}), the last time while it ran alone; loading its "
                          "model or LoRAs may crash the process (out of memory?), so it is "
                          "not tried again")
            if reason is not None:
                render.state, render.error, render.finished_at = RENDER_FAILED, reason, utcnow()
                add_event(session, "render_failed", render.error, job_id=render.job_id,
                          render_id=render.id)
                if _settle_job(session, render.job_id) is not None:
                    ended_jobs.append(render.job_id)
            elif _job_ended(session, render):
                continue
            else:
                render.state, render.worker = RENDER_QUEUED, None
                requeued.append(render.id)
                why = ("it rendered alone: the attempt counts" if blamed else
                       "not blamed (" + ("its model was loading" if alone
                                         else "other renders were running too") + ")")
                add_event(session, "render_requeued",
                          f"interrupted during attempt {render.attempts + (not blamed)} "
                          f"({why}); queued again, to run alone", job_id=render.job_id,
                          render_id=render.id, blamed=blamed, deaths=render.deaths)
        # Jobs marked running whose renders are all queued again look queued.
        session.execute(update(Job).where(Job.state == JOB_RUNNING, ~Job.renders.any(
            Render.state.in_((RENDER_RUNNING, RENDER_DONE, RENDER_FAILED)))).values(
            state=JOB_QUEUED))
    return requeued, ended_jobs


def fault_point(name: str) -> None:
    """Die here, as a SIGKILL would, when the environment variable LORAFARM_FAULT_POINT
    names this point: the restart tests and the soak stop the daemon between two writes
    that a crash can separate. Does nothing otherwise."""
    if os.environ.get("LORAFARM_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def stale_outputs(store: Store, outputs: Path) -> list[Path]:
    """Output files of renders that are not done: a crash after the rename but before the
    database recorded it. The render runs again and writes the same name; until then the
    file must not count, so start-up removes it."""
    from daemon.folders import output_path

    found: dict[int, list[Path]] = {}
    with store.session() as session:
        rows = session.execute(select(Render.id, Render.job_id, Job.name, Render.index,
                                      Render.seed)
                               .join(Job, Job.id == Render.job_id)
                               .where(Render.state == RENDER_QUEUED)).all()
    for render_id, job_id, job_name, index, seed in rows:
        for suffix in (".png", ".mp4"):
            path = output_path(outputs, job_id, job_name, index, seed, suffix)
            if path.exists():
                found.setdefault(render_id, []).append(path)
    if not found:
        return []
    # Looking at every file takes a while on a network share with a long queue; on a farm
    # another host may have rendered and recorded one of them meanwhile: that file stays.
    with store.session() as session:
        still = set(session.scalars(select(Render.id).where(
            Render.id.in_(list(found)), Render.state == RENDER_QUEUED)))
    return [path for render_id, paths in found.items() if render_id in still
            for path in paths]


def _job_ended(session, render: Render) -> bool:  # type: ignore[no-untyped-def]
    """A render whose job has already ended (cancelled by the user while it ran) is not put
    back in the queue: it ends cancelled."""
    # Locked: a cancel committing now must be seen, or the render would go back to the
    # queue of a job that has ended.
    job = lock_job(session, render.job_id)
    if job is None or job.state in (JOB_QUEUED, JOB_RUNNING):
        return False
    render.state, render.worker, render.finished_at = RENDER_CANCELLED, None, utcnow()
    add_event(session, "render_cancelled", f"its job is {job.state}", job_id=render.job_id,
              render_id=render.id)
    return True


def lock_job(session, job_id: int) -> Job | None:  # type: ignore[no-untyped-def]
    """The job row, locked and read afresh, before any change the caller has pending is
    flushed. FOR NO KEY UPDATE: it orders settles, cancels and reseeds of one job, but does
    not block a claim's foreign-key checks on its renders (those take KEY SHARE)."""
    with session.no_autoflush:
        return session.get(Job, job_id, with_for_update={"key_share": True},
                           populate_existing=True)


def _settle_job(session, job_id: int) -> int | None:  # type: ignore[no-untyped-def]
    """End the job when none of its renders is queued or running; returns its id then.

    The job row is locked first (PostgreSQL; SQLite has one writer anyway): two hosts ending
    a job's last two renders at the same moment would each see the other's render still
    running in its own transaction, and neither would end the job. With the lock, the second
    waits for the first to commit and then sees both renders done. The job is locked before
    the caller's render change is flushed, in the order a cancel takes the two rows."""
    job = lock_job(session, job_id)
    if job is None or job.state in (JOB_DONE, JOB_FAILED):
        return None
    states = list(session.scalars(select(Render.state).where(Render.job_id == job_id)))
    if any(s in (RENDER_QUEUED, RENDER_RUNNING) for s in states):
        return None
    job.state = JOB_FAILED if RENDER_FAILED in states else JOB_DONE
    job.finished_at = utcnow()
    failed = states.count(RENDER_FAILED)
    add_event(session, "job_finished", f"{job.file_name}: {job.state}", job_id=job.id,
              renders=len(states), failed=failed)
    return job.id


# -- acting on a job's end ------------------------------------------------------------------

def claim_job_end(store: Store, job_id: int) -> bool:
    """Take the right to act on job `job_id`'s end (file its job file, write its grid, tell
    the plugins): True for the one caller that finds the job ended and not yet closed, once
    per end; False for every other (the job runs, or its end is claimed already, by this
    daemon or another host). `retry_job` opens the job again, so its next end is claimed
    anew.

    Every end gets one `job_finished` event row (what [[webhooks]] send): `_settle_job`
    writes it with the end; an end that does not go through it (a cancel) gets it here, in
    the claim's transaction, so that the daemon acting on the end sends it."""
    with store.session() as session:
        job = lock_job(session, job_id)
        if job is None or job.state not in (JOB_DONE, JOB_FAILED) or job.closed_at is not None:
            return False
        job.closed_at = utcnow()
        if not _end_recorded(session, job_id):
            states = list(session.scalars(select(Render.state).where(Render.job_id == job_id)))
            add_event(session, "job_finished", f"{job.file_name}: {job.state}"
                      + (f" ({job.error})" if job.error else ""), job_id=job.id,
                      renders=len(states), failed=states.count(RENDER_FAILED),
                      cancelled=states.count(RENDER_CANCELLED))
    return True


def _end_recorded(session, job_id: int) -> bool:  # type: ignore[no-untyped-def]
    """Whether the job's latest end has its `job_finished` event: one after the job's last
    retry (or any, for a job never retried)."""
    last_retry = session.scalar(select(func.max(Event.id)).where(
        Event.job_id == job_id, Event.kind == "job_retried")) or 0
    return session.scalars(select(Event.id).where(
        Event.job_id == job_id, Event.kind == "job_finished", Event.id > last_retry)
        .limit(1)).first() is not None


def unclosed_jobs(store: Store, older_than: float) -> tuple[list[int], int]:
    """Jobs that ended but whose end nobody has acted on (`claim_job_end`): ended in another
    process (a cancel from the CLI, a host that died), or here by a daemon killed before it
    acted. Returns those that ended more than `older_than` seconds ago, and how many ended
    more recently (the process that ended them is likely acting on them right now)."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than)
    with store.session() as session:
        rows = session.execute(select(Job.id, Job.finished_at).where(
            Job.state.in_((JOB_DONE, JOB_FAILED)), Job.closed_at.is_(None))
            .order_by(Job.id)).all()
    ready = [job_id for job_id, finished_at in rows
             if finished_at is None or finished_at <= cutoff]
    return ready, len(rows) - len(ready)
