"""One rendered night shared by the page and report tests (rendering it once keeps them fast).

The night: a job with a LoRA (2 renders, done, with a lineage warning), a plain job (2 renders,
done) and a job whose LoRA patches nothing (1 render, failed). Tests that change it (pause,
cancel) put it back the way they found it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from daemon.store.models import Store
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original, write_unmatched
from tests.conftest import Farm, sdxl_job


@dataclass(frozen=True)
class Night:
    farm: Farm
    store: Store
    lora_job: int
    plain_job: int
    failed_job: int


_NIGHTS: dict[str, Night] = {}


@pytest.fixture(scope="session")
def night(tmp_path_factory: pytest.TempPathFactory, assets, plugins) -> Iterator[Night]:  # type: ignore[no-untyped-def]
    # Each test module that imports this fixture gets its own fixture definition (pytest keys
    # them by module), so the night is cached here to be rendered once per session.
    key = str(tmp_path_factory.getbasetemp())
    if key not in _NIGHTS:
        _NIGHTS[key] = _render_night(tmp_path_factory, assets, plugins)
    yield _NIGHTS[key]
    _NIGHTS[key].store.dispose()  # harmless twice; the engine reconnects if used again


def _render_night(tmp_path_factory: pytest.TempPathFactory, assets, plugins) -> Night:  # type: ignore[no-untyped-def]
    farm = Farm(tmp_path_factory.mktemp("night"), assets, plugins)
    loras = farm.config.paths.loras
    loras.mkdir(parents=True, exist_ok=True)
    # No training metadata: its lineage is unknown, which the job page shows as a warning.
    write_kohya_original(make_tiny_lora(seed=21, scale=2.0), loras / "ink.safetensors")
    write_unmatched(loras / "dud.safetensors")
    (loras / "dud.toml").write_text('family = "sdxl"\nlineage = "sdxl"\n')
    farm.drop("inked.toml", sdxl_job(prompt="an inked <lighthouse>", seed=7, count=2)
              + '\n[[loras]]\nname = "ink"\nstrength = 0.8\n')
    farm.drop("plain.toml", sdxl_job(prompt="a plain harbour", seed=20, count=2))
    farm.drop("dud.toml", sdxl_job(prompt="a dud", seed=30, count=1)
              + '\n[[loras]]\nname = "dud"\n')
    assert farm.run() == 0
    ids = {job["file"]: job["id"] for job in farm.history()}
    store = Store.for_path(farm.config.paths.database)
    return Night(farm, store, ids["inked.toml"], ids["plain.toml"], ids["dud.toml"])
