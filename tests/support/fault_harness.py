"""Fault injection: run the real daemon as a subprocess, SIGKILL it at random moments
(during start-up, intake, a render, an output write, a commit), restart, repeat, and check
that nothing accepted was lost or done twice.

Used by tests/farm/test_fault_injection.py with a few trials; a longer soak is one command:

    .venv/bin/python -m tests.support.fault_harness --trials 100 [--seed 7] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from tests.support.helpers import REPO, daemon_config, job_text
from tests.support.helpers import write_config as write_config_file


def trial_job(checkpoint: str, n: int, seed: int, count: int, steps: int) -> str:
    """Job file `n` of a kill-and-restart run: tiny SDXL, 64x64, Euler."""
    return job_text(checkpoint=checkpoint, prompt=f"a lighthouse, trial {n}", seed=seed,
                    count=count, steps=steps, cfg=5.0, sampler="Euler", width=64, height=64)


@dataclass
class Figures:
    trials: int = 0
    kills: int = 0
    runs_finished_alone: int = 0
    jobs_dropped: int = 0
    renders_expected: int = 0
    renders_done: int = 0
    renders_lost: int = 0
    duplicate_outputs: int = 0
    partial_outputs: int = 0
    misplaced_job_files: int = 0
    integrity: str = ""
    max_attempts_seen: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def write_config(root: Path, models: Path, configs: Path | None = None,
                 max_attempts: int = 50) -> Path:
    """A lone daemon's config for the kill-and-restart harnesses (this one and
    tests/support/restart_soak.py): instant intake, batches of two, no page or report.
    `configs`: the demo's config folders, for its single-file SDXL checkpoint."""
    return write_config_file(root, daemon_config(models, configs, max_attempts=max_attempts))


def spawn(config: Path, *, until_idle: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)]
    if until_idle:
        args.append("--until-idle")
    return subprocess.Popen(args, cwd=config.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def _wait_until_started(root: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the daemon holds its lock (it writes its pid there once it starts)."""
    lock = root / "state" / "daemon.lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if lock.read_text().strip() == str(proc.pid):
                return
        except OSError:
            pass
        time.sleep(0.02)


def drop(jobs: Path, name: str, text: str) -> None:
    jobs.mkdir(parents=True, exist_ok=True)
    temp = jobs / f".{name}.tmp"
    temp.write_text(text)
    temp.replace(jobs / name)


def run_trials(root: Path, models: Path, configs: Path, trials: int, seed: int = 0,
               max_kill_delay: float = 8.0) -> Figures:
    """Kill-and-restart the daemon `trials` times while job files keep arriving, then let
    it finish, and check every promise. Returns the figures (problems listed, not raised)."""
    rng = random.Random(seed)
    figures = Figures()
    config = write_config(root, models, configs)
    jobs = root / "jobs"
    started = time.monotonic()
    expected = 0
    for trial in range(trials):
        # New work arrives between (and so during) the runs: kills hit intake too.
        for _ in range(rng.randint(1, 2)):
            count = rng.randint(1, 3)
            checkpoint = rng.choice(("tiny-sdxl", "tiny-sdxl-single"))
            drop(jobs, f"t{trial:03d}-{figures.jobs_dropped}.toml",
                 trial_job(checkpoint, n=figures.jobs_dropped,
                           seed=1000 * figures.jobs_dropped, count=count,
                           steps=rng.randint(2, 8)))
            figures.jobs_dropped += 1
            expected += count
        proc = spawn(config, until_idle=True)
        # Most kills land once the daemon is up (intake, renders, output writes, commits);
        # some land during start-up itself (imports, migrations, recovery).
        if rng.random() < 0.8:
            _wait_until_started(root, proc, timeout=60)
            delay = rng.uniform(0.0, max_kill_delay / 3)
        else:
            delay = rng.uniform(0.1, max_kill_delay)
        try:
            proc.wait(timeout=delay)
            figures.runs_finished_alone += 1
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            figures.kills += 1
        figures.trials += 1
    final = spawn(config, until_idle=True)
    if final.wait(timeout=600) != 0:
        figures.problems.append(f"the final run exited with {final.returncode}")
    figures.renders_expected = expected
    check(root, figures)
    figures.seconds = round(time.monotonic() - started, 1)
    return figures


def check(root: Path, figures: Figures) -> None:
    database = root / "state" / "lorafarm.sqlite"
    connection = sqlite3.connect(database)
    try:
        figures.integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        renders = connection.execute(
            "SELECT r.id, r.state, r.attempts, r.output_path, j.state, j.file_path, j.file_name "
            "FROM renders r JOIN jobs j ON j.id = r.job_id").fetchall()
        jobs = connection.execute("SELECT id, state, file_path, file_name FROM jobs").fetchall()
    finally:
        connection.close()
    if figures.integrity != "ok":
        figures.problems.append(f"integrity_check: {figures.integrity}")
    done = [r for r in renders if r[1] == "done"]
    figures.renders_done = len(done)
    figures.renders_lost = figures.renders_expected - len(done)
    figures.max_attempts_seen = max((r[2] for r in renders), default=0)
    if len(renders) != figures.renders_expected:
        figures.problems.append(f"{len(renders)} render rows for {figures.renders_expected} "
                                "renders dropped")
    for render_id, state, _attempts, output, *_ in renders:
        if state != "done":
            figures.problems.append(f"render {render_id} ended {state}")
            continue
        path = Path(output)
        if not path.exists():
            figures.problems.append(f"render {render_id} done without its file {path}")
            continue
        try:
            with Image.open(path) as image:
                image.load()  # a half-written PNG fails here
        except Exception as exc:
            figures.problems.append(f"{path} is not a whole PNG: {exc}")
    outputs = root / "outputs"
    files = [p for p in outputs.rglob("*") if p.is_file()]
    figures.partial_outputs = sum(1 for p in files if p.name.startswith(".partial-"))
    pngs = [p for p in files if p.suffix == ".png" and not p.name.startswith(".")]
    recorded = {Path(r[3]) for r in done}
    figures.duplicate_outputs = len([p for p in pngs if p not in recorded])
    if figures.partial_outputs or figures.duplicate_outputs:
        figures.problems.append(f"{figures.partial_outputs} partial and "
                                f"{figures.duplicate_outputs} unrecorded output files")
    for job_id, state, file_path, file_name in jobs:
        folder = {"done": "done", "failed": "failed", "rejected": "rejected"}.get(state)
        path = Path(file_path) if file_path else None
        if folder is None or path is None or path.parent.name != folder or not path.exists():
            figures.misplaced_job_files += 1
            figures.problems.append(f"job {job_id} ({file_name}) is {state} but its file is "
                                    f"at {file_path}")
    leftovers = [p.name for p in (root / "jobs").iterdir() if p.is_file()]
    leftovers += [p.name for p in (root / "jobs" / "processing").iterdir()]
    if leftovers:
        figures.problems.append(f"job files left unprocessed: {leftovers}")


def main() -> None:
    parser = argparse.ArgumentParser(description="SIGKILL soak for the lorafarm daemon")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    import tempfile

    from daemon.cli.demo import write_demo
    from daemon.contract.loader import Plugins

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        assets = root / "assets"
        write_demo(assets, Plugins())
        farm = root / "farm"
        farm.mkdir(parents=True, exist_ok=True)
        figures = run_trials(farm, assets / "models", assets / "configs", args.trials,
                             seed=args.seed)
    text = json.dumps(asdict(figures), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    sys.exit(1 if figures.problems else 0)


if __name__ == "__main__":
    main()
