"""Kill the daemon at random moments and restart it: nothing accepted is lost or done twice,
and a render that kills its worker every time ends failed after the attempt cap."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

from tests.support.fault_harness import drop, run_trials, spawn, write_config

TRIALS = 5  # a few minutes at most; `python -m tests.support.fault_harness --trials N` soaks longer


def test_random_sigkills_lose_nothing_and_duplicate_nothing(tmp_path: Path, assets) -> None:
    figures = run_trials(tmp_path, assets.models, assets.configs, TRIALS, seed=11,
                         max_kill_delay=7.0)
    print(json.dumps(asdict(figures), indent=2))
    assert figures.problems == []
    assert figures.kills >= 1
    assert figures.renders_lost == 0 and figures.duplicate_outputs == 0
    assert figures.partial_outputs == 0 and figures.misplaced_job_files == 0
    assert figures.integrity == "ok"
    assert figures.renders_done == figures.renders_expected > 0


def test_a_render_that_kills_its_worker_every_time_ends_failed(tmp_path: Path, assets) -> None:
    config = write_config(tmp_path, assets.models, assets.configs, max_attempts=2)
    # Top-level keys must come before the first table in TOML.
    config.write_text('plugins = ["tests.support.crashing_family"]\n' + config.read_text()
                      + '[checkpoints."tiny-sdxl"]\nfamily = "crashy"\n')
    drop(tmp_path / "jobs", "poison.toml",
         'checkpoint = "tiny-sdxl"\nprompt = "poison"\nseed = 1\nsteps = 2\nwidth = 64\n'
         'height = 64\nsampler = "Euler"\n')
    codes = [spawn(config, until_idle=True).wait(timeout=180) for _ in range(3)]
    assert codes[:2] == [-9, -9]  # SIGKILLed by its own render, twice
    assert codes[2] == 0  # the third start ends it instead of dying again
    with sqlite3.connect(tmp_path / "state" / "lorafarm.sqlite") as db:
        state, attempts, error = db.execute(
            "SELECT state, attempts, error FROM renders").fetchone()
    assert (state, attempts) == ("failed", 2)
    assert "died during this render 2 times" in error
    assert (tmp_path / "jobs" / "failed" / "poison.toml.error.txt").exists()
