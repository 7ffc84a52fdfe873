"""Benchmark: renders per minute with one daemon and with two on one PostgreSQL queue.

    .venv/bin/python bench/farm.py [--renders 40] [--postgres postgresql://postgres@127.0.0.1/postgres]

Same queue, same run: the tiny SDXL demo models, 64 px, a fresh database per case. On this
2-core machine two daemons share the same two cores, so the ratio shows the cost of sharing
a queue more than the gain of a second GPU host; on separate hosts the work divides.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run_case(daemons: int, renders: int, admin_url: str, assets: Path) -> float:
    import psycopg

    name = f"lorafarm_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            jobs = root / "shared" / "jobs"
            jobs.mkdir(parents=True)
            for n in range(renders // 2):
                (jobs / f"j{n:03d}.toml").write_text(
                    f'checkpoint = "tiny-sdxl"\nprompt = "a lighthouse"\nseed = {10 * n}\n'
                    'count = 2\nsteps = 8\nsampler = "Euler"\nwidth = 64\nheight = 64\n')
            procs = []
            started = time.perf_counter()
            for i in range(daemons):
                host = root / f"host{i}"
                host.mkdir()
                (host / "config.toml").write_text(
                    f'[paths]\njobs = "{jobs}"\noutputs = "{root / "shared" / "outputs"}"\n'
                    f'models = "{assets / "models"}"\nloras = "{root / "loras"}"\n'
                    '[intake]\nsettle_seconds = 0.0\nretry_young_seconds = 0.0\n'
                    '[worker]\nmax_batch = 4\n[web]\nenabled = false\n'
                    '[report]\nenabled = false\n')
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "daemon.cli", "run", "--config",
                     str(host / "config.toml"), "--until-idle", "--name", f"h{i}"],
                    cwd=host, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                         "LORAFARM_DATABASE_URL": url}))
            codes = [proc.wait() for proc in procs]
            wall = time.perf_counter() - started
            if codes != [0] * daemons:
                raise SystemExit(f"a daemon failed: exit codes {codes}")
        with psycopg.connect(url) as db:
            done = db.execute("SELECT count(*) FROM renders WHERE state = 'done'").fetchone()[0]
        if done != renders:
            raise SystemExit(f"{done} of {renders} renders done")
        return renders / wall * 60
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=40)
    parser.add_argument("--postgres", default=os.environ.get(
        "LORAFARM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/postgres"))
    args = parser.parse_args()
    from daemon.cli.demo import write_demo
    from daemon.contract.loader import Plugins

    with tempfile.TemporaryDirectory() as tmp:
        assets = Path(tmp)
        write_demo(assets, Plugins())
        one = run_case(1, args.renders, args.postgres, assets)
        two = run_case(2, args.renders, args.postgres, assets)
    print(f"{args.renders} renders (tiny SDXL, 64px, 8 steps), wall clock incl. start-up:")
    print(f"  one daemon : {one:6.1f} renders/min")
    print(f"  two daemons: {two:6.1f} renders/min   ratio {two / one:.2f}x")


if __name__ == "__main__":
    main()
