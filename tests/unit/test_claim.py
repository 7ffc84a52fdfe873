"""The claim in two steps: `next_head` reads what the next batch would be built around (the
runtime then sizes it by the family's memory estimate, outside any transaction) and
`claim_batch` claims that many; nothing in the claim calls back into the runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.contract.spec import RenderSpec
from daemon.queue.scheduler import claim_batch, claim_next_batch, next_head
from daemon.store.models import Job, Render, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store.for_path(tmp_path / "db.sqlite")
    store.migrate()
    return store


def _queue(store: Store, checkpoints: list[str], deaths: int = 0) -> None:
    with store.session() as session:
        job = Job(name="j", file_name="j.toml", content_hash="x", state="queued")
        session.add(job)
        session.flush()
        for i, checkpoint in enumerate(checkpoints):
            spec = RenderSpec(family="sdxl", checkpoint=checkpoint, prompt="p",
                              negative_prompt="", seed=i, steps=2, cfg=5.0, sampler="Euler",
                              schedule=None, width=64, height=64)
            session.add(Render(job_id=job.id, index=i, seed=i, state="queued", priority=0,
                               checkpoint=checkpoint, batch_key=spec.batch_key(),
                               spec_json=spec.to_json(), deaths=deaths if i == 0 else 0))


def _states(store: Store) -> list[str]:
    with store.session() as session:
        return list(session.scalars(select(Render.state).order_by(Render.id)))


def test_next_head_only_reads_and_claim_batch_takes_the_size_it_is_given(store: Store) -> None:
    _queue(store, ["a"] * 5)
    head = next_head(store)
    assert head is not None and head.checkpoint == "a" and not head.alone
    assert head.spec.checkpoint == "a" and head.spec.seed == 0
    assert _states(store) == ["queued"] * 5  # looking claimed nothing
    batch = claim_batch(store, head, 3, worker="w0")
    assert [c.index for c in batch] == [0, 1, 2]
    assert _states(store) == ["running"] * 3 + ["queued"] * 2
    rest = claim_batch(store, next_head(store), 8, worker="w0")  # type: ignore[arg-type]
    assert [c.index for c in rest] == [3, 4]
    assert next_head(store) is None


def test_a_batch_taken_meanwhile_leaves_the_late_claim_empty(store: Store) -> None:
    _queue(store, ["a"] * 2)
    head = next_head(store)
    assert head is not None
    assert len(claim_next_batch(store, 8, worker="other")) == 2  # another worker was quicker
    assert claim_batch(store, head, 8, worker="w0") == []  # the runtime looks again


def test_a_render_caught_in_a_death_is_claimed_alone_whatever_the_size(store: Store) -> None:
    _queue(store, ["a"] * 3, deaths=1)
    head = next_head(store)
    assert head is not None and head.alone and head.spec.seed == 0
    assert [c.index for c in claim_batch(store, head, 8)] == [0]
    assert [c.index for c in claim_batch(store, next_head(store), 8)] == [1, 2]  # type: ignore[arg-type]
