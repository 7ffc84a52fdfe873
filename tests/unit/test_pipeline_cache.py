"""The worker's pipeline cache: sizes measured on the loaded pipeline, the device tier kept
within the memory budget, pipelines moved to a RAM tier and back instead of reloaded, and
batches sized by what the budget leaves beside the weights.

There is no GPU here: the tier tests give the cache a CUDA device and a move function that
records moves instead of making them (the one thing that cannot exist on this machine); the
pipelines and their measured sizes are real."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sqlalchemy import select

from daemon.contract.family import LoadedCheckpoint
from daemon.contract.spec import RenderSpec
from daemon.formats.quantization import resident_weight_bytes
from daemon.render.pipeline_cache import (
    DEVICE_TIER,
    RAM_TIER,
    CachedPipeline,
    PipelineCache,
    measure,
    pipeline_bytes,
    resident_bytes,
)
from daemon.store.models import Batch
from families.sdxl.sdxl import SDXLFamily
from families.sdxl.tiny import build_tiny_sdxl_pipeline
from tests.conftest import sdxl_job
from tests.support.helpers import rows

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def pipes() -> list[Any]:
    return [build_tiny_sdxl_pipeline(seed=seed) for seed in range(3)]


def test_measured_size_agrees_with_the_files_headers(assets) -> None:  # type: ignore[no-untyped-def]
    """Two independent counts of the same weights: the loaded modules' tensors, and the
    safetensors headers of the folder they came from (float32 here)."""
    family = SDXLFamily()
    folder = assets.models / "tiny-sdxl"
    checkpoint = LoadedCheckpoint(name="tiny-sdxl", path=folder, kind="folder", config_path=None)
    pipe = family.load_pipeline(checkpoint, torch.device("cpu"), torch.float32)
    sizes = pipeline_bytes(pipe)
    assert set(sizes) >= {"unet", "vae", "text_encoder", "text_encoder_2"}
    from_headers = resident_weight_bytes(checkpoint, torch.float32)
    measured = sum(sizes.values())
    assert from_headers > 0
    # Buffers the files do not store (CLIP's position ids) make the small difference.
    assert abs(measured - from_headers) / from_headers < 0.01, (measured, from_headers)
    assert resident_bytes(sizes, "none") == measured
    assert resident_bytes(sizes, "model") == max(sizes.values())
    assert resident_bytes(sizes, "group") == 0


class Moves:
    """Records where the cache sends each pipeline (no GPU to send it to here)."""

    def __init__(self) -> None:
        self.log: list[tuple[int, str]] = []

    def __call__(self, pipe: Any, device: torch.device) -> None:
        self.log.append((id(pipe), device.type))


def _entry(pipe: Any, name: str) -> CachedPipeline:
    return measure(CachedPipeline(pipe=pipe, identity=(name, 1)), "none")


def _cache(pipes: list[Any], moves: Moves, *, vram: float, ram: float,
           count: int = 5) -> tuple[PipelineCache, int]:
    size = sum(pipeline_bytes(pipes[0]).values())
    cache = PipelineCache(CUDA, max_pipelines=count, vram_budget_bytes=int(vram * size),
                          ram_budget_bytes=int(ram * size), move=moves)
    return cache, size


def _load(cache: PipelineCache, pipes: list[Any], index: int, reserve: int = 0) -> None:
    """As the worker loads: room for the incoming pipeline first, then the load."""
    name = f"m{index}"
    entry = _entry(pipes[index], name)
    cache.make_room(keep=name, reserve=reserve, incoming=entry.resident_bytes)
    cache.add(name, entry)
    cache.make_room(keep=name, reserve=reserve)


def test_over_the_device_budget_the_least_recent_moves_to_ram_and_comes_back(
        pipes: list[Any]) -> None:
    moves = Moves()
    cache, _ = _cache(pipes, moves, vram=2.5, ram=10)
    _load(cache, pipes, 0)
    _load(cache, pipes, 1)
    assert cache.on_device() == ["m0", "m1"] and moves.log == []
    _load(cache, pipes, 2)  # three do not fit 2.5 pipelines: m0 (least recent) goes to RAM
    assert cache.tier_of("m0") == RAM_TIER and cache.on_device() == ["m1", "m2"]
    assert moves.log == [(id(pipes[0]), "cpu")]
    back = cache.get("m0", ("m0", 1))
    assert back is not None and back.pipe is pipes[0]  # the same pipeline: no load from disk
    assert cache.tier_of("m0") == DEVICE_TIER and cache.tier_of("m1") == RAM_TIER
    # Room is made before the pipeline comes back: the device never holds three.
    assert moves.log[1:] == [(id(pipes[1]), "cpu"), (id(pipes[0]), "cuda")]
    assert (cache.promotions, cache.demotions, cache.evictions) == (1, 2, 0)


def test_without_a_ram_tier_or_room_in_it_pipelines_are_unloaded(pipes: list[Any]) -> None:
    moves = Moves()
    cache, _ = _cache(pipes, moves, vram=2.5, ram=0)
    for index in range(3):
        _load(cache, pipes, index)
    assert cache.names() == ["m1", "m2"] and moves.log == [] and cache.evictions == 1
    # A RAM tier with room for one: the second pipeline pushed off the device pushes the
    # first one out of RAM.
    moves = Moves()
    cache, _ = _cache(pipes, moves, vram=1.5, ram=1.5)
    for index in range(3):
        _load(cache, pipes, index)
    assert cache.names() == ["m1", "m2"]
    assert cache.tier_of("m1") == RAM_TIER and cache.tier_of("m2") == DEVICE_TIER


def test_a_batch_reserve_pushes_other_pipelines_off_the_device(pipes: list[Any]) -> None:
    moves = Moves()
    cache, size = _cache(pipes, moves, vram=2.5, ram=10)
    _load(cache, pipes, 0)
    _load(cache, pipes, 1)
    assert cache.on_device() == ["m0", "m1"]
    cache.get("m1", ("m1", 1), reserve=size)  # a batch as large as a pipeline
    assert cache.on_device() == ["m1"] and cache.tier_of("m0") == RAM_TIER


def test_the_count_cap_and_a_changed_file(pipes: list[Any]) -> None:
    moves = Moves()
    cache, _ = _cache(pipes, moves, vram=0, ram=0, count=2)  # no budgets: count only
    for index in range(3):
        _load(cache, pipes, index)
    assert cache.names() == ["m1", "m2"]
    assert cache.get("m1", ("m1", 2)) is None  # replaced on disk since it was loaded
    assert cache.names() == ["m2"]


def _budget_gb(assets, renders: float) -> float:  # type: ignore[no-untyped-def]
    """A memory budget holding the tiny SDXL's float32 weights and `renders` 64 px renders."""
    weights = resident_weight_bytes(LoadedCheckpoint(
        name="tiny-sdxl", path=assets.models / "tiny-sdxl", kind="folder", config_path=None),
        torch.float32)
    spec = RenderSpec(family="sdxl", checkpoint="tiny-sdxl", prompt="p", negative_prompt="",
                      seed=1, steps=2, cfg=5.0, sampler="Euler", schedule=None,
                      width=64, height=64)
    return (weights + renders * SDXLFamily().batch_cost(spec)) / 2**30


