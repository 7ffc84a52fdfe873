"""The control verbs as a user meets them: pause and resume, cancel a job, retry it. Each verb
is exercised through its function and through the command line, which share one code path;
the job files follow the jobs between processing/, failed/ and done/."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from daemon.cli.control import add_control_commands
from daemon.intake.hot_folder import Intake
from daemon.queue import control
from daemon.queue.lifecycle import mark_done, mark_failed
from daemon.queue.scheduler import claim_next_batch
from daemon.store.models import Event, Job, Render, Store
from tests.conftest import Farm, sdxl_job


@pytest.fixture
def store(farm: Farm) -> Iterator[Store]:
    farm.config.ensure_folders()
    store = Store.for_path(farm.config.paths.database)
    store.migrate()
    yield store
    store.dispose()


def lorafarm(farm: Farm, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`lorafarm VERB ...` through the parser the CLI registers the verbs on."""
    parser = argparse.ArgumentParser(prog="lorafarm")
    add_control_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([*argv, "--config", str(farm.root / "config.toml")])
    code = args.handler(args)
    out, err = capsys.readouterr()
    return code, out, err


def accept(farm: Farm, *jobs: tuple[str, str]) -> tuple[list[int], Intake]:
    """Let the daemon take the job files without rendering them."""
    daemon = farm.daemon()
    daemon.start()
    for name, text in jobs:
        farm.drop(name, text)
    accepted = daemon.intake.scan().accepted
    daemon.close()
    return accepted, daemon.intake


def renders_of(store: Store, job_id: int) -> list[tuple[str, int, str | None]]:
    with store.session() as session:
        return [(r.state, r.attempts, r.error) for r in session.scalars(
            select(Render).where(Render.job_id == job_id).order_by(Render.index))]


