"""Helpers shared by the tests and the soak scripts: job files, farm configs, history rows and
pixels, written once so that every test builds them the same way.

Imports of the daemon happen inside the functions that need them: the kill-and-restart
harnesses import this module in a process that only spawns daemons.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.runtime.runner import Daemon
    from daemon.store.models import Store

# The repository root: subprocesses get it as PYTHONPATH, the architecture tests read it.
REPO = Path(__file__).resolve().parents[2]


# -- job files ------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """One value as TOML writes it: strings quoted (non-ASCII kept as is), floats with their
    decimal point (`5.0`), booleans lower case, lists of those in brackets."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(value)


def job_text(**fields: Any) -> str:
    """The text of a job file, one `key = value` line per keyword in the order given:
    `job_text(checkpoint="tiny-sdxl", prompt="a cat", seed=3)`. Tables (`[[loras]]`,
    `[sweep]`, `[hires]`) are appended by the caller as text, where a test reads best."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in fields.items())


# -- configs --------------------------------------------------------------------------------


def config_text(data: dict[str, Any]) -> str:
    """A config.toml from a dict: top-level settings first, then one `[section]` per table;
    a table of tables (`checkpoints`, `devices`) becomes `[checkpoints."name"]` tables."""
    lines = [f"{key} = {toml_value(value)}" for key, value in data.items()
             if not isinstance(value, dict)]
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        if values and all(isinstance(table, dict) for table in values.values()):
            for name, table in values.items():
                lines.append(f'[{section}."{name}"]')
                lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_config(root: Path, data: dict[str, Any]) -> Path:
    """Write `root/config.toml` from `data` (see `config_text`) and return its path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.toml"
    path.write_text(config_text(data), encoding="utf-8")
    return path


def daemon_config(models: Path, configs: Path | None = None, *, max_attempts: int,
                  paths: dict[str, str] | None = None, **top: Any) -> dict[str, Any]:
    """The config of a daemon run as a real process (the kill harnesses, the farm hosts):
    instant intake, batches of two, no page or report. `configs`: the demo's config folders,
    for its single-file SDXL checkpoint; `paths`: folders besides models/ (shared ones for a
    farm host); `top`: top-level settings such as `lease_seconds`."""
    data: dict[str, Any] = dict(top)
    data["paths"] = {**(paths or {}), "models": str(models)}
    data["intake"] = {"settle_seconds": 0.0, "retry_young_seconds": 0.0, "rescan_seconds": 1.0}
    data["worker"] = {"max_batch": 2, "max_attempts": max_attempts}
    data["web"] = {"enabled": False}
    data["report"] = {"enabled": False}
    if configs is not None:
        data["checkpoints"] = {"tiny-sdxl-single": {"config": str(configs / "tiny-sdxl")}}
    return data


# -- the history ----------------------------------------------------------------------------


@contextmanager
def read_store(config: Config) -> Iterator[Store]:
    """A test's SQLite history opened the way a reader opens it (not the writer), closed
    afterwards so that no connection outlives the test."""
    from daemon.store.models import Store

    store = Store(f"sqlite:///{config.paths.database}", writer=False)
    try:
        yield store
    finally:
        store.dispose()


def query(config: Config, statement: Any) -> list[Any]:
    """The scalars a SELECT returns from a test's history: rows of a model, or one column."""
    with read_store(config) as store, store.session() as session:
        return list(session.scalars(statement))


def rows(config: Config, model: Any) -> list[Any]:
    """Every row of a table (`Render`, `Job`, `Batch`...) in the order they were written."""
    from sqlalchemy import select

    return query(config, select(model).order_by(model.id))


# -- images ---------------------------------------------------------------------------------


def pixels_of(image: Path | Image.Image) -> np.ndarray:
    """An image's RGB pixels as signed integers, so that differences of two are not wrapped."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.int16)
    with Image.open(image) as opened:
        return np.asarray(opened.convert("RGB"), dtype=np.int16)


def run_in_thread(daemon: Daemon) -> threading.Thread:
    """The daemon running in a thread, its start-up (migration, scans) done."""
    thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not daemon._started.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon._started.is_set(), "the daemon did not start"
    return thread


def die_in_the_last_attempt(farm: Any, attempts: int) -> None:
    """A daemon takes in one job of one render and dies inside that render's pipeline call
    (step 0 recorded: evidence against it) at attempt `attempts`; the next start's
    recovery finds it so."""
    from sqlalchemy import update

    from daemon.queue.scheduler import claim_next_batch, record_progress
    from daemon.store.models import Render
    from tests.conftest import sdxl_job  # conftest imports this module

    farm.drop("poison.toml", sdxl_job(count=1))
    daemon = farm.daemon()
    daemon.start()
    [claimed] = claim_next_batch(daemon.store, max_batch=4)
    record_progress(daemon.store, [claimed.render_id], 0, 3, claimed.worker)
    with daemon.store.session() as session:
        session.execute(update(Render).values(attempts=attempts))
    daemon.close()
