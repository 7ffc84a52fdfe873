"""Unattended from day one: a render interrupted by a crash is completed after restart, once;
one that keeps dying ends failed; signals stop the daemon cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon.intake.hot_folder import CLAIM_FOLDER_PREFIX, Intake
from daemon.queue.scheduler import claim_next_batch
from daemon.runtime.runner import Daemon
from daemon.store.models import Render
from tests.conftest import REPO, sdxl_job
from tests.support.helpers import die_in_the_last_attempt, rows


def _render_rows(farm) -> list[Render]:  # type: ignore[no-untyped-def]
    return rows(farm.config, Render)


def test_a_render_interrupted_mid_run_is_completed_after_restart_once(farm) -> None:
    farm.drop("crash.toml", sdxl_job(count=2))
    daemon = farm.daemon()
    daemon.start()
    claimed = claim_next_batch(daemon.store, max_batch=4)
    assert len(claimed) == 2
    # The process dies here: no output, renders left `running`. (Simulated without killing
    # the test process; the SIGKILL test below does it for real.)
    daemon.close()
    assert [r.state for r in _render_rows(farm)] == ["running", "running"]

    assert farm.run() == 0
    rows = _render_rows(farm)
    assert [r.state for r in rows] == ["done", "done"]
    # Caught in a batch of two before their pipeline call: the death is not theirs to count.
    assert [r.attempts for r in rows] == [1, 1]
    assert [r.deaths for r in rows] == [1, 1]
    assert len(list(farm.outputs.rglob("*.png"))) == 2
    assert farm.files_in("done") == ["crash.toml"]


def test_a_render_that_keeps_dying_ends_failed_after_the_attempt_cap(make_farm) -> None:
    farm = make_farm(worker={"max_attempts": 2})
    die_in_the_last_attempt(farm, attempts=2)

    assert farm.run() == 0
    [row] = _render_rows(farm)
    assert row.state == "failed" and "died during this render 2 times" in row.error
    assert farm.files_in("failed") == ["poison.toml", "poison.toml.error.txt"]
    report = (farm.jobs / "failed" / "poison.toml.error.txt").read_text()
    assert "worker.max_attempts" in report
    assert list(farm.outputs.rglob("*.png")) == []


def _spawn(farm) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    config = farm.write_config_file()
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
        cwd=farm.root, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def _wait_running(farm, proc) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        if farm.config.paths.database.exists():
            try:
                if any(r.state == "running" for r in _render_rows(farm)):
                    return
            except Exception:  # the schema may not exist yet
                pass
        time.sleep(0.05)
    raise AssertionError("no render started")


def test_sigkill_during_a_render_then_restart_renders_each_image_once(farm) -> None:
    # Big enough that a render takes a few seconds on one CPU thread.
    farm.drop("slow.toml", sdxl_job(count=2, steps=60).replace("width = 64", "width = 256")
              .replace("height = 64", "height = 256"))
    proc = _spawn(farm)
    _wait_running(farm, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert any(r.state == "running" for r in _render_rows(farm))

    assert farm.run() == 0
    rows = _render_rows(farm)
    assert [r.state for r in rows] == ["done", "done"]
    # Killed by the test, in a batch of two: re-rendered, each alone, with no attempt used.
    assert all(r.attempts == 1 and r.deaths == 1 for r in rows)
    pngs = sorted(farm.outputs.rglob("*.png"))
    assert len(pngs) == 2 and [str(p) for p in pngs] == sorted(r.output_path for r in rows)
    assert not list(farm.outputs.rglob(".partial-*"))


def test_first_sigterm_finishes_the_batch_and_exits_cleanly(farm) -> None:
    farm.drop("term.toml", sdxl_job(count=2, steps=40).replace("width = 64", "width = 192")
              .replace("height = 64", "height = 192"))
    proc = _spawn(farm)
    _wait_running(farm, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    rows = _render_rows(farm)
    assert [r.state for r in rows] == ["done", "done"]  # the batch was finished, not dropped
    assert farm.files_in("done") == ["term.toml"]


class _Killed(BaseException):
    """Stands in for SIGKILL at one point of the code (the process stops there)."""


def _die(*_args: object) -> None:
    raise _Killed


def _die_while_taking_in(farm, monkeypatch) -> Path:  # type: ignore[no-untyped-def]
    """A daemon named `dying` records claimed.toml as a job and is killed before it moves
    the file out of its claim folder; returns where the file was left."""
    farm.drop("claimed.toml", sdxl_job(count=1))
    dying = Daemon(farm.config, plugins=farm.plugins, name="dying")
    monkeypatch.setattr(dying.intake, "_move_accepted", _die)
    with pytest.raises(_Killed):
        dying.start()
    dying.close()
    left = farm.jobs / f"{CLAIM_FOLDER_PREFIX}dying" / "claimed.toml"
    assert left.exists()
    return left


def test_a_job_recorded_by_a_daemon_killed_before_moving_its_file_is_filed_when_it_ends(
        farm, monkeypatch) -> None:
    left = _die_while_taking_in(farm, monkeypatch)
    # Another daemon (on a farm: another host, before the dead one's lease runs out) renders
    # the job; ending it files the job file from where the dead daemon left it.
    assert farm.run() == 0
    assert [r.state for r in _render_rows(farm)] == ["done"]
    assert farm.files_in("done") == ["claimed.toml"]
    assert not left.exists()
    assert [h["state"] for h in farm.history()] == ["done"]


def test_a_finished_jobs_file_coming_back_from_a_claim_folder_is_filed_not_run_again(
        farm, monkeypatch, tmp_path) -> None:
    left = _die_while_taking_in(farm, monkeypatch)
    # The job ends while its file is on its way back to jobs/ (a living host returns a dead
    # one's claims), so ending it finds nothing to move ...
    aside = tmp_path / "in-transit.toml"
    os.rename(left, aside)
    assert farm.run() == 0
    assert farm.files_in("done") == []
    # ... then the file arrives in jobs/: it is the finished job's own file.
    os.rename(aside, farm.jobs / "claimed.toml")
    assert farm.run() == 0
    assert farm.files_in("done") == ["claimed.toml"]
    assert len(_render_rows(farm)) == 1  # rendered once, not queued again
    assert len(farm.history()) == 1


def test_a_job_ended_by_a_daemon_that_died_before_moving_its_file_is_filed_by_another(
        farm, monkeypatch) -> None:
    farm.drop("ended.toml", sdxl_job(count=1))
    # The daemon ends the job in the database and dies before it moves the file.
    monkeypatch.setattr(Intake, "file_finished_job", lambda self, job_id: None)
    assert farm.run() == 0
    monkeypatch.undo()
    assert farm.files_in("processing") == ["ended.toml"]
    survivor = farm.daemon()
    # A job that ended a moment ago may still be on its way: its own daemon moves it.
    assert survivor.intake.file_stranded_jobs(older_than=3600) == ([], 1)
    assert farm.files_in("processing") == ["ended.toml"]
    filed, waiting = survivor.intake.file_stranded_jobs(older_than=0)
    assert len(filed) == 1 and waiting == 0
    assert farm.files_in("processing") == []
    assert farm.files_in("done") == ["ended.toml"]
    survivor.close()


def test_a_returning_file_is_filed_with_its_finished_job_even_when_a_copy_is_queued(
        farm, monkeypatch, tmp_path) -> None:
    """The finished job's own file comes back while the user has queued the same content
    under another name: it is filed with its job, not rejected as the copy's duplicate."""
    left = _die_while_taking_in(farm, monkeypatch)
    aside = tmp_path / "in-transit.toml"
    os.rename(left, aside)
    assert farm.run() == 0  # the job renders and ends; its file is on its way
    daemon = farm.daemon()
    daemon.start()
    farm.drop("copy.toml", sdxl_job(count=1))  # same content, another name: a new run
    assert len(daemon.intake.scan().accepted) == 1
    os.rename(aside, farm.jobs / "claimed.toml")
    result = daemon.intake.scan()
    daemon.close()
    assert result.rejected == [] and result.accepted == []
    assert farm.files_in("done") == ["claimed.toml"]
    assert farm.files_in("rejected") == []
    assert farm.files_in("processing") == ["copy.toml"]


