"""Restart soak: SIGKILL the daemon at random moments over a mixed queue (SDXL with a kohya
LoRA, Flux.1, Wan 2.2 video, an SDXL sweep), restart it each time, then let it finish and
check that every render was done exactly once, every job file was filed, and no render was
failed by the attempt cap (only evidence counts against a render; these renders are
innocent). Not part of `make test`: it takes minutes.

    .venv/bin/python -m tests.support.restart_soak --kills 100 [--seed 7] [--json figures.json] \
        [--doc]

`--doc` writes the figures into docs/RELIABILITY.md (the "Restart soak" section, which
`make reliability` keeps as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.support import fault_harness
from tests.support.helpers import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

DOC = REPO / "docs" / "RELIABILITY.md"
SECTION_START = "<!-- restart-soak: written by python -m tests.support.restart_soak --doc -->"
SECTION_END = "<!-- /restart-soak -->"

SDXL_LORA = """\
checkpoint = "tiny-sdxl"
prompt = "an inked lighthouse, job {n}"
seed = {seed}
count = {count}
steps = {steps}
sampler = "Euler"
width = 64
height = 64
[[loras]]
name = "ink"
strength = 0.8
"""
FLUX = """\
checkpoint = "tiny-flux-dev"
prompt = "a harbour at dawn, job {n}"
seed = {seed}
count = {count}
steps = {steps}
width = 64
height = 64
"""
WAN = """\
checkpoint = "tiny-wan22-t2v-a14b"
prompt = "a red boat on a lake, job {n}"
seed = {seed}
count = {count}
steps = {steps}
width = 64
height = 64
frames = 5
fps = 8
"""
SWEEP = """\
checkpoint = "tiny-sdxl"
prompt = "a lighthouse at night, job {n}"
seed = {seed}
count = {count}
steps = {steps}
sampler = "Euler"
width = 64
height = 64
[sweep]
cfg = [4.0, 6.0]
"""
KINDS = {"sdxl+lora": (SDXL_LORA, 1), "flux.1": (FLUX, 1), "wan2.2": (WAN, 1),
         "sdxl sweep": (SWEEP, 2)}  # template, renders per count


@dataclass
class Soak:
    kills: int = 0  # SIGKILLs sent from outside at a random moment
    claim_gap_kills: int = 0  # runs that killed themselves between claim rename and insert
    runs: int = 0
    runs_finished_alone: int = 0
    jobs_dropped: dict[str, int] = field(default_factory=dict)
    renders_expected: int = 0
    renders_done: int = 0
    renders_done_twice: int = 0
    renders_failed_by_the_cap: int = 0
    renders_not_done: int = 0
    unrecorded_outputs: int = 0
    partial_outputs: int = 0
    job_files_filed: int = 0
    job_files_not_filed: int = 0
    renders_charged_an_attempt_by_a_death: int = 0
    most_deaths_one_render_survived: int = 0
    host_rows: int = 0
    integrity: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def write_config(root: Path, models: Path) -> Path:
    """The harness's lone-daemon config, with the default attempt cap the soak is about."""
    return fault_harness.write_config(root, models, max_attempts=3)