def test_batches_are_sized_by_the_budget_left_beside_the_weights(make_farm, assets) -> None:  # type: ignore[no-untyped-def]
    """vram_budget_gb holding the tiny model's weights and 2.5 renders' cost: a job of 5
    renders runs as batches of 2, 2 and 1 although max_batch is 4."""
    budget = _budget_gb(assets, renders=2.5) * 2**30
    farm = make_farm(worker={"max_batch": 4, "vram_budget_gb": budget / 2**30})
    farm.drop("five.toml", sdxl_job(count=5, steps=2))
    assert farm.run() == 0
    assert farm.files_in("done") == ["five.toml"]
    sizes = [b.renders for b in rows(farm.config, Batch)]
    assert sizes == [2, 2, 1]


def _config(tmp_path, **sections):  # type: ignore[no-untyped-def]
    from daemon.config import config_from_dict

    return config_from_dict({"paths": {"jobs": "jobs"}, **sections}, base=tmp_path)


def test_a_device_table_overrides_the_worker_memory_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Cards of different sizes: `[devices."cuda:1"]` over [worker]'s settings for one."""
    from daemon.config import ConfigError

    config = _config(tmp_path, worker={"devices": ["cuda:0", "cuda:1"], "vram_budget_gb": 22.0,
                                       "ram_budget_gb": 48},
                     devices={"cuda:1": {"vram_budget_gb": 10.0, "offload": "model"}})
    big, small = config.memory_for("cuda:0"), config.memory_for("cuda:1")
    assert (big.vram_budget_gb, big.ram_budget_gb, big.offload) == (22.0, 48.0, "none")
    assert (small.vram_budget_gb, small.ram_budget_gb, small.offload) == (10.0, 48.0, "model")
    with pytest.raises(ConfigError, match=r'devices."cuda:2"\] names a device no worker'):
        _config(tmp_path, worker={"devices": ["cuda:0", "cuda:1"]},
                devices={"cuda:2": {"vram_budget_gb": 10.0}})
    with pytest.raises(ConfigError, match=r'devices."cuda:1".offload = \'some\''):
        _config(tmp_path, worker={"devices": ["cuda:1"]}, devices={"cuda:1": {"offload": "some"}})
    with pytest.raises(ConfigError, match="did you mean"):
        _config(tmp_path, worker={"devices": ["cuda:1"]},
                devices={"cuda:1": {"vram_budget": 10.0}})


