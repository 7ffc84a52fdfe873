"""Post-processing results (the `post_process` hook) and what the daemon does with them:
scores and tags go into the history, and the quality gate flags a render or queues it again
with the next seed.

Plugins compute; this module records. A plugin never touches the database, so a third-party
post-processor gets the same history rows and the same gate as the built-in ONNX one.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from sqlalchemy import delete, func, select

from daemon.contract.results import GATE, GATE_FLAG, GATE_RESEED, SCORE, TAG, PostProcessResult
from daemon.contract.spec import RenderSpec
from daemon.queue.lifecycle import lock_job
from daemon.store.models import (
    JOB_QUEUED,
    JOB_RUNNING,
    RENDER_QUEUED,
    RENDER_RUNNING,
    Render,
    RenderScore,
    Store,
    add_event,
)

log = logging.getLogger(__name__)


def record_result(store: Store, render_id: int, result: PostProcessResult,
                  worker: str | None = None) -> int | None:
    """Store scores, tags and the gate verdict of a render that is about to be recorded done.
    A reseed queues one new render in the same job (so the job stays open until it is done)
    unless this render is itself a reseed: a second bad seed is flagged, not chased.
    Returns the new render's id, if any. Idempotent: a re-run render replaces its rows.
    `worker`: the holder of the render's attempt; a host whose lease ran out (the render
    now another's) records nothing."""
    new_id: int | None = None
    with store.session() as session:
        render = session.get(Render, render_id, with_for_update=True, populate_existing=True)
        if render is None or render.state != RENDER_RUNNING or (
                worker is not None and render.worker != worker):
            return None  # cancelled or lease lost meanwhile: mark_done will not count it
        session.execute(delete(RenderScore).where(RenderScore.render_id == render_id,
                                                  RenderScore.name != "reseed_of"))
        rows = [(SCORE, name, value) for name, value in result.scores.items()]
        rows += [(TAG, name, value) for name, value in result.tags.items()]
        gate = result.gate
        if gate == GATE_RESEED and _is_reseed(session, render_id):
            gate = GATE_FLAG
        if gate == GATE_RESEED:
            new_id = _queue_next_seed(session, render)
        if gate == GATE_RESEED and new_id is None:
            gate = GATE_FLAG  # the job was cancelled meanwhile: nothing more is queued
        if gate == GATE_RESEED:
            rows.append((GATE, "reseeded", result.gate_score))
            add_event(session, "render_reseeded", result.gate_reason, job_id=render.job_id,
                      render_id=render_id, new_render_id=new_id)
        elif gate == GATE_FLAG:
            rows.append((GATE, "flagged", result.gate_score))
            add_event(session, "render_flagged", result.gate_reason, job_id=render.job_id,
                      render_id=render_id)
        session.add_all(RenderScore(render_id=render_id, kind=kind, name=name[:255],
                                    value=float(value)) for kind, name, value in rows)
    return new_id


def _is_reseed(session: Any, render_id: int) -> bool:
    return session.scalars(select(RenderScore.id).where(
        RenderScore.render_id == render_id, RenderScore.kind == GATE,
        RenderScore.name == "reseed_of")).first() is not None


def _queue_next_seed(session: Any, render: Render) -> int | None:
    """The job's next unused seed (count seeds run seed, seed+1, ...; the next one is past
    them all), at the end of the job, same settings otherwise, so it batches like the rest.

    The job row is locked first: on PostgreSQL two hosts may reseed renders of one job at
    the same moment, and without the lock both would read the same last index and seed
    (SQLite's single writer already serialises them; it ignores FOR UPDATE)."""
    job = lock_job(session, render.job_id)
    if job is None or job.state not in (JOB_QUEUED, JOB_RUNNING):
        return None  # cancelled by the user: a new render would run in an ended job
    last_index, last_seed = session.execute(
        select(func.max(Render.index), func.max(Render.seed))
        .where(Render.job_id == render.job_id)).one()
    spec = RenderSpec.from_json(render.spec_json)
    spec = replace(spec, seed=int(last_seed) + 1)
    new = Render(job_id=render.job_id, index=int(last_index) + 1, seed=spec.seed,
                 state=RENDER_QUEUED, priority=render.priority, checkpoint=render.checkpoint,
                 batch_key=render.batch_key, spec_json=spec.to_json())
    session.add(new)
    session.flush()
    session.add(RenderScore(render_id=new.id, kind=GATE, name="reseed_of",
                            value=float(render.id)))
    return int(new.id)
