"""`lorafarm demo`: a self-contained folder a new user can run on a laptop CPU.

It asks every installed family for its tiny random-weight checkpoints (written the way users
have them: diffusers folders and single files) and sample jobs, and writes a config.toml
next to them. Outputs are noise-like images; what matters is that they went through the real
loading, rendering and metadata path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from daemon.contract.loader import Plugins

log = logging.getLogger(__name__)

DEMO_CONFIG_HEAD = """\
# lorafarm demo configuration, written by `lorafarm demo`.
# Paths are relative to this file. See config.toml in the lorafarm repository for every
# setting with its explanation.

[paths]
jobs = "jobs"
loras = "loras"
models = "models"
inputs = "inputs"
outputs = "outputs"
state = "state"

[intake]
# The demo writes its jobs before the daemon starts: no need to wait for writers.
settle_seconds = 0.2
retry_young_seconds = 1.0
rescan_seconds = 5.0

[worker]
max_batch = 4
"""


def write_demo(directory: Path, plugins: Plugins) -> Path:
    """Write tiny checkpoints, sample jobs and config.toml under `directory`; returns the
    config path. Existing job and output folders are left alone (re-running adds jobs)."""
    directory = directory.resolve()
    models = directory / "models"
    configs = directory / "configs"
    jobs = directory / "jobs"
    for folder in (models, configs, jobs):
        folder.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, dict[str, str]] = {}
    sample_jobs: dict[str, str] = {}
    for family in plugins.families.values():
        assets = family.build_demo(models, configs)
        if assets is None:
            log.info("the %s family has no demo checkpoints (no build_demo); skipped",
                     family.display_name)
            continue
        overrides.update(assets.checkpoint_overrides)
        sample_jobs.update(assets.jobs)
    lines = [DEMO_CONFIG_HEAD]
    for name, table in sorted(overrides.items()):
        lines.append(f"\n[checkpoints.{json.dumps(name)}]")
        for key, value in table.items():
            lines.append(f"{key} = {json.dumps(value)}")
    config_path = directory / "config.toml"
    config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for file_name, text in sample_jobs.items():
        # Written under a temporary name and renamed in, as any well-behaved job writer does.
        temp = jobs / f".{file_name}.tmp"
        temp.write_text(text, encoding="utf-8")
        temp.replace(jobs / file_name)
    return config_path
