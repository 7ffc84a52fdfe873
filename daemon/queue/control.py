"""The control verbs: pause, resume, cancel a job, retry a job.

Each verb is one function that both the status page and the CLI call, so the two can never
disagree about what a verb does. Every verb writes its change and an event row in one
transaction (the history says who did what, when), and moves the job file afterwards, as
intake does: database first, file second, so `Intake.reconcile()` can repair a crash between
the two.

What cancel means (no new job state, so the schema, `_settle_job` and the folders stay as
they are):

- Queued renders of the job end `cancelled` at once; nothing more of the job is started.
- Renders already running are left to finish: the picture is half computed, and the pipeline
  call cannot be interrupted safely. When they end they are recorded as usual (done or
  failed), but the job does not change any more.
- The job ends `failed` with the error "cancelled by the user" right away, and its file goes
  from processing/ to failed/ with an error file saying so. The daemon then acts on the end
  as on any other (daemon/runtime/job_end.py: sweep grid, `job_finished` for plugins and
  webhooks), whether the cancel came from its page or from the CLI in another process.
  `failed` is the job state that already means "did not end as asked" to the folders, the
  history and reconcile; a separate `cancelled` job state would need every one of them to
  learn it.

What retry means: a `failed` job (which includes a cancelled one) gets its failed and
cancelled renders queued again with their attempts reset; renders that are done stay done.
The old errors are not overwritten silently: each is kept in a `render_retried` /
`job_retried` event first. The job is queued again and its file goes from failed/ back to
processing/ (its stale error file is removed: the events keep what it said).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from daemon.config import Config
from daemon.folders import unique_destination, write_error_file
from daemon.queue.lifecycle import lock_job
from daemon.store.models import (
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_REJECTED,
    JOB_RUNNING,
    PAUSED_KEY,
    RENDER_CANCELLED,
    RENDER_FAILED,
    RENDER_QUEUED,
    RENDER_RUNNING,
    Job,
    Render,
    Setting,
    Store,
    add_event,
    utcnow,
)
from daemon.store.queries import is_paused_in

log = logging.getLogger(__name__)

CANCELLED_ERROR = "cancelled by the user"


class ControlError(Exception):
    """A verb cannot be done; the message says why and what to do instead."""

    status = 409  # the HTTP status the page answers with


class UnknownJobError(ControlError):
    status = 404


@dataclass(frozen=True)
class ControlResult:
    """What a verb did, for the page (JSON) and the CLI (one line)."""

    action: str
    message: str
    job_id: int | None = None
    render_ids: tuple[int, ...] = ()
    still_running: tuple[int, ...] = ()  # cancel: renders left to finish
    file_path: str | None = None  # where the job file is now
    extra: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"ok": True, "action": self.action, "message": self.message,
                "job_id": self.job_id, "render_ids": list(self.render_ids),
                "still_running": list(self.still_running), "file_path": self.file_path,
                **self.extra}


def parse_job_id(text: str | int) -> int:
    """A job id as the user typed it ("12", "job12", "#12"); ControlError when it is none."""
    if isinstance(text, int):
        value = text
    else:
        cleaned = text.strip().lower().removeprefix("job").lstrip("#").strip()
        if not cleaned.isdigit():
            raise UnknownJobError(f"{text!r} is not a job id; job ids are numbers "
                                  "(`lorafarm history` lists them)")
        value = int(cleaned)
    if value < 1:
        raise UnknownJobError(f"{text!r} is not a job id; job ids start at 1")
    return value


# -- pause / resume ------------------------------------------------------------------------

def is_paused(store: Store) -> bool:
    """True while the daemon must not claim new renders (running ones still finish)."""
    with store.session() as session:
        return is_paused_in(session)


def pause(store: Store, *, by: str = "cli") -> ControlResult:
    """Stop claiming new renders; what is running finishes. Pausing twice is harmless."""
    return _set_paused(store, True, by)


def resume(store: Store, *, by: str = "cli") -> ControlResult:
    return _set_paused(store, False, by)


def _set_paused(store: Store, paused: bool, by: str) -> ControlResult:
    action = "pause" if paused else "resume"
    with store.session() as session:
        setting = session.get(Setting, PAUSED_KEY)
        was = setting is not None and setting.value == "1"
        if setting is None:
            setting = Setting(key=PAUSED_KEY, value="0")
            session.add(setting)
        setting.value, setting.updated_at = ("1" if paused else "0"), utcnow()
        if was == paused:
            message = "already paused" if paused else "not paused; nothing to resume"
        else:
            message = ("paused: no new renders start; running ones finish" if paused
                       else "resumed: queued renders start again")
            add_event(session, "paused" if paused else "resumed", message, by=by)
    log.info("%s by %s: %s", action, by, message)
    return ControlResult(action=action, message=message, extra={"paused": paused})


# -- cancel --------------------------------------------------------------------------------

def cancel_job(config: Config, store: Store, job_id: int | str, *,
               by: str = "cli") -> ControlResult:
    """Cancel a queued or running job (see the module docstring for what that means)."""
    job_id = parse_job_id(job_id)
    now = utcnow()
    with store.session() as session:
        job = _get_job(session, job_id)
        if job.state not in (JOB_QUEUED, JOB_RUNNING):
            raise ControlError(_ended_message(job, "cancel"))
        cancelled: list[int] = []
        # SKIP LOCKED: a render a host is claiming this instant is left to it (it runs, as
        # a running render does after a cancel); waiting for it would deadlock, as that
        # claim waits for the job row this cancel holds.
        for render in session.scalars(select(Render).where(
                Render.job_id == job.id, Render.state == RENDER_QUEUED)
                .with_for_update(skip_locked=True)):
            render.state, render.error, render.finished_at = RENDER_CANCELLED, \
                CANCELLED_ERROR, now
            cancelled.append(render.id)
            add_event(session, "render_cancelled", CANCELLED_ERROR, job_id=job.id,
                      render_id=render.id, by=by)
        running = [r.id for r in job.renders if r.state == RENDER_RUNNING]
        # The job ends now, so `_settle_job` leaves it alone when the running renders end.
        job.state, job.error, job.finished_at = JOB_FAILED, CANCELLED_ERROR, now
        add_event(session, "job_cancelled", f"{job.file_name}: {CANCELLED_ERROR}",
                  job_id=job.id, by=by, cancelled=cancelled, still_running=running)
        file_name, file_path = job.file_name, job.file_path
        lines = [f"render {r.index} (seed {r.seed}): {r.state}"
                 + (" (was running; left to finish)" if r.id in running else "")
                 for r in job.renders]
    report = (f"{file_name} (job {job_id}) was cancelled by the user.\n\n" + "\n".join(lines)
              + "\n\nTo run the rest anyway: `lorafarm retry " + str(job_id) + "` (or the Retry "
              "button on the job's page).\n")
    new_path = _move_job_file(config, store, job_id, file_name, file_path, "failed", report)
    message = f"job {job_id} cancelled: {len(cancelled)} queued render(s) cancelled"
    if running:
        message += f", {len(running)} running render(s) left to finish"
    log.info("%s (by %s)", message, by)
    return ControlResult(action="cancel", message=message, job_id=job_id,
                         render_ids=tuple(cancelled), still_running=tuple(running),
                         file_path=str(new_path) if new_path else file_path)


# -- retry ---------------------------------------------------------------------------------

def retry_job(config: Config, store: Store, job_id: int | str, *,
              by: str = "cli") -> ControlResult:
    """Queue a failed (or cancelled) job's failed and cancelled renders again."""
    job_id = parse_job_id(job_id)
    with store.session() as session:
        job = _get_job(session, job_id)
        if job.state == JOB_REJECTED:
            raise ControlError(f"job {job_id} ({job.file_name}) was rejected at intake, so it "
                               "has no renders to retry; fix the file (see its .error.txt in "
                               "jobs/rejected/) and drop it into jobs/ again")
        if job.state != JOB_FAILED:
            raise ControlError(f"job {job_id} ({job.file_name}) is {job.state}; only failed or "
                               "cancelled jobs can be retried")
        again = [r for r in job.renders if r.state in (RENDER_FAILED, RENDER_CANCELLED)]
        if not again:
            raise ControlError(f"job {job_id} ({job.file_name}) has no failed or cancelled "
                               "renders left to retry (the ones that were running when it was "
                               "cancelled have finished)")
        # The old reasons go into the log before they are cleared from the rows.
        add_event(session, "job_retried", f"{job.file_name}: was failed: {job.error or ''}",
                  job_id=job.id, by=by, previous_error=job.error,
                  renders=[r.id for r in again])
        for render in again:
            add_event(session, "render_retried",
                      f"was {render.state} after {render.attempts} attempt(s): {render.error}",
                      job_id=job.id, render_id=render.id, by=by, previous_state=render.state,
                      previous_error=render.error, previous_attempts=render.attempts,
                      previous_deaths=render.deaths)
            render.state, render.attempts, render.error = RENDER_QUEUED, 0, None
            render.deaths = 0  # afresh: a retry is not held to the deaths it was failed for
            render.output_path = render.lora_report_json = None
            render.progress_step = render.progress_total = None
            render.started_at = render.finished_at = render.heartbeat_at = None
            render.worker, render.batch_id = None, None
        job.state, job.error, job.finished_at = JOB_QUEUED, None, None
        job.closed_at = None  # its next end is acted on again (lifecycle.claim_job_end)
        render_ids = tuple(r.id for r in again)
        file_name, file_path = job.file_name, job.file_path
    new_path = _move_job_file(config, store, job_id, file_name, file_path, "processing", None)
    message = f"job {job_id} queued again: {len(render_ids)} render(s)"
    if new_path is None:
        message += " (its job file was not in failed/ any more; the history has the job)"
    log.info("%s (by %s)", message, by)
    return ControlResult(action="retry", message=message, job_id=job_id, render_ids=render_ids,
                         file_path=str(new_path) if new_path else file_path)


