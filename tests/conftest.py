"""Shared fixtures: tiny checkpoints built once per session, and a fresh farm per test.

Tests read like a user's story: `farm.drop("job.toml", text)`, `farm.run()`, then look at
the folders, the output files and the history.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread for every test module: faster and far steadier for models this small, and the
# tolerances the family tests assert were measured so.
torch.set_num_threads(1)

from daemon.cli.demo import write_demo  # noqa: E402
from daemon.config import Config, config_from_dict  # noqa: E402
from daemon.contract.loader import Plugins  # noqa: E402
from daemon.runtime.runner import Daemon  # noqa: E402
from tests.support.helpers import REPO, job_text, write_config  # noqa: E402


@pytest.fixture(scope="session")
def plugins() -> Plugins:
    return Plugins()


@dataclass(frozen=True)
class Assets:
    """The demo's tiny checkpoints, written once per test session."""

    root: Path
    models: Path
    configs: Path
    demo_config: Path
    demo_jobs: Path


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory, plugins: Plugins) -> Assets:
    root = tmp_path_factory.mktemp("assets")
    config = write_demo(root, plugins)
    return Assets(root=root, models=root / "models", configs=root / "configs",
                  demo_config=config, demo_jobs=root / "jobs")


def demo_checkpoint_overrides(assets: Assets) -> dict[str, dict[str, str]]:
    """The demo config's [checkpoints] tables, with paths made absolute."""
    import tomllib

    data = tomllib.loads(assets.demo_config.read_text(encoding="utf-8"))
    overrides = {}
    for name, table in data.get("checkpoints", {}).items():
        overrides[name] = {key: str((assets.root / value).resolve()) if key == "config"
                           else value for key, value in table.items()}
    return overrides


class Farm:
    """A lorafarm folder for one test: its own jobs, outputs and history; the session's
    tiny models unless the test asks for a private copy."""

    def __init__(self, root: Path, assets: Assets, plugins: Plugins, *,
                 private_models: bool = False, **overrides: Any) -> None:
        self.root = root
        self.assets = assets
        self.plugins = plugins
        models = assets.models
        if private_models:
            models = root / "models"
            shutil.copytree(assets.models, models)
        data: dict[str, Any] = {
            "paths": {"jobs": "jobs", "loras": "loras", "models": str(models),
                      "inputs": "inputs", "outputs": "outputs", "state": "state"},
            "intake": {"settle_seconds": 0.0, "retry_young_seconds": 0.0,
                       "rescan_seconds": 1.0},
            "worker": {"max_batch": 4},
            # Tests run many daemons; those that test the page turn it on with a free port.
            "web": {"enabled": False},
            "checkpoints": demo_checkpoint_overrides(assets),
        }
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        self.data = data
        self.config: Config = config_from_dict(data, base=root, source=root / "config.toml")
        self.write_config_file()

    def write_config_file(self) -> Path:
        return write_config(self.root, self.data)

    @property
    def jobs(self) -> Path:
        return self.config.paths.jobs

    @property
    def outputs(self) -> Path:
        return self.config.paths.outputs

    def drop(self, name: str, text: str | bytes) -> Path:
        """Put a job file into jobs/ the way a careful writer does: temp name, then rename."""
        self.jobs.mkdir(parents=True, exist_ok=True)
        temp = self.jobs / f".{name}.tmp"
        temp.write_bytes(text.encode() if isinstance(text, str) else text)
        target = self.jobs / name
        temp.replace(target)
        return target

    def daemon(self) -> Daemon:
        return Daemon(self.config, plugins=self.plugins)

    def run(self) -> int:
        """Run the daemon in this process until nothing is left to do."""
        return self.daemon().run(until_idle=True)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon.cli", *args],
                              capture_output=True, text=True, timeout=timeout, cwd=self.root,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    def history(self) -> list[dict[str, Any]]:
        from daemon.cli.main import history_records

        return history_records(self.config, limit=1000)

    def models(self) -> dict[str, dict[str, Any]]:
        """`lorafarm models --json` by checkpoint name, run in this process (its command
        function: `main` would replace the logging handlers pytest relies on)."""
        from daemon.cli.main import cmd_models

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cmd_models(argparse.Namespace(config=self.config.source, json=True)) == 0
        return {row["name"]: row for row in json.loads(out.getvalue())}

    def files_in(self, folder: str) -> list[str]:
        path = self.jobs / folder
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def rejection(self, job_file: str) -> str:
        """The error report intake wrote beside a rejected job file (`name.toml`)."""
        return (self.jobs / "rejected" / f"{job_file}.error.txt").read_text()

    def wait_for(self, predicate: Any, timeout: float = 60.0, every: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(every)
        raise AssertionError("condition not met in time")


@pytest.fixture
def farm(tmp_path: Path, assets: Assets, plugins: Plugins) -> Iterator[Farm]:
    yield Farm(tmp_path, assets, plugins)


@pytest.fixture
def make_farm(tmp_path: Path, assets: Assets, plugins: Plugins):  # type: ignore[no-untyped-def]
    def _make(**kwargs: Any) -> Farm:
        return Farm(tmp_path, assets, plugins, **kwargs)
    return _make


def sdxl_job(checkpoint: str = "tiny-sdxl", prompt: str = "a red lighthouse", seed: int = 7,
             count: int = 2, steps: int = 3, sampler: str = "DPM++ 2M Karras") -> str:
    """The tiny SDXL job most tests drop: 64x64, a few steps."""
    return job_text(checkpoint=checkpoint, prompt=prompt, negative_prompt="blurry", seed=seed,
                    count=count, steps=steps, cfg=5.0, sampler=sampler, width=64, height=64)


@pytest.fixture(scope="module")
def started_daemon(tmp_path_factory: pytest.TempPathFactory, assets: Assets,
                   plugins: Plugins) -> Iterator[Daemon]:
    """A daemon that has indexed the tiny models but renders nothing: for checking intake
    (`daemon.intake.hot_folder.parse(...)`) many times without a render loop."""
    farm = Farm(tmp_path_factory.mktemp("intake"), assets, plugins)
    daemon = farm.daemon()
    daemon.start()
    yield daemon
    daemon.close()


# -- markers ------------------------------------------------------------------------------

# Test modules whose tests start real lorafarm processes (each pays ~5 s of imports).
PROCESS_MODULES = ("test_cli", "test_fault_injection", "test_recovery", "test_farm")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by what it needs (see [tool.pytest.ini_options] markers)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if "postgres_url" in fixtures:
            item.add_marker(pytest.mark.postgres)
        if module == "test_browser":
            item.add_marker(pytest.mark.browser)
        if module in PROCESS_MODULES:
            item.add_marker(pytest.mark.slow)


# -- PostgreSQL ---------------------------------------------------------------------------

POSTGRES_ADMIN_URL = os.environ.get("LORAFARM_TEST_POSTGRES_URL",
                                    "postgresql://postgres@127.0.0.1/postgres")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards. `.ci/run` makes sure the
    local server is up and sets LORAFARM_REQUIRE_POSTGRES=1, so there a missing server fails
    the suite instead of skipping these tests."""
    import uuid

    import psycopg

    name = f"lorafarm_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("LORAFARM_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