def spawn(config: Path, fault: str | None = None, *,
          until_idle: bool = True) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if fault:
        env["LORAFARM_FAULT_POINT"] = fault
    log = (config.parent / "daemon.log").open("ab")
    args = [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)]
    return subprocess.Popen(args + (["--until-idle"] if until_idle else []), cwd=config.parent,
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def drop(jobs: Path, name: str, text: str) -> None:
    temp = jobs / f".{name}.tmp"
    temp.write_text(text)
    temp.replace(jobs / name)


def _wait_until_started(root: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the daemon has finished its start-up (its `daemon_started` event): it is then
    taking files in, claiming and rendering."""
    database = root / "state" / "lorafarm.sqlite"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as db:
                if db.execute("SELECT 1 FROM events WHERE kind = 'daemon_started' AND "
                              "message = ?", (f"pid {proc.pid}",)).fetchone():
                    return
        except sqlite3.Error:
            pass  # not created yet, or busy
        time.sleep(0.05)


def run(root: Path, models: Path, kills: int, seed: int) -> Soak:
    from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original

    rng = random.Random(seed)
    soak = Soak(jobs_dropped={kind: 0 for kind in KINDS})
    config = write_config(root, models)
    jobs = root / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    (root / "loras").mkdir(exist_ok=True)
    write_kohya_original(make_tiny_lora(seed=21, scale=2.0), root / "loras" / "ink.safetensors")
    (root / "loras" / "ink.toml").write_text('family = "sdxl"\nlineage = "sdxl"\n')
    started = time.monotonic()
    number = 0

    def drop_job() -> None:
        nonlocal number
        kind = rng.choice(list(KINDS))
        template, per_count = KINDS[kind]
        count = rng.randint(1, 2)
        drop(jobs, f"j{number:03d}-{kind.replace(' ', '-').replace('+', '-')}.toml",
             template.format(n=number, seed=1000 + number, count=count,
                             steps=rng.randint(2, 4)))
        soak.jobs_dropped[kind] += 1
        soak.renders_expected += count * per_count
        number += 1

    for _ in range(4):
        drop_job()
    while soak.kills < kills:
        drop_job()  # work keeps arriving, so kills land on intake too
        gap = rng.random() < 0.05  # now and then, die exactly between claim and insert
        # Runs to be killed do not leave when the queue is empty: every one is killed.
        proc = spawn(config, fault="claim_taken" if gap else None, until_idle=gap)
        soak.runs += 1
        if gap:
            drop_job()  # something for it to claim
            proc.wait(timeout=300)
            soak.claim_gap_kills += proc.returncode == -signal.SIGKILL
            continue
        if rng.random() < 0.8:  # while it takes files in, claims, renders, writes, records
            _wait_until_started(root, proc, timeout=300)
            # Long enough, on a loaded machine, for an interrupted render to be redone alone
            # now and then; shorter would kill it while loading at every restart.
            delay = rng.uniform(0.0, 10.0)
        else:  # anywhere in start-up: imports, migrations, recovery, claim-folder returns
            delay = rng.uniform(0.5, 9.0)
        try:
            proc.wait(timeout=delay)
            soak.runs_finished_alone += 1
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            soak.kills += 1
    final = spawn(config)
    if final.wait(timeout=1800) != 0:
        soak.problems.append(f"the final run exited with {final.returncode}")
    check(root, soak)
    soak.seconds = round(time.monotonic() - started, 1)
    return soak


def check(root: Path, soak: Soak) -> None:
    connection = sqlite3.connect(root / "state" / "lorafarm.sqlite")
    try:
        soak.integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        renders = connection.execute(
            "SELECT id, state, attempts, deaths, output_path, error FROM renders").fetchall()
        jobs = connection.execute("SELECT id, state, file_path, file_name FROM jobs").fetchall()
        soak.host_rows = connection.execute("SELECT count(*) FROM hosts").fetchone()[0]
        done_events = connection.execute(
            "SELECT render_id, count(*) FROM events WHERE kind = 'render_done' "
            "GROUP BY render_id HAVING count(*) > 1").fetchall()
    finally:
        connection.close()
    if soak.integrity != "ok":
        soak.problems.append(f"integrity_check: {soak.integrity}")
    soak.renders_done_twice = len(done_events)
    if len(renders) != soak.renders_expected:
        soak.problems.append(f"{len(renders)} render rows for {soak.renders_expected} "
                             "renders dropped")
    recorded: set[str] = set()
    for render_id, state, attempts, deaths, output, error in renders:
        soak.most_deaths_one_render_survived = max(soak.most_deaths_one_render_survived,
                                                   deaths if state == "done" else 0)
        # Each render is claimed once per try: attempts above one are deaths it was charged.
        soak.renders_charged_an_attempt_by_a_death += attempts > 1
        if state != "done":
            soak.renders_not_done += 1
            if error and "died" in error:
                soak.renders_failed_by_the_cap += 1
            soak.problems.append(f"render {render_id} ended {state}: {error}")
            continue
        soak.renders_done += 1
        if not output or not Path(output).exists():
            soak.problems.append(f"render {render_id} done without its file {output}")
            continue
        recorded.add(str(Path(output).with_suffix("")))
    files = [p for p in (root / "outputs").rglob("*") if p.is_file()]
    soak.partial_outputs = sum(1 for p in files if p.name.startswith("."))
    soak.unrecorded_outputs = sum(
        1 for p in files if p.suffix in (".png", ".mp4") and not p.name.startswith(".")
        and p.name != "grid.png" and str(p.with_suffix("")) not in recorded)
    if soak.partial_outputs or soak.unrecorded_outputs or soak.renders_done_twice:
        soak.problems.append(f"{soak.partial_outputs} partial and {soak.unrecorded_outputs} "
                             f"unrecorded output files, {soak.renders_done_twice} renders "
                             "recorded done twice")
    for job_id, state, file_path, file_name in jobs:
        path = Path(file_path) if file_path else None
        if state == "done" and path is not None and path.parent.name == "done" \
                and path.exists():
            soak.job_files_filed += 1
        else:
            soak.job_files_not_filed += 1
            soak.problems.append(f"job {job_id} ({file_name}) is {state}, its file at "
                                 f"{file_path}")
    jobs_dir = root / "jobs"
    left = [p.name for p in jobs_dir.iterdir() if p.is_file()]
    left += [str(p.relative_to(jobs_dir)) for p in jobs_dir.glob(".taking-*/*")]
    left += [p.name for p in (jobs_dir / "processing").iterdir()]
    if left:
        soak.job_files_not_filed += len(left)
        soak.problems.append(f"job files left behind: {left}")


def write_doc_section(soak: Soak, args: argparse.Namespace) -> None:
    dropped = ", ".join(f"{n} {kind}" for kind, n in soak.jobs_dropped.items())
    figures = [
        ("SIGKILLs at random moments / runs killed between claim and insert",
         f"{soak.kills} / {soak.claim_gap_kills}"),
        ("daemon runs (of them finished before their kill)",
         f"{soak.runs} ({soak.runs_finished_alone})"),
        ("job files dropped", f"{sum(soak.jobs_dropped.values())} ({dropped})"),
        ("renders expected / done / recorded done twice",
         f"{soak.renders_expected} / {soak.renders_done} / {soak.renders_done_twice}"),
        ("**renders failed by the attempt cap**", f"**{soak.renders_failed_by_the_cap}**"),
        ("renders not done", str(soak.renders_not_done)),
        ("renders charged an attempt by a death",
         str(soak.renders_charged_an_attempt_by_a_death)),
        ("most deaths a render was caught in (and then done)",
         str(soak.most_deaths_one_render_survived)),
        ("job files filed in done/ / left anywhere else",
         f"{soak.job_files_filed} / {soak.job_files_not_filed}"),
        ("unrecorded / half-written outputs",
         f"{soak.unrecorded_outputs} / {soak.partial_outputs}"),
        ("host rows after all the restarts", str(soak.host_rows)),
        ("SQLite `integrity_check`", soak.integrity),
        ("problems found", str(len(soak.problems))),
    ]
    rows = "\n".join(f"| {what} | {figure} |" for what, figure in figures)
    section = f"""{SECTION_START}
## Restart soak

`python -m tests.support.restart_soak --kills {args.kills} --seed {args.seed}`
({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},
{soak.seconds} s): the daemon is
SIGKILLed at a random moment (in four runs of five 0 to 10 s after its start-up finished,
else 0.5 to 9 s after it was launched, often inside its start-up) and restarted, again and
again while job files keep arriving; one run in twenty kills itself between renaming a job
file into its claim folder and recording it. Then one last run finishes the queue.
`worker.max_attempts` is the default 3.

| what | figure |
|---|---|
{rows}
{SECTION_END}
"""
    text = DOC.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END) + r"\n",
                         re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) \
        else text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--doc", action="store_true", help="write them into RELIABILITY.md")
    args = parser.parse_args()

    from daemon.contract.loader import Plugins
    from daemon.runtime.console import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        # Only the three families' tiny checkpoints: every start scans the models folder.
        families = Plugins().families
        for name in ("sdxl", "flux-dev", "wan22"):
            families[name].build_demo(root / "assets" / "models", root / "assets" / "configs")
        farm = root / "farm"
        farm.mkdir(parents=True, exist_ok=True)
        soak = run(farm, root / "assets" / "models", args.kills, args.seed)
    text = json.dumps(asdict(soak), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.doc:
        write_doc_section(soak, args)
        print(f"written: {DOC}")
    sys.exit(1 if soak.problems else 0)


if __name__ == "__main__":
    main()
