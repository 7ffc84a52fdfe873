"""Unattended from day one: a render interrupted by a crash is completed after restart, once;
one that keeps dying ends failed; signals stop the daemon cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sqlalchemy import select, update

from daemon.scheduler import claim_next_batch
from daemon.store import Render, Store
from tests.conftest import REPO, sdxl_job


def _render_rows(farm) -> list[Render]:  # type: ignore[no-untyped-def]
    store = Store(f"sqlite:///{farm.config.paths.database}", writer=False)
    with store.session() as session:
        rows = list(session.scalars(select(Render).order_by(Render.id)))
    store.dispose()
    return rows


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
    assert [r.attempts for r in rows] == [2, 2]
    assert len(list(farm.outputs.rglob("*.png"))) == 2
    assert farm.files_in("done") == ["crash.toml"]


def test_a_render_that_keeps_dying_ends_failed_after_the_attempt_cap(make_farm) -> None:
    farm = make_farm(worker={"max_attempts": 2})
    farm.drop("poison.toml", sdxl_job(count=1))
    daemon = farm.daemon()
    daemon.start()
    claim_next_batch(daemon.store, max_batch=4)
    with daemon.store.session() as session:
        session.execute(update(Render).values(attempts=2))
    daemon.close()

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
    assert all(r.attempts == 2 for r in rows)
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
