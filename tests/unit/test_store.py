"""The store: migrations own the schema, SQLite runs with the settings the design promises,
and the claim hands out each render once."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from daemon.contract.spec import RenderSpec
from daemon.queue.scheduler import claim_next_batch
from daemon.store.models import Base, Job, Render, Store


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path: Path) -> Store:  # type: ignore[no-untyped-def]
    """The same store tests on SQLite and on the local PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'lorafarm.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url").replace(
            "postgresql://", "postgresql+psycopg://")
    store = Store.for_url(url)
    store.migrate()
    yield store
    store.dispose()


def _store(tmp_path: Path) -> Store:
    store = Store.for_path(tmp_path / "state" / "lorafarm.sqlite")
    store.migrate()
    return store


def test_migrations_create_exactly_the_orm_schema(any_store: Store) -> None:
    store = any_store
    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations disagree; add a migration: {diff}"
    store.migrate()  # idempotent: a second start changes nothing


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert (tmp_path / "state" / "lorafarm.sqlite").stat().st_mode & 0o077 == 0


def _spec(seed: int, width: int = 64) -> RenderSpec:
    return RenderSpec(family="sdxl", checkpoint="m", prompt="p", negative_prompt="",
                      seed=seed, steps=2, cfg=5.0, sampler="Euler", schedule=None,
                      width=width, height=64)


def test_claim_takes_priority_then_age_and_only_one_batch_key(any_store: Store) -> None:
    store = any_store
    with store.session() as session:
        low = Job(name="low", file_name="low.toml", content_hash="a", state="queued", priority=0)
        high = Job(name="high", file_name="high.toml", content_hash="b", state="queued",
                   priority=5)
        session.add_all([low, high])
        session.flush()
        for job, specs in ((low, [_spec(1), _spec(2)]),
                           (high, [_spec(3, width=128), _spec(4), _spec(5)])):
            for i, spec in enumerate(specs):
                session.add(Render(job_id=job.id, index=i, seed=spec.seed, state="queued",
                                   priority=job.priority, checkpoint="m",
                                   batch_key=spec.batch_key(), spec_json=spec.to_json()))
    first = claim_next_batch(store, max_batch=8)
    assert [c.spec.seed for c in first] == [3]  # highest priority first, alone in its size
    second = claim_next_batch(store, max_batch=8)
    # Same settings across two jobs share one batch, priority order kept.
    assert [c.spec.seed for c in second] == [4, 5, 1, 2]
    assert claim_next_batch(store, max_batch=8) == []
