"""Restarts lose nothing: a job file left in a dead daemon's claim folder always comes back
and is rendered; only evidence counts against a render (a death while it rendered alone);
a daemon keeps its name across restarts and dead hosts leave the list."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
from sqlalchemy import select, update

from daemon.intake.hot_folder import CLAIM_FOLDER_PREFIX
from daemon.queue.hosts import host_records
from daemon.queue.lifecycle import LOADING_DEATHS_PER_ATTEMPT
from daemon.queue.scheduler import claim_next_batch, record_progress
from daemon.runtime.runner import Daemon, default_name
from daemon.store.models import Event, Host, Job, Render, Store
from tests.conftest import REPO, sdxl_job
from tests.support.fault_harness import drop, write_config
from tests.support.helpers import job_text


def _spawn(config: Path, *args: str, fault: str | None = None,
           database_url: str | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if fault:
        env["LORAFARM_FAULT_POINT"] = fault
    if database_url:
        env["LORAFARM_DATABASE_URL"] = database_url
    return subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config",
                             str(config), "--until-idle", *args], cwd=config.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _renders(farm) -> list[Render]:  # type: ignore[no-untyped-def]
    store = Store.for_url(farm.config.database_url)
    with store.session() as session:
        rows = list(session.scalars(select(Render).order_by(Render.id)))
        session.expunge_all()
    store.dispose()
    return rows


def _die_between_claim_and_insert(farm, name: str, database_url: str | None = None) -> Path:  # type: ignore[no-untyped-def]
    """Run a daemon named `name` that is SIGKILLed right after it renamed kill.toml into its
    claim folder, before anything about it reached the database."""
    farm.drop("kill.toml", sdxl_job(count=2))
    proc = _spawn(farm.write_config_file(), "--name", name, fault="claim_taken",
                  database_url=database_url)
    assert proc.wait(timeout=300) == -9
    left = farm.jobs / f"{CLAIM_FOLDER_PREFIX}{name}" / "kill.toml"
    assert left.exists() and not (farm.jobs / "kill.toml").exists()
    return left


def test_a_daemon_killed_between_claim_and_insert_loses_nothing_on_restart(farm) -> None:
    # The killed daemon had another name (an older pid-based default, or --name): holding
    # the state lock, the restarted one knows every claim folder is a dead daemon's.
    left = _die_between_claim_and_insert(farm, "killed-1234")
    assert farm.run() == 0  # this process: another pid, the default name
    assert not left.exists() and not left.parent.exists()
    assert [r.state for r in _renders(farm)] == ["done", "done"]
    assert farm.files_in("done") == ["kill.toml"]
    assert len(list(farm.outputs.rglob("*.png"))) == 2
    assert [h["state"] for h in farm.history()] == ["done"]


def test_a_claimed_file_that_cannot_go_back_is_reported_and_taken_once_it_can(farm) -> None:
    """The user dropped another file of the same name while the claimed one waited: the
    claimed file is reported (event and log), --until-idle does not leave it behind, and
    it goes back and runs once the name is free."""
    claims = farm.jobs / f"{CLAIM_FOLDER_PREFIX}killed-99"
    claims.mkdir(parents=True)
    (claims / "scene.toml").write_text(sdxl_job(count=1, seed=1))
    farm.drop("scene.toml", sdxl_job(count=1, seed=2))
    assert farm.run() == 0
    store = Store.for_url(farm.config.database_url)
    with store.session() as session:
        events = list(session.scalars(select(Event.message).where(
            Event.kind == "claim_not_returned")))
        seeds = sorted(r.seed for r in session.scalars(select(Render)))
    store.dispose()
    assert len(events) == 1 and "another file named scene.toml is in jobs/" in events[0]
    assert seeds == [1, 2]  # both files rendered, one after the other
    assert not claims.exists()
    assert len(farm.files_in("done")) == 2


def test_on_postgresql_a_claim_of_a_host_that_never_registered_comes_back_after_the_lease(
        farm, postgres_url: str, monkeypatch) -> None:
    left = _die_between_claim_and_insert(farm, "ghost", database_url=postgres_url)
    # As if it had died before registering (or its row had aged out): no host row at all.
    with psycopg.connect(postgres_url) as db:
        db.execute("DELETE FROM hosts WHERE name = 'ghost'")
    monkeypatch.setenv("LORAFARM_DATABASE_URL", postgres_url)
    config = dataclasses.replace(farm.config, lease_seconds=5.0)
    survivor = Daemon(config, plugins=farm.plugins, name="survivor")
    assert survivor.run(until_idle=True) == 0  # waits for the file instead of leaving
    assert not left.exists()
    assert farm.files_in("done") == ["kill.toml"]
    with psycopg.connect(postgres_url) as db:
        rows = db.execute("SELECT state, worker FROM renders ORDER BY id").fetchall()
        hosts = [name for (name,) in db.execute("SELECT name FROM hosts")]
    assert [state for state, _ in rows] == ["done", "done"]
    assert all(worker.startswith("survivor/") for _, worker in rows)
    assert hosts == ["survivor"]


def test_on_postgresql_a_living_hosts_claim_folder_is_left_alone(farm, postgres_url: str,
                                                                 monkeypatch) -> None:
    """A registered host with a fresh heartbeat is taking its file in: not returned."""
    claims = farm.jobs / f"{CLAIM_FOLDER_PREFIX}alive"
    claims.mkdir(parents=True)
    (claims / "mine.toml").write_text(sdxl_job(count=1))
    monkeypatch.setenv("LORAFARM_DATABASE_URL", postgres_url)
    daemon = Daemon(farm.config, plugins=farm.plugins, name="other")
    daemon.start()
    with daemon.store.session() as session:
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        session.add(Host(name="alive", hostname="h", pid=1, state="running", started_at=now,
                         heartbeat_at=now))
    daemon._return_claims_of_lost_hosts()
    assert (claims / "mine.toml").exists()
    with daemon.store.session() as session:  # it stops heartbeating: lost, returned
        session.execute(update(Host).where(Host.name == "alive").values(
            heartbeat_at=now - dt.timedelta(seconds=farm.config.lease_seconds + 1)))
    daemon._return_claims_of_lost_hosts()
    daemon.close()
    assert not (claims / "mine.toml").exists() and (farm.jobs / "mine.toml").exists()


# -- only evidence counts against a render ------------------------------------------------

def test_a_poison_renders_batch_mate_is_not_charged_and_the_poison_ends_at_the_cap(
        tmp_path: Path, assets) -> None:
    """Two renders share a batch; one kills the process in its pipeline call every time.
    The first death is no one's: both retry alone; the poison dies alone (evidence) until
    the cap ends it; its batch-mate renders with its one attempt."""
    config = write_config(tmp_path, assets.models, assets.configs, max_attempts=2)
    config.write_text('plugins = ["tests.support.crashing_family"]\n' + config.read_text()
                      + '[checkpoints."tiny-sdxl"]\nfamily = "crashy"\n')
    for name, prompt, seed in (("a-poison.toml", "poison", 1), ("b-innocent.toml", "innocent", 2)):
        drop(tmp_path / "jobs", name, job_text(checkpoint="tiny-sdxl", prompt=prompt, seed=seed,
                                               steps=2, width=64, height=64, sampler="Euler"))
    codes = [_spawn(config).wait(timeout=300) for _ in range(4)]
    # Dies in the batch of two, then twice alone (2 attempts); the fourth start ends it.
    assert codes == [-9, -9, -9, 0]
    with sqlite3.connect(tmp_path / "state" / "lorafarm.sqlite") as db:
        rows = db.execute("SELECT r.state, r.attempts, r.deaths, r.error, j.file_name "
                          "FROM renders r JOIN jobs j ON j.id = r.job_id ORDER BY r.id").fetchall()
        batches = [size for (size,) in db.execute("SELECT renders FROM batches ORDER BY id")]
    (poison_state, poison_attempts, poison_deaths, error, _), innocent = rows
    assert (poison_state, poison_attempts, poison_deaths) == ("failed", 2, 3)
    assert "died during this render 2 times" in error and "worker.max_attempts" in error
    assert innocent[:3] == ("done", 1, 1)
    assert batches == [2, 1, 1, 1]  # after the first death, each ran alone
    assert (tmp_path / "jobs" / "failed" / "a-poison.toml.error.txt").exists()
    assert (tmp_path / "jobs" / "done" / "b-innocent.toml").exists()


def test_a_render_killed_while_its_model_loads_is_not_charged(make_farm) -> None:
    farm = make_farm(worker={"max_attempts": 1})
    farm.drop("loading.toml", sdxl_job(count=1))
    daemon = farm.daemon()
    daemon.start()
    [claimed] = claim_next_batch(daemon.store, max_batch=4, worker="w0")
    # The process dies here, in the pipeline load: no step 0 was recorded.
    daemon.close()
    assert farm.run() == 0  # with max_attempts = 1, a charged death would have failed it
    [row] = _renders(farm)
    assert (row.state, row.attempts, row.deaths) == ("done", 1, 1)


def test_a_render_killed_alone_in_its_pipeline_call_is_charged(make_farm) -> None:
    farm = make_farm(worker={"max_attempts": 2})
    farm.drop("charged.toml", sdxl_job(count=1))
    daemon = farm.daemon()
    daemon.start()
    [claimed] = claim_next_batch(daemon.store, max_batch=4, worker="w0")
    record_progress(daemon.store, [claimed.render_id], 0, 3, "w0")  # in its pipeline call
    daemon.close()
    assert farm.run() == 0
    [row] = _renders(farm)
    assert (row.state, row.attempts, row.deaths) == ("done", 2, 1)


def test_interrupted_renders_run_alone_before_the_rest_of_the_queue(farm) -> None:
    farm.drop("first.toml", sdxl_job(count=2, seed=1))
    daemon = farm.daemon()
    daemon.start()
    first = claim_next_batch(daemon.store, max_batch=4)
    assert len(first) == 2
    daemon.close()  # the process dies with both running
    farm.drop("second.toml", sdxl_job(count=3, seed=2))
    daemon = farm.daemon()
    daemon.start()
    interrupted = {c.render_id for c in first}
    claims = [claim_next_batch(daemon.store, max_batch=4) for _ in range(3)]
    daemon.close()
    assert [len(c) for c in claims] == [1, 1, 3]
    assert {claims[0][0].render_id, claims[1][0].render_id} == interrupted


def test_a_render_whose_model_load_kills_the_process_every_time_still_ends(make_farm) -> None:
    """Deaths before the pipeline call are not charged, but dying there alone again and
    again is evidence too: it cannot restart the daemon forever."""
    farm = make_farm(worker={"max_attempts": 1})
    farm.drop("heavy.toml", sdxl_job(count=1))
    for _ in range(LOADING_DEATHS_PER_ATTEMPT):  # x max_attempts = 1
        daemon = farm.daemon()
        daemon.start()
        claim_next_batch(daemon.store, max_batch=4, worker="w0")
        daemon.close()
    assert farm.run() == 0
    [row] = _renders(farm)
    assert (row.state, row.deaths) == ("failed", LOADING_DEATHS_PER_ATTEMPT)
    assert f"died {LOADING_DEATHS_PER_ATTEMPT} times while this render was starting" in row.error
    assert farm.files_in("failed") == ["heavy.toml", "heavy.toml.error.txt"]


# -- stable name, hosts age out, stranded files ---------------------------------------------

def test_a_daemon_keeps_its_name_across_restarts_and_the_hosts_table_holds_hosts(
        make_farm, tmp_path: Path) -> None:
    farm = make_farm(worker={"max_attempts": 1})
    other_state = dataclasses.replace(
        farm.config, paths=dataclasses.replace(farm.config.paths, state=tmp_path / "other"))
    assert default_name(farm.config) == default_name(farm.config)
    assert default_name(other_state) != default_name(farm.config)
    for seed in (1, 2, 3):
        farm.drop(f"night{seed}.toml", sdxl_job(count=1, seed=seed))
        assert farm.run() == 0
    records = host_records(Store.for_url(farm.config.database_url), farm.config)
    assert [(h["name"], h["state"]) for h in records] == [(default_name(farm.config),
                                                           "stopped")]


def test_dead_hosts_leave_the_list_after_forget_hosts_after_seconds(farm) -> None:
    config = dataclasses.replace(farm.config, forget_hosts_after_seconds=3600.0)
    config.ensure_folders()
    store = Store.for_url(config.database_url)
    store.migrate()
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with store.session() as session:
        for name, silent_for in (("gone", 7200), ("recent", 600)):
            at = now - dt.timedelta(seconds=silent_for)
            session.add(Host(name=name, hostname=name, pid=1, state="stopped", started_at=at,
                             heartbeat_at=at))
    # `lorafarm hosts` leaves it out at once; the next daemon start deletes the row.
    assert [h["name"] for h in host_records(store, config)] == ["recent"]
    daemon = Daemon(config, plugins=farm.plugins, name="me")
    daemon.start()
    daemon.close()
    with store.session() as session:
        assert sorted(session.scalars(select(Host.name))) == ["me", "recent"]
    store.dispose()
    result = farm.cli("hosts")
    assert "recent" in result.stdout and "gone" not in result.stdout


def test_forget_hosts_after_seconds_is_checked(tmp_path: Path) -> None:
    from daemon.config import ConfigError, config_from_dict

    assert config_from_dict({}, base=tmp_path).forget_hosts_after_seconds == 86400.0
    try:
        config_from_dict({"forget_hosts_after_seconds": "a day"}, base=tmp_path)
    except ConfigError as exc:
        assert "forget_hosts_after_seconds must be a number of seconds" in str(exc)
    else:
        raise AssertionError("a bad forget_hosts_after_seconds was accepted")


def test_an_ended_job_whose_file_reached_processing_unrecorded_is_filed_at_start(
        farm) -> None:
    """The daemon moved the file to processing/ and died before recording where; the job
    ended meanwhile. A lone daemon files it at start-up, without waiting lease_seconds."""
    farm.drop("moved.toml", sdxl_job(count=1))
    assert farm.run() == 0
    done = farm.jobs / "done" / "moved.toml"
    os.rename(done, farm.jobs / "processing" / "moved.toml")
    store = Store.for_url(farm.config.database_url)
    with store.session() as session:
        session.execute(update(Job).values(
            file_path=str(farm.jobs / f"{CLAIM_FOLDER_PREFIX}old" / "moved.toml")))
    store.dispose()
    daemon = farm.daemon()
    daemon.start()
    daemon.close()
    assert farm.files_in("processing") == []
    assert farm.files_in("done") == ["moved.toml"]