# -- helpers -------------------------------------------------------------------------------

def _get_job(session, job_id: int) -> Job:  # type: ignore[no-untyped-def]
    """The job, locked (lifecycle.lock_job): a cancel or retry is one at a time per job,
    and a host ending or re-queueing one of its renders sees it."""
    job = lock_job(session, job_id)
    if job is None:
        newest = session.scalars(select(Job.id).order_by(Job.id.desc()).limit(1)).first()
        known = f"the newest job is {newest}" if newest else "there are no jobs yet"
        raise UnknownJobError(f"there is no job {job_id} ({known}; `lorafarm history` "
                              "lists them)")
    return job


def _ended_message(job: Job, verb: str) -> str:
    if job.state == JOB_FAILED and job.error == CANCELLED_ERROR:
        return f"job {job.id} ({job.file_name}) is already cancelled"
    hint = {JOB_DONE: "it finished", JOB_FAILED: "it failed; `lorafarm retry` runs it again",
            JOB_REJECTED: "it was rejected at intake"}.get(job.state, "")
    return f"cannot {verb} job {job.id} ({job.file_name}): it has already ended ({job.state}" \
           + (f": {hint})" if hint else ")")


def _move_job_file(config: Config, store: Store, job_id: int, file_name: str,
                   file_path: str | None, folder: str, report: str | None) -> Path | None:
    """Move the job's file into jobs/<folder>/ (writing `report` beside it) and record where
    it went. A file that is gone is not an error: the database is the source of truth."""
    target_dir = config.paths.jobs / folder
    target: Path | None = None
    # Another daemon may move the file between our look and our move (taking it in, or
    # filing it as the job ends): look again where the row says it went, once.
    for attempt in range(2):
        if attempt:
            with store.session() as session:
                job = session.get(Job, job_id)
                if job is None or job.file_path == file_path:
                    break
                file_path = job.file_path
        if not file_path:
            return None
        current = Path(file_path)
        if not current.exists():
            continue
        stale_error = current.with_name(current.name + ".error.txt")
        if current.parent == target_dir:
            target = current
            break
        target_dir.mkdir(parents=True, exist_ok=True)
        destination = unique_destination(target_dir, file_name, job_id)
        try:
            os.replace(current, destination)
        except FileNotFoundError:
            continue
        target = destination
        break
    if target is None:
        log.warning("job %d: its file %s is gone; the history still has the job",
                    job_id, file_path)
        return None
    if report is not None:
        write_error_file(target, report)
    elif stale_error.exists():
        stale_error.unlink()  # its text is in the retry events; a stray one would mislead
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is not None:
            job.file_path = str(target)
    return target
