"""The quality gate's reseed on a farm: two hosts reseeding renders of one job at the same
moment must not give the new renders the same index and seed (PostgreSQL, which runs
transactions side by side; SQLite's single writer cannot race)."""

from __future__ import annotations

import threading

from sqlalchemy import select

from daemon.postprocess import _queue_next_seed
from daemon.spec import RenderSpec
from daemon.store import Job, Render, Store


def _spec(seed: int) -> RenderSpec:
    return RenderSpec(family="sdxl", checkpoint="tiny", prompt="p", negative_prompt="",
                      seed=seed, steps=2, cfg=5.0, sampler="Euler", schedule=None,
                      width=64, height=64)


def test_concurrent_reseeds_of_one_job_get_distinct_indexes(postgres_url: str) -> None:
    store = Store.for_url(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    store.migrate()
    with store.session() as session:
        job = Job(name="night", file_name="night.toml", content_hash="x", state="running")
        session.add(job)
        session.flush()
        for index in range(2):
            spec = _spec(100 + index)
            session.add(Render(job_id=job.id, index=index, seed=spec.seed, state="running",
                               attempts=1, priority=0, checkpoint="tiny",
                               batch_key=spec.batch_key(), spec_json=spec.to_json()))
    with store.session() as session:
        first_id, second_id = session.scalars(select(Render.id).order_by(Render.id)).all()

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
