"""The farm: several daemons (separate processes, as on separate hosts) share one queue on
the real local PostgreSQL. Nothing is rendered twice, nothing is lost when one dies, a host
without a LoRA's file never gets that work, and a shared jobs folder is ingested once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from tests.conftest import REPO
from tests.support.helpers import daemon_config, job_text, write_config


def _job(checkpoint: str, n: int, seed: int, count: int, steps: int) -> str:
    return job_text(checkpoint=checkpoint, prompt=f"a lighthouse {n}", seed=seed, count=count,
                    steps=steps, cfg=5.0, sampler="Euler", width=64, height=64)


def _config(root: Path, shared: Path, assets, loras: Path, lease: float = 60.0) -> Path:  # type: ignore[no-untyped-def]
    """One host's config: its own state (lock) folder and LoRA folder; the jobs, outputs and
    models folders are shared, as on a network share."""
    paths = {"jobs": str(shared / "jobs"), "outputs": str(shared / "outputs"),
             "loras": str(loras), "state": "state"}
    return write_config(root, daemon_config(assets.models, assets.configs, max_attempts=5,
                                            paths=paths, lease_seconds=lease))


def _spawn(config: Path, name: str, url: str, *, until_idle: bool = True
           ) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "daemon.cli", "run", "--config", str(config), "--name", name]
    if until_idle:
        args.append("--until-idle")
    log = (config.parent / f"{name}.log").open("w")
    return subprocess.Popen(args, cwd=config.parent, stdout=log, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                            "OMP_NUM_THREADS": "1",
                                            "LORAFARM_DATABASE_URL": url})


def _drop(jobs: Path, name: str, text: str) -> None:
    jobs.mkdir(parents=True, exist_ok=True)
    temp = jobs / f".{name}.tmp"
    temp.write_text(text)
    temp.replace(jobs / name)


def _query(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()


def _count(url: str, sql: str) -> int:
    """A count that is 0 until the first daemon has created the schema."""
    try:
        return int(_query(url, sql)[0][0])
    except psycopg.errors.UndefinedTable:
        return 0


def _wait(predicate, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in root.rglob("*.log"))


def test_three_daemons_share_a_queue_and_one_dies_mid_batch(tmp_path: Path, assets,
                                                            postgres_url: str) -> None:
    shared = tmp_path / "shared"
    loras = tmp_path / "loras"
    loras.mkdir()
    configs = [_config(tmp_path / f"host{i}", shared, assets, loras, lease=6.0)
               for i in range(3)]
    expected = 0
    for n in range(22):  # 66 renders over two checkpoints
        checkpoint = "tiny-sdxl" if n % 2 else "tiny-sdxl-single"
        _drop(shared / "jobs", f"job{n:02d}.toml",
              _job(checkpoint, n=n, seed=100 * n, count=3, steps=6))
        expected += 3
    procs = [_spawn(config, f"host{i}", postgres_url) for i, config in enumerate(configs)]
    # Kill one host once it holds a running batch: its renders must be finished by the
    # others after its lease runs out.
    _wait(lambda: _count(postgres_url, "SELECT count(*) FROM renders WHERE state = 'running' "
                                       "AND worker LIKE 'host2/%'") > 0)
    procs[2].send_signal(signal.SIGKILL)
    procs[2].wait()
    codes = [proc.wait(timeout=600) for proc in procs[:2]]
    assert codes == [0, 0], _logs(tmp_path)

    rows = _query(postgres_url,
                  "SELECT state, attempts, worker, output_path, deaths FROM renders")
    assert len(rows) == expected
    assert all(state == "done" for state, *_ in rows), _logs(tmp_path)
    outputs = [row[3] for row in rows]
    assert len(set(outputs)) == expected  # each render once
    files = sorted(str(p) for p in (shared / "outputs").rglob("*.png"))
    assert files == sorted(outputs)
    finished_by = {row[2].split("/")[0] for row in rows}
    assert finished_by <= {"host0", "host1", "host2"} and {"host0", "host1"} <= finished_by
    assert any(row[4] >= 1 for row in rows)  # the killed host's batch re-ran
    # Two (three) daemons watched one folder: each file became exactly one job.
    jobs = _query(postgres_url, "SELECT file_name, count(*) FROM jobs GROUP BY file_name")
    assert len(jobs) == 22 and all(count == 1 for _, count in jobs)
    # Every job ended, including those whose last renders two hosts finished at once.
    assert _query(postgres_url, "SELECT DISTINCT state FROM jobs") == [("done",)]
    assert len(list((shared / "jobs" / "done").glob("*.toml"))) == 22, _logs(tmp_path)
    assert not list((shared / "jobs").glob(".taking-*/*"))  # no file left half taken
    hosts = dict(_query(postgres_url, "SELECT name, state FROM hosts"))
    assert hosts["host0"] == "stopped" and hosts["host2"] == "running"  # it never said bye


def test_a_host_without_a_loras_file_never_gets_that_work(tmp_path: Path, assets,
                                                          postgres_url: str) -> None:
    shared = tmp_path / "shared"
    with_lora, without = tmp_path / "loras-a", tmp_path / "loras-b"
    without.mkdir()
    write_kohya_original(make_tiny_lora(seed=5), with_lora / "ink.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    config_a = _config(tmp_path / "a", shared, assets, with_lora)
    config_b = _config(tmp_path / "b", shared, assets, without)
    # Host a indexes its LoRA and stays up; then the work arrives and host b joins.
    host_a = _spawn(config_a, "a", postgres_url, until_idle=False)
    _wait(lambda: _count(postgres_url,
                         "SELECT count(*) FROM loras WHERE host = 'a' AND state = 'ok'") == 1)
    for n in range(6):
        lora = '\n[[loras]]\nname = "ink"\n' if n % 2 == 0 else ""
        _drop(shared / "jobs", f"j{n}.toml",
              _job("tiny-sdxl", n=n, seed=n, count=2, steps=4) + lora)
    host_b = _spawn(config_b, "b", postgres_url)
    assert host_b.wait(timeout=600) == 0, _logs(tmp_path)
    _wait(lambda: _query(postgres_url, "SELECT count(*) FROM renders WHERE state <> 'done'")
          [0][0] == 0)
    host_a.send_signal(signal.SIGTERM)
    assert host_a.wait(timeout=120) == 0, _logs(tmp_path)
    rows = _query(postgres_url, "SELECT r.worker, r.spec_json FROM renders r")
    assert len(rows) == 12
    with_ink = [worker for worker, spec in rows if '"name": "ink"' in spec]
    assert len(with_ink) == 6 and all(worker.startswith("a/") for worker in with_ink)


def test_hosts_command_lists_the_farm(tmp_path: Path, assets, postgres_url: str) -> None:
    shared = tmp_path / "shared"
    config = _config(tmp_path / "h", shared, assets, tmp_path / "loras")
    _drop(shared / "jobs", "one.toml", _job("tiny-sdxl", n=1, seed=1, count=1, steps=2))
    assert _spawn(config, "solo", postgres_url).wait(timeout=300) == 0, _logs(tmp_path)
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "hosts", "--json", "--config",
                             str(config)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "LORAFARM_DATABASE_URL": postgres_url})
    assert result.returncode == 0, result.stderr
    [host] = json.loads(result.stdout)
    assert host["name"] == "solo" and host["state"] == "stopped" and host["devices"] == ["cpu"]