def test_the_same_file_dropped_again_after_its_job_ended_runs_again(farm) -> None:
    """Filing returning files must not swallow a re-run: a user drops a finished job's file
    again (its name happening to contain the claim folder's prefix)."""
    name = f"scene{CLAIM_FOLDER_PREFIX}off.toml"
    farm.drop(name, sdxl_job(count=1))
    assert farm.run() == 0
    farm.drop(name, sdxl_job(count=1))
    assert farm.run() == 0
    assert len(farm.history()) == 2
    assert len(_render_rows(farm)) == 2
    assert len(farm.files_in("done")) == 2


def test_a_file_whose_intake_fails_goes_back_to_jobs_and_is_taken_next_time(
        farm, monkeypatch) -> None:
    """The database fails mid-way through taking a file in: the file does not wait in the
    daemon's claim folder (where an --until-idle farm would wait on it) but goes back to
    jobs/, and the next scan takes it."""
    daemon = farm.daemon()
    daemon.start()
    farm.drop("flaky.toml", sdxl_job(count=1))
    real_accept = daemon.intake._accept
    calls = []

    def fail_once(*args):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return real_accept(*args)

    monkeypatch.setattr(daemon.intake, "_accept", fail_once)
    # Logged, not raised: the scan (a daemon's start, say) goes on; the file waits in jobs/.
    assert daemon.intake.scan().pending == ["flaky.toml"]
    assert (farm.jobs / "flaky.toml").exists()
    assert not list(farm.jobs.glob(f"{CLAIM_FOLDER_PREFIX}*/*"))
    assert len(daemon.intake.scan().accepted) == 1
    daemon.close()
    assert farm.files_in("processing") == ["flaky.toml"]


def test_a_batch_whose_bookkeeping_fails_goes_back_to_the_queue(farm, monkeypatch) -> None:
    """Recording a batch fails outside the render itself (the database went away): the
    worker thread lives on, the batch goes back to the queue with the attempt counted, and
    the job is rendered on the next try instead of hanging with its renders `running`."""
    from daemon.render.worker import Worker

    farm.drop("once.toml", sdxl_job(count=2))
    real_render = Worker.render
    calls = []

    def broken_once(self, batch, since=None):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return real_render(self, batch, since=since)

    monkeypatch.setattr(Worker, "render", broken_once)
    daemon = farm.daemon()
    runner = threading.Thread(target=lambda: daemon.run(until_idle=True))
    runner.start()
    runner.join(60)
    if runner.is_alive():
        daemon.stop()
        runner.join(30)
        raise AssertionError("the daemon hung after the broken batch")
    rows = _render_rows(farm)
    assert [r.state for r in rows] == ["done", "done"]
    assert [r.attempts for r in rows] == [2, 2]
    assert farm.files_in("done") == ["once.toml"]