def test_a_worker_sizes_batches_by_its_own_device_budget(make_farm, assets) -> None:  # type: ignore[no-untyped-def]
    """[worker] sets no budget; the device table of the worker's device does, and leaves
    room for one render at a time beside the weights."""
    small = _budget_gb(assets, renders=1.5)
    farm = make_farm(worker={"devices": ["cpu:1"], "max_batch": 4},
                     devices={"cpu:1": {"vram_budget_gb": small}})
    farm.drop("three.toml", sdxl_job(count=3, steps=2))
    assert farm.run() == 0
    assert farm.files_in("done") == ["three.toml"]
    sizes = [b.renders for b in rows(farm.config, Batch)]
    assert sizes == [1, 1, 1]


def test_offloaded_pipelines_hold_no_device_memory_between_renders(pipes: list[Any]) -> None:
    """Under model offload a pipeline lives in CPU RAM between renders: it is never moved or
    dropped to make room on the device, however many of them there are."""
    moves = Moves()
    cache, _ = _cache(pipes, moves, vram=1.5, ram=0)
    for index in range(3):
        name = f"m{index}"
        entry = measure(CachedPipeline(pipe=pipes[index], identity=(name, 1)), "model")
        assert entry.idle_bytes == 0 < entry.resident_bytes < entry.weights_bytes
        cache.make_room(keep=name, incoming=entry.resident_bytes)
        cache.add(name, entry)
    assert cache.names() == ["m0", "m1", "m2"] and moves.log == [] and cache.evictions == 0


def test_the_old_budget_key_says_what_it_became(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from daemon.config import ConfigError

    with pytest.raises(ConfigError, match="memory_budget_gb was renamed: use vram_budget_gb"):
        _config(tmp_path, worker={"memory_budget_gb": 22.0})


def test_each_batch_records_the_pipelines_it_moved_between_the_tiers(make_farm, assets) -> None:  # type: ignore[no-untyped-def]
    """A device with room for one pipeline and a RAM tier: checkpoints A, B, A in turn. B's
    load sends A to RAM (one move), A's return sends B to RAM and brings A back (two moves,
    and no third load); `lorafarm stats` sums them. The worker's cache is CUDA-labelled with
    recorded moves, as in the tests above; the renders are real."""
    from daemon.queue.scheduler import claim_next_batch
    from daemon.store.queries import stats

    budget = _budget_gb(assets, renders=1.5)
    farm = make_farm(worker={"max_batch": 4, "vram_budget_gb": budget, "ram_budget_gb": 10.0})
    daemon = farm.daemon()
    daemon.start()
    worker = daemon.worker
    moves = Moves()
    worker._cache = PipelineCache(CUDA, max_pipelines=4, vram_budget_bytes=worker.vram_budget,
                                  ram_budget_bytes=10 * 2**30, move=moves)
    for n, checkpoint in enumerate(["tiny-sdxl", "tiny-sdxl-single", "tiny-sdxl"]):
        farm.drop(f"job{n}.toml", sdxl_job(checkpoint=checkpoint, seed=n, count=1, steps=2))
        daemon.intake.scan()
        batch = claim_next_batch(daemon.store, max_batch=4, worker=worker.name)
        assert [c.spec.checkpoint for c in batch] == [checkpoint]
        worker.render(batch)
    with daemon.store.session() as session:
        rows = [(b.pipeline_loads, b.tier_moves)
                for b in session.scalars(select(Batch).order_by(Batch.id))]
    figures = stats(daemon.store)
    daemon.close()
    assert rows == [(1, 0), (1, 1), (0, 2)]
    assert len(moves.log) == 3
    assert (figures["pipeline_loads"], figures["tier_moves"]) == (2, 3)


def test_the_loaded_list_answers_while_a_move_holds_the_worker_lock(make_farm) -> None:  # type: ignore[no-untyped-def]
    """The heartbeat reports each worker's loaded checkpoints; a pipeline moving between
    tiers (seconds for a real model) holds the worker's lock, and the heartbeat must not wait
    behind it."""
    import threading

    from daemon.queue.scheduler import claim_next_batch

    farm = make_farm()
    daemon = farm.daemon()
    daemon.start()
    farm.drop("one.toml", sdxl_job(count=1, steps=2))
    daemon.intake.scan()
    worker = daemon.worker
    worker.render(claim_next_batch(daemon.store, max_batch=4, worker=worker.name))
    answers: list[list[str]] = []
    with worker._lock:  # as during a move
        reader = threading.Thread(target=lambda: answers.append(worker.loaded_checkpoints))
        reader.start()
        reader.join(timeout=10)
        answered = list(answers)  # before the lock is let go
    daemon.close()
    assert answered == [["tiny-sdxl"]]