def job_row(store: Store, job_id: int) -> Job:
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def events(store: Store, kind: str) -> list[Event]:
    with store.session() as session:
        return list(session.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def test_pause_and_resume_through_the_function_and_the_cli(farm: Farm, store: Store,
                                                          capsys) -> None:  # type: ignore[no-untyped-def]
    assert control.is_paused(store) is False
    result = control.pause(store, by="test")
    assert control.is_paused(store) and "no new renders start" in result.message
    assert control.pause(store).message == "already paused"
    assert len(events(store, "paused")) == 1  # pausing twice records one change

    code, out, _ = lorafarm(farm, capsys, "resume")
    assert code == 0 and "resumed" in out and control.is_paused(store) is False
    code, out, _ = lorafarm(farm, capsys, "pause", "--json")
    assert code == 0 and json.loads(out)["paused"] is True and control.is_paused(store)
    assert [json.loads(e.data_json)["by"] for e in events(store, "paused")] == ["test", "cli"]


def test_a_paused_daemon_claims_nothing_until_resumed(farm: Farm, store: Store) -> None:
    [job_id], _ = accept(farm, ("later.toml", sdxl_job(count=1)))
    control.pause(store)
    # The daemon's claim loop asks is_paused first; the queue itself stays untouched.
    assert control.is_paused(store) and renders_of(store, job_id) == [("queued", 0, None)]
    control.resume(store)
    assert not control.is_paused(store)


def test_cancel_a_queued_job_moves_its_file_to_failed_with_the_reason(
        farm: Farm, store: Store, capsys) -> None:  # type: ignore[no-untyped-def]
    [job_id], _ = accept(farm, ("sunset.toml", sdxl_job(count=2)))
    assert farm.files_in("processing") == ["sunset.toml"]

    code, out, _ = lorafarm(farm, capsys, "cancel", str(job_id))
    assert code == 0 and "2 queued render(s) cancelled" in out

    assert renders_of(store, job_id) == [("cancelled", 0, "cancelled by the user")] * 2
    job = job_row(store, job_id)
    assert (job.state, job.error) == ("failed", "cancelled by the user")
    assert farm.files_in("processing") == []
    assert farm.files_in("failed") == ["sunset.toml", "sunset.toml.error.txt"]
    report = (farm.jobs / "failed" / "sunset.toml.error.txt").read_text()
    assert "cancelled by the user" in report and f"lorafarm retry {job_id}" in report
    assert job.file_path == str(farm.jobs / "failed" / "sunset.toml")
    assert len(events(store, "job_cancelled")) == 1
    assert len(events(store, "render_cancelled")) == 2

    # The daemon renders nothing of it, and the job stays cancelled.
    assert farm.run() == 0
    assert list(farm.outputs.rglob("*.png")) == []
    assert farm.history()[0]["state"] == "failed"
    with pytest.raises(control.ControlError, match="already cancelled"):
        control.cancel_job(farm.config, store, job_id)


def test_cancel_lets_running_renders_finish_then_retry_runs_the_rest(
        farm: Farm, store: Store, capsys) -> None:  # type: ignore[no-untyped-def]
    [job_id], _ = accept(farm, ("harbour.toml", sdxl_job(count=3, seed=50)))
    [running] = claim_next_batch(store, 1)  # a worker is busy with render 0

    result = control.cancel_job(farm.config, store, job_id, by="test")
    assert result.still_running == (running.render_id,) and len(result.render_ids) == 2
    assert "1 running render(s) left to finish" in result.message
    assert [s for s, *_ in renders_of(store, job_id)] == ["running", "cancelled", "cancelled"]
    # The running render ends as usual; the cancelled job does not change any more.
    assert mark_done(store, running.render_id, "/elsewhere/0.png", 0.1) is None
    assert [s for s, *_ in renders_of(store, job_id)] == ["done", "cancelled", "cancelled"]
    assert job_row(store, job_id).state == "failed"
    assert farm.files_in("failed") == ["harbour.toml", "harbour.toml.error.txt"]

    code, out, _ = lorafarm(farm, capsys, "retry", f"job{job_id}")
    assert code == 0 and "queued again: 2 render(s)" in out
    assert renders_of(store, job_id) == [("done", 1, None), ("queued", 0, None),
                                         ("queued", 0, None)]
    job = job_row(store, job_id)
    assert (job.state, job.error, job.finished_at) == ("queued", None, None)
    # The file is back in processing/; the stale error file is gone, its reason kept.
    assert farm.files_in("failed") == [] and farm.files_in("processing") == ["harbour.toml"]
    retried = events(store, "render_retried")
    assert [json.loads(e.data_json)["previous_error"] for e in retried] == \
        ["cancelled by the user"] * 2
    assert json.loads(events(store, "job_retried")[0].data_json)["previous_error"] == \
        "cancelled by the user"

    assert farm.run() == 0
    [job_record] = farm.history()
    assert job_record["state"] == "done"
    assert [r["state"] for r in job_record["renders"]] == ["done"] * 3
    assert farm.files_in("done") == ["harbour.toml"]
    assert len(list(farm.outputs.rglob("*.png"))) == 2  # the two retried renders
    with pytest.raises(control.ControlError, match=r"already ended \(done"):
        control.cancel_job(farm.config, store, job_id)


def test_retry_a_failed_job_keeps_the_old_error_in_the_history(
        farm: Farm, store: Store, capsys) -> None:  # type: ignore[no-untyped-def]
    [job_id], intake = accept(farm, ("storm.toml", sdxl_job(count=1)))
    [claimed] = claim_next_batch(store, 1)
    assert mark_failed(store, claimed.render_id, "CUDA out of memory") == job_id
    intake.file_finished_job(job_id)  # what the daemon does when a job ends
    assert farm.files_in("failed") == ["storm.toml", "storm.toml.error.txt"]

    result = control.retry_job(farm.config, store, job_id, by="test")
    assert result.render_ids == (claimed.render_id,)
    assert renders_of(store, job_id) == [("queued", 0, None)]
    assert farm.files_in("processing") == ["storm.toml"] and farm.files_in("failed") == []
    [event] = events(store, "render_retried")
    data = json.loads(event.data_json)
    assert (data["previous_error"], data["previous_attempts"]) == ("CUDA out of memory", 1)
    assert "CUDA out of memory" in event.message
    with pytest.raises(control.ControlError, match="only failed or cancelled"):
        control.retry_job(farm.config, store, job_id)


def test_bad_ids_and_states_are_clear_errors(farm: Farm, store: Store, capsys) -> None:  # type: ignore[no-untyped-def]
    [queued], _ = accept(farm, ("queued.toml", sdxl_job(count=1)),
                         ("broken.toml", 'checkpoint = "tiny-sdxl"\nprompt = "unclosed\n'))
    rejected = next(j["id"] for j in farm.history() if j["state"] == "rejected")

    with pytest.raises(control.UnknownJobError, match=r"there is no job 999 \(the newest"):
        control.cancel_job(farm.config, store, 999)
    with pytest.raises(control.UnknownJobError, match="not a job id"):
        control.retry_job(farm.config, store, "tomorrow")
    with pytest.raises(control.ControlError, match="only failed or cancelled jobs"):
        control.retry_job(farm.config, store, queued)
    with pytest.raises(control.ControlError, match="rejected at intake"):
        control.retry_job(farm.config, store, rejected)
    with pytest.raises(control.ControlError, match="already ended"):
        control.cancel_job(farm.config, store, rejected)

    code, out, err = lorafarm(farm, capsys, "cancel", "999")
    assert code == 1 and out == "" and "lorafarm cancel: there is no job 999" in err
    code, out, err = lorafarm(farm, capsys, "retry", "abc", "--json")
    assert code == 1 and json.loads(out)["ok"] is False and "not a job id" in err
    code, _, err = lorafarm(farm, capsys, "retry", str(queued))
    assert code == 1 and "is queued; only failed or cancelled" in err
    # Nothing was changed by the refused verbs.
    assert renders_of(store, queued) == [("queued", 0, None)]
    assert farm.files_in("processing") == ["queued.toml"]


def test_cancel_finds_a_file_another_daemon_moved_meanwhile(farm: Farm, store: Store) -> None:
    """Between cancel reading where the job's file is and moving it, another daemon moved
    it (filing what a dead host left): cancel follows the row to where it went and still
    writes its report there."""
    [job_id], _ = accept(farm, ("moved.toml", sdxl_job(count=1)))
    old_path = str(farm.jobs / "processing" / "moved.toml")
    moved = farm.jobs / "failed" / "moved.toml"
    moved.parent.mkdir(exist_ok=True)
    (farm.jobs / "processing" / "moved.toml").rename(moved)
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.file_path = str(moved)
    target = control._move_job_file(farm.config, store, job_id, "moved.toml", old_path,
                                     "failed", "cancelled by the user\n")
    assert target == moved
    assert (farm.jobs / "failed" / "moved.toml.error.txt").read_text() == \
        "cancelled by the user\n"
