"""The scheduler: batch across jobs where settings match and never where they differ, prefer
what is loaded without starving anything, survive out-of-memory, share a queue between
workers without rendering anything twice."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import torch
from sqlalchemy import select, update

from daemon.contract.spec import RenderSpec
from daemon.queue.scheduler import claim_next_batch
from daemon.store.models import Batch, Job, Render, Store, utcnow
from daemon.store.queries import stats
from tests.conftest import sdxl_job
from tests.support.helpers import read_store, rows


def _rows(farm, model=Render) -> list:  # type: ignore[no-untyped-def]
    return rows(farm.config, model)


def test_renders_of_several_jobs_share_a_batch_only_when_settings_match(make_farm) -> None:
    farm = make_farm(worker={"max_batch": 8})
    farm.drop("a.toml", sdxl_job(seed=1, count=3))
    farm.drop("b.toml", sdxl_job(seed=10, count=2, prompt="a blue barn"))  # prompt may differ
    farm.drop("c.toml", sdxl_job(seed=20, count=2, steps=4))  # steps differ
    farm.drop("d.toml", sdxl_job(seed=30, count=1, sampler="Euler a"))  # sampler differs
    farm.drop("e.toml", sdxl_job(seed=40, count=1, checkpoint="tiny-sdxl-single"))
    assert farm.run() == 0
    renders = _rows(farm)
    assert all(r.state == "done" for r in renders)
    jobs = {j.id: j.name for j in _rows(farm, Job)}
    by_batch: dict[int, set[str]] = {}
    for render in renders:
        by_batch.setdefault(render.batch_id, set()).add(jobs[render.job_id])
    groups = sorted(sorted(members) for members in by_batch.values())
    assert groups == [["a", "b"], ["c"], ["d"], ["e"]]
    batches = _rows(farm, Batch)
    assert sorted(b.renders for b in batches) == [1, 1, 2, 5]
    assert all(b.outcome == "done" and b.pipeline_seconds > 0 for b in batches)
    assert sum(b.pipeline_loads for b in batches) == 2  # one per checkpoint


def _queue(store: Store, rows: list[tuple[str, int, int]]) -> None:
    """rows: (checkpoint, priority, age in seconds)."""
    with store.session() as session:
        job = Job(name="j", file_name="j.toml", content_hash="x", state="queued")
        session.add(job)
        session.flush()
        for i, (checkpoint, priority, age) in enumerate(rows):
            spec = RenderSpec(family="sdxl", checkpoint=checkpoint, prompt="p",
                              negative_prompt="", seed=i, steps=2, cfg=5.0, sampler="Euler",
                              schedule=None, width=64, height=64)
            session.add(Render(job_id=job.id, index=i, seed=i, state="queued", priority=priority,
                               checkpoint=checkpoint, batch_key=spec.batch_key(),
                               spec_json=spec.to_json(),
                               created_at=utcnow() - dt.timedelta(seconds=age)))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store.for_path(tmp_path / "db.sqlite")
    store.migrate()
    return store


def test_priority_then_loaded_checkpoint_then_age(store: Store) -> None:
    _queue(store, [("old", 0, 50), ("warm", 0, 10), ("urgent", 5, 1), ("warm", 0, 5)])
    order = []
    loaded = ["warm"]
    while batch := claim_next_batch(store, 1, loaded=loaded, max_wait_seconds=3600):
        order.append(batch[0].spec.checkpoint)
    # Priority beats everything; then the loaded checkpoint; the older "old" waits.
    assert order == ["urgent", "warm", "warm", "old"]


def test_nothing_waits_longer_than_the_bound(store: Store) -> None:
    _queue(store, [("cold", 0, 120), *[("warm", 0, 1)] * 3])
    first = claim_next_batch(store, 1, loaded=["warm"], max_wait_seconds=60)
    assert first[0].spec.checkpoint == "cold"  # waited past the bound: goes first anyway


def test_the_same_lora_set_is_preferred_among_loaded_work(store: Store) -> None:
    _queue(store, [("warm", 0, 9), ("warm", 0, 8)])
    with store.session() as session:
        second = session.scalars(select(Render).order_by(Render.id.desc())).first()
        spec = RenderSpec.from_json(second.spec_json)
        spec = RenderSpec(**{**spec.__dict__, "steps": 3})
        session.execute(update(Render).where(Render.id == second.id).values(
            batch_key=spec.batch_key(), spec_json=spec.to_json()))
        key = spec.batch_key()
    batch = claim_next_batch(store, 4, loaded=["warm"], active_key=key)
    assert [c.batch_key for c in batch] == [key]


def _oom_when(predicate):  # type: ignore[no-untyped-def]
    def render_batch(self, pipe, specs, device, progress=None):  # type: ignore[no-untyped-def]
        if predicate(self, specs):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self, pipe, specs, device, progress)
    from families.sdxl.sdxl import SDXLFamily

    original = SDXLFamily.render_batch
    return render_batch


def test_out_of_memory_splits_the_batch(farm, monkeypatch) -> None:
    from families.sdxl.sdxl import SDXLFamily

    monkeypatch.setattr(SDXLFamily, "render_batch", _oom_when(lambda _f, specs: len(specs) > 1))
    farm.drop("big.toml", sdxl_job(count=4))
    assert farm.run() == 0
    renders = _rows(farm)
    assert [r.state for r in renders] == ["done"] * 4
    assert len({r.batch_id for r in renders}) == 1  # one claim, rendered as halves of halves
    assert len(list(farm.outputs.rglob("*.png"))) == 4


def test_out_of_memory_at_batch_one_turns_on_savers_then_fails_clearly(farm,
                                                                       monkeypatch) -> None:
    from families.sdxl.sdxl import SDXLFamily

    savers_seen = []

    def always(family, specs):  # type: ignore[no-untyped-def]
        savers_seen.append(len(specs))
        return True
    monkeypatch.setattr(SDXLFamily, "render_batch", _oom_when(always))
    turned_on = []
    original = SDXLFamily.enable_memory_savers
    monkeypatch.setattr(SDXLFamily, "enable_memory_savers",
                        lambda self, pipe, device: turned_on.append(1) or original(
                            self, pipe, device))
    farm.drop("huge.toml", sdxl_job(count=2))
    assert farm.run() == 0
    renders = _rows(farm)
    assert [r.state for r in renders] == ["failed", "failed"]
    assert "out of GPU memory even at batch 1" in renders[0].error
    assert turned_on  # the savers were tried before giving up
    assert savers_seen[0] == 2 and 1 in savers_seen


def test_two_workers_share_a_queue_without_rendering_anything_twice(make_farm) -> None:
    farm = make_farm(worker={"devices": ["cpu", "cpu"], "max_batch": 2})
    for i in range(6):
        checkpoint = "tiny-sdxl" if i % 2 else "tiny-sdxl-single"
        farm.drop(f"j{i}.toml", sdxl_job(checkpoint=checkpoint, seed=100 * i, count=3))
    assert farm.run() == 0
    renders = _rows(farm)
    assert len(renders) == 18
    assert all(r.state == "done" and r.attempts == 1 for r in renders)
    outputs = [r.output_path for r in renders]
    assert len(set(outputs)) == 18 and len(list(farm.outputs.rglob("*.png"))) == 18
    assert {r.worker.rsplit("/", 1)[1] for r in renders} == {"w0", "w1"}
    with read_store(farm.config) as store:
        figures = stats(store)
    assert figures["renders"] == 18 and figures["busy_fraction"] is not None
