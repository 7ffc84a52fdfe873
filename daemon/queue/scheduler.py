"""Which renders run next, and the claim that hands them to a worker exactly once.

A batch is a set of queued renders with the same batch key (checkpoint, size, steps,
sampler, guidance, LoRA set with strengths): they share one pipeline call. The order:

1. priority first (higher first);
2. among equals, what the asking worker has loaded: its last batch's key (same checkpoint
   and LoRA set), then any checkpoint it holds;
3. then age (oldest first);
4. no starvation: a render that has waited longer than `worker.max_wait_seconds` goes first
   among its priority, whatever is loaded.

Before all of these, a render that was running when its daemon died runs again alone (a
batch of one), so that the next death, if it comes, says whose fault it is.

Each lookup is one indexed query (a few ms at 50,000 queued renders). The claim itself is
one `UPDATE ... WHERE state = 'queued' ... RETURNING`, which hands each render out once on
SQLite and PostgreSQL alike, so several workers can share one queue.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, insert, select, update

from daemon.contract.spec import RenderSpec
from daemon.store.models import (
    JOB_QUEUED,
    JOB_RUNNING,
    RENDER_CANCELLED,
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


@dataclass(frozen=True)
class ClaimedRender:
    render_id: int
    job_id: int
    job_name: str
    index: int
    attempt: int
    batch_key: str
    batch_id: int  # the `batches` row this claim opened
    spec: RenderSpec
    worker: str = "w0"  # who holds the lease; a late result from another holder is ignored


@dataclass
class BatchFigures:
    """Counted per batch and stored in the `batches` table."""

    pipeline_loads: int = 0
    lora_loads: int = 0
    lora_switches: int = 0
    tier_moves: int = 0  # pipelines moved between the device and the RAM tier
    pipeline_seconds: float = 0.0


@dataclass(frozen=True)
class Inventory:
    """What a host can render: its usable checkpoints (names) and LoRA files (AutoV2
    hashes). None: everything (a lone daemon whose intake already checked the files)."""

    checkpoints: frozenset[str]
    loras: frozenset[str]

    def can_render(self, spec_json: str) -> bool:
        loras = json.loads(spec_json).get("loras", [])
        return all(lora.get("autov2") in self.loras for lora in loras)


HEADS_PER_LOOKUP = 32  # candidates looked at per lookup when the inventory filters some out


def _next_head(session: Any, loaded: Sequence[str], active_key: str | None,
               max_wait_seconds: float, inventory: Inventory | None = None) -> Any:
    """The queued render the next batch is built around, or None."""
    where = [Render.state == RENDER_QUEUED]
    if inventory is not None:
        where.append(Render.checkpoint.in_(sorted(inventory.checkpoints)))
    top = session.scalar(select(func.max(Render.priority)).where(*where))
    if top is None:
        return None
    queued_top = (*where, Render.priority == top)
    columns = (Render.id, Render.batch_key, Render.checkpoint, Render.spec_json,
               Render.created_at, Render.priority)

    def first(*conditions: Any) -> Any:
        rows = session.execute(
            select(*columns).where(*queued_top, *conditions).order_by(Render.id)
            .limit(1 if inventory is None else HEADS_PER_LOOKUP)
            .with_for_update(skip_locked=True)).all()
        return next((row for row in rows
                     if inventory is None or inventory.can_render(row.spec_json)), None)

    oldest = first()
    if oldest is None:
        return None
    if oldest.created_at <= utcnow() - dt.timedelta(seconds=max_wait_seconds):
        return oldest  # waited too long: it goes first, loaded or not
    if active_key is not None:
        same = first(Render.batch_key == active_key)
        if same is not None:
            return same
    if loaded:
        warm = first(Render.checkpoint.in_(list(loaded)))
        if warm is not None:
            return warm
    return oldest


def _retry_alone_head(session: Any, inventory: Inventory | None) -> Any:
    """A queued render that was caught in a process death, or None: it runs first, alone,
    so that a death during it is evidence against it and against nothing else."""
    where = [Render.state == RENDER_QUEUED, Render.deaths > 0]
    if inventory is not None:
        where.append(Render.checkpoint.in_(sorted(inventory.checkpoints)))
    rows = session.execute(
        select(Render.id, Render.batch_key, Render.checkpoint, Render.spec_json,
               Render.priority).where(*where).order_by(Render.priority.desc(), Render.id)
        .limit(1 if inventory is None else HEADS_PER_LOOKUP)
        .with_for_update(skip_locked=True)).all()
    return next((row for row in rows
                 if inventory is None or inventory.can_render(row.spec_json)), None)


@dataclass(frozen=True)
class Head:
    """The queued render the next batch is built around, as `next_head` found it."""

    render_id: int
    batch_key: str
    priority: int
    checkpoint: str
    spec: RenderSpec
    alone: bool  # caught in a process death: it runs alone (see _retry_alone_head)


def next_head(store: Store, *, loaded: Sequence[str] = (), active_key: str | None = None,
              max_wait_seconds: float = 1800.0,
              inventory: Inventory | None = None) -> Head | None:
    """What the next batch would be built around, read without claiming anything: the
    caller sizes the batch (a family's memory estimate, outside any transaction) and then
    claims it with `claim_batch`."""
    with store.session() as session:
        return _head(session, loaded, active_key, max_wait_seconds, inventory)


def _head(session: Any, loaded: Sequence[str], active_key: str | None,
          max_wait_seconds: float, inventory: Inventory | None) -> Head | None:
    retry = _retry_alone_head(session, inventory)
    row = retry or _next_head(session, loaded, active_key, max_wait_seconds, inventory)
    if row is None:
        return None
    return Head(render_id=row.id, batch_key=row.batch_key, priority=row.priority,
                checkpoint=row.checkpoint, spec=RenderSpec.from_json(row.spec_json),
                alone=retry is not None)


def claim_next_batch(store: Store, max_batch: int, *, worker: str = "w0",
                     loaded: Sequence[str] = (), active_key: str | None = None,
                     max_wait_seconds: float = 1800.0, device: str = "cpu",
                     inventory: Inventory | None = None) -> list[ClaimedRender]:
    """Claim the next batch (possibly empty) of up to `max_batch` renders for `worker` and
    mark it running, in one transaction (no memory budget: see `next_head` and
    `claim_batch` for a batch sized by its family)."""
    with store.session() as session:
        head = _head(session, loaded, active_key, max_wait_seconds, inventory)
        if head is None:
            return []
        return _claim(session, head, max_batch, worker, device)


def claim_batch(store: Store, head: Head, size: int, *, worker: str = "w0",
                device: str = "cpu") -> list[ClaimedRender]:
    """Claim up to `size` queued renders with `head`'s batch key (the head alone when it
    must run alone) and mark them running. Empty when another worker or host took them
    since `next_head` looked: the caller looks again."""
    with store.session() as session:
        return _claim(session, head, 1 if head.alone else max(1, size), worker, device)


def _claim(session: Any, head: Head, size: int, worker: str,
           device: str) -> list[ClaimedRender]:
    # Same key and same priority: one index range, oldest first; a batch not full yet
    # takes lower-priority renders with the same key (they cost nothing extra).
    same_key = (Render.state == RENDER_QUEUED, Render.batch_key == head.batch_key)
    # FOR UPDATE SKIP LOCKED on PostgreSQL: a second daemon claiming at the same moment
    # skips these rows instead of waiting for them (SQLite has one writer and ignores it).
    candidate_ids = [head.render_id] if head.alone else list(session.scalars(
        select(Render.id).where(*same_key, Render.priority == head.priority)
        .order_by(Render.id).limit(size).with_for_update(skip_locked=True)))
    if len(candidate_ids) < size and not head.alone:
        candidate_ids += session.scalars(
            select(Render.id).where(*same_key, Render.priority < head.priority)
            .order_by(Render.priority.desc(), Render.id)
            .limit(size - len(candidate_ids)).with_for_update(skip_locked=True)).all()
    now = lease_now(session)  # the new attempts' leases start now
    # A queued render of a job that has ended (cancelled meanwhile) is never rendered:
    # it ends cancelled here, whatever path left it queued.
    job_ended = exists().where(Job.id == Render.job_id,
                               Job.state.not_in((JOB_QUEUED, JOB_RUNNING)))
    for render_id, job_id in session.execute(
            update(Render).where(Render.id.in_(candidate_ids), job_ended,
                                 (Render.state + "") == RENDER_QUEUED)
            .values(state=RENDER_CANCELLED, finished_at=now,
                    error="its job had ended before it ran")
            .returning(Render.id, Render.job_id)).all():
        add_event(session, "render_cancelled", "its job had ended before it ran",
                  job_id=job_id, render_id=render_id)
    claimed_ids = session.scalars(
        update(Render)
        # `state || ''` keeps SQLite's planner on the primary key: without table
        # statistics it would walk a state index over the whole queue (20 ms at 50,000
        # queued renders instead of 0.1 ms). PostgreSQL plans it the same either way.
        .where(Render.id.in_(candidate_ids), (Render.state + "") == RENDER_QUEUED)
        .values(state=RENDER_RUNNING, attempts=Render.attempts + 1, started_at=now,
                heartbeat_at=now, worker=worker, progress_step=0, progress_total=None)
        .returning(Render.id)
    ).all()
    if not claimed_ids:
        return []
    opened = Batch(worker=worker, device=device, checkpoint=head.checkpoint,
                   renders=len(claimed_ids), outcome="running", started_at=now)
    session.add(opened)
    session.flush()
    session.execute(update(Render).where(Render.id.in_(claimed_ids))
                    .values(batch_id=opened.id))
    rows = session.execute(
        select(Render.id, Render.job_id, Job.name, Render.index, Render.attempts,
               Render.batch_key, Render.spec_json)
        .join(Job, Job.id == Render.job_id)
        .where(Render.id.in_(claimed_ids))
        .order_by(Render.priority.desc(), Render.id)).all()
    session.execute(update(Job).where(Job.id.in_({row.job_id for row in rows}),
                                      Job.state == JOB_QUEUED).values(state=JOB_RUNNING))
    batch = [ClaimedRender(render_id=row.id, job_id=row.job_id, job_name=row.name,
                           index=row.index, attempt=row.attempts, batch_key=row.batch_key,
                           batch_id=opened.id, spec=RenderSpec.from_json(row.spec_json),
                           worker=worker)
             for row in rows]
    data = json.dumps({"batch": opened.id, "size": len(rows), "worker": worker})
    session.execute(insert(Event), [
        {"at": now, "kind": "render_started", "job_id": row.job_id, "render_id": row.id,
         "message": f"attempt {row.attempts} on {worker}", "data_json": data}
        for row in rows])
    return batch


def peek_next_checkpoint(store: Store, loaded: Sequence[str]) -> str | None:
    """The checkpoint the queue will most likely want after the loaded ones (for loading it
    from disk while the current batch renders)."""
    with store.session() as session:
        top = session.scalar(select(func.max(Render.priority))
                             .where(Render.state == RENDER_QUEUED))
        if top is None:
            return None
        query = select(Render.checkpoint).where(Render.state == RENDER_QUEUED,
                                                Render.priority == top)
        if loaded:
            query = query.where(Render.checkpoint.not_in(list(loaded)))
        return session.scalar(query.order_by(Render.id).limit(1))


def record_progress(store: Store, render_ids: list[int], step: int, total: int,
                    worker: str) -> None:
    """Step progress of a running batch; doubles as the attempts' heartbeat."""
    with store.session() as session:
        session.execute(update(Render).where(Render.id.in_(render_ids),
                                             Render.state == RENDER_RUNNING,
                                             Render.worker == worker)
                        .values(progress_step=step, progress_total=total,
                                heartbeat_at=lease_now(session)))


def record_batch(store: Store, batch_id: int, figures: BatchFigures, wall_seconds: float,
                 outcome: str) -> None:
    """Close the batch row its claim opened, with the figures the worker counted."""
    with store.session() as session:
        row = session.get(Batch, batch_id)
        if row is None:
            return
        row.pipeline_loads, row.lora_loads = figures.pipeline_loads, figures.lora_loads
        row.lora_switches, row.pipeline_seconds = figures.lora_switches, figures.pipeline_seconds
        row.tier_moves = figures.tier_moves
        row.wall_seconds, row.outcome, row.finished_at = wall_seconds, outcome, utcnow()
