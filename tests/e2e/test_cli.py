"""The command line as a user meets it: demo, run --until-idle, and the query commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def lorafarm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def test_demo_then_run_until_idle_then_query(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    result = lorafarm("demo", "--dir", str(demo), "--no-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = demo / "config.toml"
    assert config.exists() and "demo written" in result.stdout
    jobs = sorted(p.name for p in (demo / "jobs").glob("*.toml"))
    assert "sdxl-folder.toml" in jobs and "sdxl-single-file.toml" in jobs

    models = lorafarm("models", "--json", "--config", str(config), cwd=tmp_path)
    assert models.returncode == 0, models.stderr
    rows = {row["name"]: row for row in json.loads(models.stdout)}
    assert rows["tiny-sdxl"]["family"] == "sdxl" and rows["tiny-sdxl"]["kind"] == "folder"
    assert rows["tiny-sdxl-single"]["kind"] == "single_file"
    assert all(len(row["hash"]) == 10 for row in rows.values() if row["state"] == "ok")

    # Only the SDXL jobs: the point here is the CLI, not every family.
    for job in (demo / "jobs").glob("*.toml"):
        if not job.name.startswith("sdxl"):
            job.unlink()
    run = lorafarm("run", "--config", str(config), "--until-idle", cwd=tmp_path)
    assert run.returncode == 0, run.stderr

    history = json.loads(lorafarm("history", "--json", "--config", str(config),
                                  cwd=tmp_path).stdout)
    assert {job["file"] for job in history} == {"sdxl-folder.toml", "sdxl-single-file.toml"}
    assert all(job["state"] == "done" for job in history)
    outputs = [Path(r["output"]) for job in history for r in job["renders"]]
    assert len(outputs) == 4 and all(p.exists() for p in outputs)

    status = json.loads(lorafarm("status", "--json", "--config", str(config),
                                 cwd=tmp_path).stdout)
    assert status["daemon"]["running"] is False
    assert status["renders"] == {"done": 4} and status["jobs"] == {"done": 2}


def test_a_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[worker]\nmax_bach = 4\n")
    result = lorafarm("status", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown setting worker.max_bach; did you mean worker.max_batch?" in result.stderr


def test_read_only_verbs_are_instant_quiet_and_tabular(tmp_path: Path, farm) -> None:
    """history, status, stats and hosts read the database only: no torch, diffusers or family
    plugin is imported (that is what made them take seconds); a closed pipe ends quietly;
    tables have headers; `--version` answers."""
    from tests.conftest import sdxl_job

    farm.drop("one.toml", sdxl_job(count=1))
    assert farm.run() == 0
    config = str(farm.config.source)
    probe = ("import sys, contextlib, io\n"
             "from daemon.cli.main import main\n"
             "for verb in ('history', 'status', 'stats', 'hosts'):\n"
             "    with contextlib.redirect_stdout(io.StringIO()):\n"
             f"        assert main([verb, '--config', {config!r}]) == 0\n"
             "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'families',\n"
             "                     'daemon.contract.loader', 'daemon.runtime.runner')\n"
             "         if m in sys.modules]\n"
             "print(','.join(heavy) or 'none')\n")
    imported = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, text=True,
                              capture_output=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "none"

    # `| head -1`: the reader closes the pipe early; no BrokenPipeError traceback.
    piped = subprocess.run(f"{sys.executable} -m daemon.cli history --json --config "
                           f"{config} | head -1", shell=True, cwd=tmp_path, text=True,
                           capture_output=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert piped.stdout == "[\n" and "Traceback" not in piped.stderr, piped.stderr

    history = lorafarm("history", "--config", config, cwd=tmp_path).stdout.splitlines()
    assert history[0].split() == ["JOB", "STATE", "SEED", "OUTPUT", "/", "ERROR"]
    # Columns line up: every render row's state starts where the header's STATE does.
    state_column = history[0].index("STATE")
    assert all(line[state_column:].startswith("done") for line in history[1:])

    status = lorafarm("status", "--config", config, cwd=tmp_path).stdout
    assert "not running" in status and "page:" not in status  # no page without a daemon

    version = lorafarm("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("lorafarm ")


def test_status_names_the_page_only_while_a_daemon_serves_it(make_farm) -> None:
    farm = make_farm(web={"enabled": True, "port": 0})
    daemon = farm.daemon()
    daemon.start()
    try:
        status = json.loads(lorafarm("status", "--json", "--config", str(farm.config.source),
                                     cwd=farm.root).stdout)
        assert status["daemon"]["running"] is True
        assert status["page"] == daemon.web.url and status["page_answers"] is True
    finally:
        daemon.close()
    status = json.loads(lorafarm("status", "--json", "--config", str(farm.config.source),
                                 cwd=farm.root).stdout)
    assert status["daemon"]["running"] is False and status["page"] is None


def test_a_read_only_verb_upgrades_a_database_an_older_version_wrote(tmp_path: Path,
                                                                     farm) -> None:
    """`lorafarm history` right after an upgrade, before any daemon ran: the schema is
    brought up to date (as the daemon's start does) instead of a database traceback."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    from daemon.store.models import MIGRATIONS, Store
    from tests.conftest import sdxl_job

    farm.drop("one.toml", sdxl_job(count=1))
    assert farm.run() == 0
    store = Store.for_url(farm.config.database_url)
    alembic = AlembicConfig()
    alembic.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:
        alembic.attributes["connection"] = connection
        command.downgrade(alembic, "0008")  # the schema of the release before this one
    store.dispose()
    result = lorafarm("history", "--json", "--config", str(farm.config.source), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "upgrading the history database" in result.stderr
    assert [job["state"] for job in json.loads(result.stdout)] == ["done"]
