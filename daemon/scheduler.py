"""Which renders run next, and the claim that hands them to a worker exactly once.

A batch is a set of queued renders with the same batch key (checkpoint, size, steps,
sampler, guidance, LoRA set): they can share one pipeline call. The next batch starts from
the best queued render (highest priority, then oldest) and takes up to `max_batch` renders
with its key. The claim is one `UPDATE ... WHERE state = 'queued' ... RETURNING`, which hands
each render out once on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update

from daemon.spec import RenderSpec
from daemon.store import (
    JOB_QUEUED,
    JOB_RUNNING,
    RENDER_QUEUED,
    RENDER_RUNNING,
    Job,
    Render,
    Store,
    add_event,
    utcnow,
)


@dataclass(frozen=True)
class ClaimedRender:
    render_id: int
    job_id: int
    job_name: str
    index: int
    attempt: int
    spec: RenderSpec


def claim_next_batch(store: Store, max_batch: int) -> list[ClaimedRender]:
    """Claim the next batch (possibly empty) and mark it running."""
    with store.session() as session:
        head = session.execute(
            select(Render.batch_key)
            .where(Render.state == RENDER_QUEUED)
            .order_by(Render.priority.desc(), Render.id)
            .limit(1)
        ).first()
        if head is None:
            return []
        candidate_ids = session.scalars(
            select(Render.id)
            .where(Render.state == RENDER_QUEUED, Render.batch_key == head.batch_key)
            .order_by(Render.priority.desc(), Render.id)
            .limit(max_batch)
        ).all()
        claimed_ids = session.scalars(
            update(Render)
            .where(Render.id.in_(candidate_ids), Render.state == RENDER_QUEUED)
            .values(state=RENDER_RUNNING, attempts=Render.attempts + 1, started_at=utcnow())
            .returning(Render.id)
        ).all()
        if not claimed_ids:
            return []
        rows = session.scalars(select(Render).where(Render.id.in_(claimed_ids))
                               .order_by(Render.priority.desc(), Render.id)).all()
        job_ids = {row.job_id for row in rows}
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.state == JOB_QUEUED)
                        .values(state=JOB_RUNNING))
        batch = []
        for row in rows:
            batch.append(ClaimedRender(render_id=row.id, job_id=row.job_id, job_name=row.job.name,
                                       index=row.index, attempt=row.attempts,
                                       spec=RenderSpec.from_json(row.spec_json)))
            add_event(session, "render_started", f"attempt {row.attempts}", job_id=row.job_id,
                      render_id=row.id, batch=len(claimed_ids))
        return batch


def queue_counts(store: Store) -> dict[str, int]:
    from sqlalchemy import func

    with store.session() as session:
        return {state: count for state, count in session.execute(
            select(Render.state, func.count()).group_by(Render.state))}
