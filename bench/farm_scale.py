"""Benchmark: how a farm scales on one PostgreSQL, with simulated GPUs.

    .venv/bin/python bench/farm_scale.py [--sizes 1,2,4,8,16,32] [--renders-per-daemon 50]
        [--steps 10] [--step-seconds 0.2] [--max-batch 2] [--lease-seconds 30]
        [--kill-at 32] [--postgres postgresql://postgres@127.0.0.1/postgres]

For each size N: N real daemons (`lorafarm run`, each its own state folder and --name,
stopped with SIGTERM once the queue is empty) on a fresh database, one shared jobs/ inbox
and outputs/ folder, and one queue of N x renders-per-daemon renders over four checkpoints
and four LoRA sets. The checkpoints are bench/sim_gpu.py's: a render sleeps steps x
step-seconds (the GPU's time) and costs no CPU, so what is measured is lorafarm itself:
intake, claims, leases, heartbeats, outputs, history.

The queue is paused while the daemons start and take the job files in, and resumed once
every daemon is up: start-up is not in the throughput. Printed per size:

- renders/min from the first claim to the last render recorded, and the scaling efficiency
  (throughput / (N x one daemon's)); "of GPU" is the throughput over what N simulated GPUs
  could do if they never waited (full batches back to back);
- claim latency p50/p95: per worker, from recording a batch to holding the next one (the
  claim query with its locks, plus the loop's own hand-off);
- database connections in use (pg_stat_activity, the most seen, and how many were active);
- heartbeat writes per second (host-row updates), and commits per second on the database;
- the machine's CPU busy share over the run (this bench shares the cores with the daemons).

With --kill-at N (default the largest size), one more run of N daemons where a quarter of
them are SIGKILLed half-way: it checks that every render ended done exactly once (one
render_done event, one output file each) and says how long the others took to finish the
renders the dead hosts held (the lease has to run out first: lease_seconds).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHECKPOINTS = ("sim-a", "sim-b", "sim-c", "sim-d")
LORA_SETS: tuple[tuple[str, ...], ...] = ((), ("ink",), ("glow",), ("ink", "glow"))
RENDERS_PER_JOB = 5


@dataclass
class Case:
    daemons: int
    renders: int
    wall_seconds: float = 0.0
    per_minute: float = 0.0
    claim_gaps: list[float] = field(default_factory=list)
    connections_max: int = 0
    active_max: int = 0
    heartbeats_per_second: float = 0.0
    commits_per_second: float = 0.0
    cpu_busy: float = 0.0
    rss_mb: float = 0.0
    startup_seconds: float = 0.0
    done: int = 0
    duplicates: int = 0
    outputs: int = 0
    killed: int = 0
    recover_seconds: float | None = None
    errors: list[str] = field(default_factory=list)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def write_assets(root: Path, step_seconds: float) -> None:
    from bench.sim_gpu import write_sim_checkpoint, write_sim_lora

    for name in CHECKPOINTS:
        write_sim_checkpoint(root / "models" / f"{name}.safetensors", step_seconds)
    write_sim_lora(root / "loras" / "ink.safetensors", rank=2, seed=1)
    write_sim_lora(root / "loras" / "glow.safetensors", rank=4, seed=2)


def write_jobs(jobs: Path, renders: int, steps: int) -> int:
    jobs.mkdir(parents=True, exist_ok=True)
    count = 0
    for n in range(renders // RENDERS_PER_JOB):
        loras = "".join(f'[[loras]]\nname = "{name}"\nstrength = 0.8\n'
                        for name in LORA_SETS[(n // len(CHECKPOINTS)) % len(LORA_SETS)])
        text = (f'checkpoint = "{CHECKPOINTS[n % len(CHECKPOINTS)]}"\n'
                f'prompt = "a lighthouse, take {n}"\nseed = {1000 + n}\n'
                f"count = {RENDERS_PER_JOB}\nsteps = {steps}\n{loras}")
        temp = jobs / f".j{n:04d}.toml.tmp"
        temp.write_text(text)
        temp.replace(jobs / f"j{n:04d}.toml")
        count += 1
    return count


def run_case(daemons: int, args: argparse.Namespace, assets: Path, *, kill: bool) -> Case:
    import psycopg

    from daemon.queue import control
    from daemon.store.models import Store

    renders = daemons * args.renders_per_daemon
    renders -= renders % RENDERS_PER_JOB
    case = Case(daemons=daemons, renders=renders)
    name = f"lorafarm_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        store = Store.for_url("postgresql+psycopg://" + url.split("://", 1)[1])
        store.migrate()
        control.pause(store, by="bench")  # nothing is claimed until every daemon is up
        with tempfile.TemporaryDirectory(prefix="farm-scale-") as tmp:
            root = Path(tmp)
            jobs, outputs = root / "shared" / "jobs", root / "shared" / "outputs"
            jobs.mkdir(parents=True)
            started = time.perf_counter()
            for i in range(daemons):
                host = root / f"host{i}"
                host.mkdir()
                (host / "config.toml").write_text(
                    f'plugins = ["bench.sim_gpu"]\nlease_seconds = {args.lease_seconds}\n'
                    f"database_pool_size = {args.pool_size}\n"
                    f'[paths]\njobs = "{jobs}"\noutputs = "{outputs}"\n'
                    f'models = "{assets / "models"}"\nloras = "{assets / "loras"}"\n'
                    '[intake]\nsettle_seconds = 0.0\nretry_young_seconds = 0.0\n'
                    f'[worker]\nmax_batch = {args.max_batch}\ndevice = "cpu"\n'
                    '[web]\nenabled = false\n[report]\nenabled = false\n')
                log = open(host / "daemon.log", "wb")  # noqa: SIM115 (closed with the folder)
                procs.append(subprocess.Popen(
                    ["nice", "-n", "5", sys.executable, "-m", "daemon.cli", "run", "--config",
                     str(host / "config.toml"), "--name", f"h{i}"],
                    cwd=host, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                         "LORAFARM_DATABASE_URL": url}))
            with psycopg.connect(url, autocommit=True) as db:
                try:
                    # The job files go in once every daemon is up and heartbeating, so that
                    # intake on any host sees every host's models and LoRAs.
                    _wait_until_up(db, daemons, procs)
                    files = write_jobs(jobs, renders, args.steps)
                    _wait_until_queued(db, daemons, files, renders, procs)
                except StartFailed as exc:
                    case.errors.append(str(exc))
                    for i in range(daemons):
                        text = (root / f"host{i}" / "daemon.log").read_text(errors="replace")
                        if "Traceback" in text or "Error" in text:
                            case.errors.append(f"host{i}: {text.strip()[-1500:]}")
                            break
                    return case
                case.startup_seconds = time.perf_counter() - started
                case.rss_mb = statistics.mean(_rss_mb(p.pid) for p in procs)
                before = _db_counters(db, name)
                cpu_before = _cpu_times()
                t0 = time.perf_counter()
                control.resume(store, by="bench")
                store.dispose()
                _watch(db, name, case, procs, kill=kill)
                for proc in procs:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)  # finish the batch, then leave
                for proc in procs:
                    try:
                        proc.wait(timeout=300)
                    except subprocess.TimeoutExpired:
                        case.errors.append(f"daemon pid {proc.pid} did not leave; killed")
                        proc.kill()
                window = time.perf_counter() - t0
                after = _db_counters(db, name)
                cpu_after = _cpu_times()
                case.cpu_busy = ((cpu_after[0] - cpu_before[0])
                                 / max(1, cpu_after[1] - cpu_before[1]))
                case.heartbeats_per_second = (after[1] - before[1]) / window
                case.commits_per_second = (after[0] - before[0]) / window
                _results(db, case)
            case.outputs = len(list(outputs.rglob("*.png")))
            codes = [p.returncode for p in procs]
            bad = [c for c in codes if c not in (0, -signal.SIGKILL)]
            if bad:
                case.errors.append(f"daemon exit codes {codes}")
                log_tail = (root / "host0" / "daemon.log").read_text()[-2000:]
                case.errors.append(log_tail)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return case


def _wait_until_up(db, daemons: int,  # type: ignore[no-untyped-def]
                   procs: list[subprocess.Popen[bytes]]) -> None:
    """Every daemon registered and past its start-up (its first heartbeat came after)."""
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        up = db.execute("SELECT count(*) FROM hosts WHERE state = 'running' "
                        "AND heartbeat_at > started_at").fetchone()[0]
        if up == daemons:
            return
        _check_alive(procs, f"{up} of {daemons} up")
        time.sleep(0.5)
    raise StartFailed("the daemons took more than 20 minutes to start")


def _wait_until_queued(db, daemons: int, files: int, renders: int,  # type: ignore[no-untyped-def]
                       procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        taken, rejected, queued = db.execute(
            "SELECT count(*), count(*) FILTER (WHERE state = 'rejected'), "
            "(SELECT count(*) FROM renders) FROM jobs").fetchone()
        if rejected:
            error = db.execute("SELECT error FROM jobs WHERE state = 'rejected' LIMIT 1"
                               ).fetchone()[0]
            raise StartFailed(f"{rejected} job file(s) rejected, e.g.: {error}")
        if taken == files and queued == renders:
            return
        _check_alive(procs, f"{taken} of {files} job files taken")
        time.sleep(0.5)
    raise StartFailed(f"taking {files} job files in took more than 15 minutes")


def _check_alive(procs: list[subprocess.Popen[bytes]], where: str) -> None:
    dead = [p.returncode for p in procs if p.poll() is not None]
    if dead:
        raise StartFailed(f"{len(dead)} daemon(s) exited during start-up (exit codes {dead}); "
                          f"{where}")


class StartFailed(RuntimeError):
    """Not every daemon came up."""


def _db_counters(db, name: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    db.execute("SELECT pg_stat_clear_snapshot()")  # a fresh look, not this session's cache
    commits = db.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                         (name,)).fetchone()[0]
    hosts = db.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'hosts'"
                       ).fetchone()[0]
    return int(commits), int(hosts)


def _watch(db, name: str, case: Case, procs: list[subprocess.Popen[bytes]], *,  # type: ignore[no-untyped-def]
           kill: bool) -> None:
    killed_at: float | None = None
    orphans: list[int] = []
    while True:
        done, left = db.execute(
            "SELECT count(*) FILTER (WHERE state IN ('done', 'failed', 'cancelled')), "
            "count(*) FILTER (WHERE state IN ('queued', 'running')) FROM renders").fetchone()
        total, active = db.execute(
            "SELECT count(*), count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()
        case.connections_max = max(case.connections_max, total)
        case.active_max = max(case.active_max, active)
        if kill and killed_at is None and done >= case.renders // 2:
            victims = procs[: max(1, len(procs) // 4)]
            for proc in victims:
                proc.send_signal(signal.SIGKILL)
            killed_at = time.perf_counter()
            case.killed = len(victims)
            names = [f"h{i}/%" for i in range(len(victims))]
            orphans = [row[0] for row in db.execute(
                "SELECT id FROM renders WHERE state = 'running' AND worker LIKE ANY(%s)",
                (names,))]
        if killed_at is not None and case.recover_seconds is None:
            if not orphans or db.execute(
                    "SELECT count(*) FROM renders WHERE id = ANY(%s) "
                    "AND state IN ('queued', 'running')", (orphans,)).fetchone()[0] == 0:
                case.recover_seconds = time.perf_counter() - killed_at
        if left == 0 and (not kill or case.recover_seconds is not None):
            return
        if all(p.poll() is not None for p in procs):
            case.errors.append(f"every daemon left with {left} render(s) not done")
            return
        time.sleep(0.25)


def _results(db, case: Case) -> None:  # type: ignore[no-untyped-def]
    first, last = db.execute(
        "SELECT (SELECT min(started_at) FROM batches), max(finished_at) FROM renders"
        ).fetchone()
    case.wall_seconds = (last - first).total_seconds()
    case.done = db.execute("SELECT count(*) FROM renders WHERE state = 'done'").fetchone()[0]
    case.per_minute = case.done / case.wall_seconds * 60 if case.wall_seconds else 0.0
    case.duplicates = db.execute(
        "SELECT count(*) FROM (SELECT render_id FROM events WHERE kind = 'render_done' "
        "GROUP BY render_id HAVING count(*) > 1) AS twice").fetchone()[0]
    rows = db.execute("SELECT worker, started_at, finished_at FROM batches "
                      "WHERE finished_at IS NOT NULL ORDER BY worker, started_at").fetchall()
    previous: dict[str, object] = {}
    for worker, started_at, finished_at in rows:
        before = previous.get(worker)
        if before is not None:
            case.claim_gaps.append(max(0.0, (started_at - before).total_seconds()))
        previous[worker] = finished_at


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,4,8,16,32")
    parser.add_argument("--renders-per-daemon", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.2)
    parser.add_argument("--max-batch", type=int, default=2)
    # Long enough for a daemon's start-up on a loaded machine (its first heartbeat comes
    # after it); the SIGKILL run's recovery time is about this long.
    parser.add_argument("--lease-seconds", type=float, default=30.0)
    parser.add_argument("--pool-size", type=int, default=0,
                        help="database_pool_size for every daemon (0: the default pool)")
    parser.add_argument("--kill-at", type=int, default=None,
                        help="daemons in the SIGKILL run (default: the largest size; 0: none)")
    parser.add_argument("--postgres", default=os.environ.get(
        "LORAFARM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/postgres"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes and not args.kill_at:
        parser.error("give --sizes, or --sizes '' with --kill-at N for the SIGKILL run alone")
    kill_at = max(sizes) if args.kill_at is None else args.kill_at
    print(f"simulated GPU: {args.steps} steps x {args.step_seconds} s per batch (max_batch "
          f"{args.max_batch}), {args.renders_per_daemon} renders per daemon, lease "
          f"{args.lease_seconds:g} s, database_pool_size {args.pool_size}, {os.cpu_count()} CPU "
          "cores", flush=True)
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="farm-scale-assets-") as tmp:
        assets = Path(tmp)
        write_assets(assets, args.step_seconds)
        for size in sizes:
            case = run_case(size, args, assets, kill=False)
            cases.append(case)
            _print_case(case, cases[0], args)
        if kill_at:
            case = run_case(kill_at, args, assets, kill=True)
            print(f"\nSIGKILL {case.killed} of {case.daemons} daemons half-way: "
                  f"{case.done}/{case.renders} renders done, {case.duplicates} recorded twice, "
                  f"{case.outputs} output files; the dead hosts' renders were done by the "
                  f"others {case.recover_seconds if case.recover_seconds is not None else -1:.1f}"
                  f" s after the kill (lease {args.lease_seconds:g} s); "
                  f"{case.per_minute:.0f} renders/min overall", flush=True)
            for error in case.errors:
                print(f"  ! {error}")


def _print_case(case: Case, first: Case, args: argparse.Namespace) -> None:
    if case is first:
        print(f"\n{'N':>3} {'renders':>7} {'r/min':>7} {'eff':>5} {'of GPU':>6} {'claim p50':>9} "
              f"{'p95':>6} {'conns':>5} {'active':>6} {'hb/s':>5} {'commit/s':>8} "
              f"{'cpu':>4} {'RSS MB':>6} {'start s':>7} ok", flush=True)
    one = first.per_minute / first.daemons
    efficiency = case.per_minute / (case.daemons * one) if one else float("nan")
    ok = (case.done == case.renders and case.duplicates == 0 and case.outputs == case.renders
          and not case.errors)
    ideal = case.daemons * args.max_batch * 60 / (args.steps * args.step_seconds)
    print(f"{case.daemons:>3} {case.renders:>7} {case.per_minute:>7.0f} {efficiency:>5.2f} "
          f"{case.per_minute / ideal:>6.0%} "
          f"{_percentile(case.claim_gaps, 0.5) * 1000:>7.0f}ms "
          f"{_percentile(case.claim_gaps, 0.95) * 1000:>4.0f}ms {case.connections_max:>5} "
          f"{case.active_max:>6} {case.heartbeats_per_second:>5.1f} "
          f"{case.commits_per_second:>8.0f} {case.cpu_busy:>4.0%} {case.rss_mb:>6.0f} "
          f"{case.startup_seconds:>7.0f} {'yes' if ok else 'NO'}", flush=True)
    for error in case.errors:
        print(f"  ! {error}")


if __name__ == "__main__":
    main()
