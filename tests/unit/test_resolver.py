"""The job resolver on its own: job-file text in, render specs (or a JobFileError) out, with
no daemon started, no jobs/ folder and no job rows. The registry and LoRA library are built
and scanned here the way a daemon builds them, over the session's tiny checkpoints."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from daemon.config import config_from_dict
from daemon.contract.jobfile import JobFileError, check_job
from daemon.contract.samplers import choose_sampler
from daemon.library.embeddings import EmbeddingLibrary
from daemon.library.loras import LoraLibrary
from daemon.library.registry import Registry
from daemon.resolver.resolver import JobResolver, Resolution
from daemon.store.models import Store
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from tests.conftest import demo_checkpoint_overrides

BASE = {"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}  # an SDXL-lineage LoRA


@dataclass
class World:
    root: Path
    resolver: JobResolver
    store: Store


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, assets: Any,
          plugins: Any) -> Iterator[World]:
    """A resolver over the tiny checkpoints and two SDXL LoRAs; jobs/ does not exist."""
    root = tmp_path_factory.mktemp("resolver")
    loras = root / "loras"
    loras.mkdir()
    write_kohya_original(make_tiny_lora(seed=21, scale=2.0), loras / "ink.safetensors",
                         metadata=BASE)
    write_kohya_original(make_tiny_lora(seed=22, scale=2.0), loras / "wash.safetensors",
                         metadata=BASE)
    (root / "wildcards").mkdir()
    (root / "wildcards" / "animal.txt").write_text("cat\ndog\nfox\nowl\n")
    config = config_from_dict({
        "paths": {"jobs": "no-jobs-here", "loras": "loras", "models": str(assets.models),
                  "inputs": "inputs", "outputs": "outputs", "state": "state"},
        "intake": {"settle_seconds": 0.0},  # the LoRAs above were written just now
        "checkpoints": demo_checkpoint_overrides(assets),
    }, base=root, source=root / "config.toml")
    # The inventory the registry and library index into (a daemon's database, here alone).
    store = Store.for_path(root / "inventory.db")
    store.migrate()
    registry = Registry(config, store, plugins, host="here")
    library = LoraLibrary(config, store, plugins, host="here")
    registry.scan()
    library.scan()
    resolver = JobResolver(config, registry, library, EmbeddingLibrary(config, plugins),
                           plugins)
    yield World(root, resolver, store)
    registry.close()
    store.engine.dispose()


def _parse(world: World, text: str, name: str = "job.toml") -> Resolution:
    return world.resolver.parse(name, text.encode())


def _job(checkpoint: str = "tiny-sdxl", extra: str = "", seed: int = 7, count: int = 3) -> str:
    return (f'checkpoint = "{checkpoint}"\nprompt = "a red lighthouse"\n'
            f"seed = {seed}\ncount = {count}\n{extra}")


LORAS = '\n[[loras]]\nname = "ink"\nstrength = 0.7\ntext_encoder_strength = 0.5\n'


def test_a_sdxl_job_with_loras_gives_one_render_per_seed_with_family_defaults(
        world: World, plugins: Any) -> None:
    text = ('checkpoint = "tiny-sdxl"\nprompt = "a red lighthouse <lora:wash:0.4>"\n'
            "seed = 7\ncount = 3\n" + LORAS)
    spec, renders, warnings = _parse(world, text)
    assert spec.checkpoint == "tiny-sdxl" and spec.count == 3
    assert [r.seed for r in renders] == [7, 8, 9]
    info = world.resolver.registry.find("tiny-sdxl")
    assert info is not None and info.family == "sdxl"
    family = plugins.families["sdxl"]
    defaults = family.defaults_for(info.variant)
    assert world.resolver.registry.preset(info) == {}  # so the family's defaults apply
    expected_sampler = choose_sampler(defaults.sampler, defaults.schedule,
                                      family.sampler_kind)
    for render in renders:
        assert render.family == "sdxl" and render.checkpoint == "tiny-sdxl"
        assert (render.steps, render.cfg) == (defaults.steps, defaults.cfg)
        assert (render.width, render.height) == (defaults.width, defaults.height)
        assert (render.sampler, render.schedule) == (expected_sampler.sampler,
                                                     expected_sampler.schedule)
        assert "<lora" not in render.prompt and render.user_prompt == spec.prompt
        assert [(u.name, u.strength, u.text_encoder_strength) for u in render.loras] == [
            ("ink", 0.7, 0.5), ("wash", 0.4, 0.4)]  # a tag: A1111 te = unet weight
    # Both LoRAs and the checkpoint say sdxl lineage: nothing to warn about.
    assert not any("lineage" in w for w in warnings)


def test_resolve_takes_a_checked_job_spec(world: World) -> None:
    text = _job(count=2) + LORAS
    job = check_job(tomllib.loads(text), text, world.resolver.config.limits)
    result = world.resolver.resolve(job, text)
    assert result.spec is job  # the job as written: what the history records
    assert [r.seed for r in result.renders] == [7, 8]
    assert [u.name for u in result.renders[0].loras] == ["ink"]


def test_a_lora_of_another_architecture_is_refused_naming_it_and_the_fix(world: World) -> None:
    text = _job("tiny-flux-dev", count=1) + LORAS
    with pytest.raises(JobFileError) as refused:
        _parse(world, text)
    error = refused.value
    assert "LoRA 'ink' is for sdxl" in error.what
    assert "checkpoint 'tiny-flux-dev'" in error.what
    assert error.key == "loras" and error.line is not None
    assert text.splitlines()[error.line - 1] == 'name = "ink"'  # the report points at it
    assert error.fix is not None and "LoRA, or a sdxl checkpoint" in error.fix


def test_an_unknown_checkpoint_is_refused_with_a_did_you_mean(world: World) -> None:
    text = _job("tiny-sdxk")
    with pytest.raises(JobFileError) as refused:
        _parse(world, text)
    error = refused.value
    assert error.what == "unknown checkpoint 'tiny-sdxk'"
    assert error.key == "checkpoint" and error.line == 1
    assert error.fix is not None and "did you mean 'tiny-sdxl'" in error.fix


def test_a_sweep_axis_expands_into_one_render_per_value_and_seed(world: World) -> None:
    renders = _parse(world, _job(count=2) + "\n[sweep]\ncfg = [4.0, 6.5]\n").renders
    assert [(r.cfg, r.seed) for r in renders] == [(4.0, 7), (4.0, 8), (6.5, 7), (6.5, 8)]
    assert all(r.extra["sweep_axes"] == ["cfg"] for r in renders)
    assert len({str(r.extra["sweep"]) for r in renders}) == 2  # one label per cfg value


def test_a_wildcard_job_draws_the_same_prompts_for_the_same_seeds(world: World) -> None:
    template = "a {big|tiny|round} __animal__ at dusk"
    text = f'checkpoint = "tiny-sdxl"\nprompt = "{template}"\nseed = 40\ncount = 6\n'
    first = [(r.seed, r.prompt) for r in _parse(world, text).renders]
    assert first == [(r.seed, r.prompt) for r in _parse(world, text).renders]
    assert [seed for seed, _ in first] == list(range(40, 46))
    for _, prompt in first:
        assert "{" not in prompt and "__" not in prompt
        assert any(animal in prompt for animal in ("cat", "dog", "fox", "owl"))
    assert len({prompt for _, prompt in first}) > 1  # each seed draws its own
    renders = _parse(world, text).renders
    assert all(r.extra["prompt_template"] == template for r in renders)


def test_resolving_writes_nothing_and_needs_no_jobs_folder(world: World) -> None:
    """A good and a bad job resolved: no statement that writes reaches the database from
    this thread, and no file or folder appears (jobs/ is never made)."""
    statements: list[str] = []
    me = threading.get_ident()

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.get_ident() == me:  # the registry hashes models in its own thread
            statements.append(statement.lstrip().split(None, 1)[0].upper())

    def files() -> set[Path]:
        return {path for path in world.root.rglob("*") if "inventory.db" not in path.name}

    before = files()
    event.listen(world.store.engine, "before_cursor_execute", record)
    try:
        assert _parse(world, _job(count=2) + LORAS).renders
        with pytest.raises(JobFileError):
            _parse(world, _job("no-such-model"))
    finally:
        event.remove(world.store.engine, "before_cursor_execute", record)
    assert statements, "the recorder saw no reads either"
    assert not {"INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER"} & set(statements)
    assert not world.resolver.config.paths.jobs.exists()
    assert files() == before
