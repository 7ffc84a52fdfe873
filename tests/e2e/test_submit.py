"""Jobs over HTTP: `POST /api/jobs` on a running daemon's page and `lorafarm submit`. A posted
job goes through the checks a dropped file does and leaves its file in jobs/ like one."""

from __future__ import annotations

import dataclasses
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from daemon.config import WebSettings
from daemon.runtime.runner import Daemon
from daemon.store.models import Job, Store
from daemon.web.server import create_app
from tests.conftest import Farm, sdxl_job


@pytest.fixture
def running(make_farm) -> Iterator[tuple[Farm, Daemon]]:  # type: ignore[no-untyped-def]
    """A daemon rendering in a thread, its page on a free loopback port."""
    farm = make_farm(web={"enabled": True, "port": 0})
    daemon = farm.daemon()
    thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    thread.start()
    farm.wait_for(lambda: daemon.web is not None and daemon._started.is_set(), timeout=120)
    yield farm, daemon
    daemon.stop()
    thread.join(timeout=120)


def _post(url: str, body: bytes, content_type: str, name: str = "",
          token: str = "") -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    query = f"?name={name}" if name else ""
    request = urllib.request.Request(url.rstrip("/") + "/api/jobs" + query, data=body,
                                     method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _job_rows(store: Store) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def test_a_job_posted_over_http_renders_and_its_file_ends_in_done(running) -> None:  # type: ignore[no-untyped-def]
    farm, daemon = running
    assert daemon.web is not None
    url = daemon.web.url
    # TOML with its content type, named by the client.
    status, answer = _post(url, sdxl_job(seed=11, count=2).encode(), "application/toml",
                           name="lighthouse.toml")
    assert status == 201, answer
    job_id = answer["job_id"]
    assert answer["url"] == f"{url}jobs/{job_id}"
    assert answer["renders"] == 2
    # JSON body, named by the server.
    as_json = {"checkpoint": "tiny-sdxl", "prompt": "a green barn", "seed": 12, "count": 1,
               "steps": 3, "width": 64, "height": 64}
    status, second = _post(url, json.dumps(as_json).encode(), "application/json")
    assert status == 201, second
    assert second["file_name"].endswith(".json")

    def finished() -> bool:
        states = {row["id"]: row["state"] for row in farm.history()}
        return states.get(job_id) == "done" and states.get(second["job_id"]) == "done"
    farm.wait_for(finished, timeout=240)
    history = {row["id"]: row for row in farm.history()}
    renders = history[job_id]["renders"]
    assert [r["state"] for r in renders] == ["done", "done"]
    assert all(Path(r["output"]).is_file() for r in renders)
    # The folder stays the record: the posted jobs' files are in jobs/done/.
    farm.wait_for(lambda: {"lighthouse.toml", second["file_name"]} <= set(farm.files_in("done")))
    assert (farm.jobs / "done" / "lighthouse.toml").read_text() == sdxl_job(seed=11, count=2)
    # The job page the answer named is served.
    with urllib.request.urlopen(answer["url"], timeout=30) as page:
        assert page.status == 200
    # Posting the same content while it is queued is refused as a duplicate would be; once
    # it is done, the same job may run again.
    status, again = _post(url, sdxl_job(seed=11, count=2).encode(), "application/toml",
                          name="lighthouse.toml")
    assert status == 201 and again["job_id"] != job_id


def test_a_bad_job_gets_400_with_the_report_and_nothing_is_queued(started_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon = started_daemon
    store = Store.for_url(daemon.config.database_url)
    app = create_app(daemon.config, lambda: Store.for_url(daemon.config.database_url),
                     submit=daemon.intake.submit)
    before_rows = _job_rows(store)
    before_files = sorted(p.relative_to(daemon.config.paths.jobs).as_posix()
                          for p in daemon.config.paths.jobs.rglob("*"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        bad = sdxl_job(checkpoint="tiny-sdxx")
        response = client.post("/api/jobs?name=typo.toml", content=bad.encode(),
                               headers={"Content-Type": "application/toml"})
        assert response.status_code == 400
        answer = response.json()
        # The same what / where / how a dropped file's .error.txt says.
        assert answer["error"] == "unknown checkpoint 'tiny-sdxx'"
        assert answer["key"] == "checkpoint" and answer["line"] == 1
        assert "did you mean 'tiny-sdxl'" in answer["fix"]
        assert answer["report"].startswith("typo.toml was not accepted.\n\nline 1, key "
                                           "`checkpoint`: unknown checkpoint")
        # Not TOML at all.
        response = client.post("/api/jobs", content=b"checkpoint = = 1",
                               headers={"Content-Type": "application/toml"})
        assert response.status_code == 400 and response.json()["line"] == 1
        # A JSON body that is not a job.
        response = client.post("/api/jobs", content=b'{"prompt": 3}',
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["key"]
        # A type lorafarm does not read.
        response = client.post("/api/jobs", content=b"checkpoint: x",
                               headers={"Content-Type": "application/yaml"})
        assert response.status_code == 415
    app.state.farm.close()
    assert _job_rows(store) == before_rows
    after_files = sorted(p.relative_to(daemon.config.paths.jobs).as_posix()
                         for p in daemon.config.paths.jobs.rglob("*"))
    assert after_files == before_files
    store.dispose()


def test_a_non_local_bind_needs_the_token_to_submit(started_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon = started_daemon
    config = dataclasses.replace(daemon.config,
                                 web=WebSettings(host="0.0.0.0", token="s3cret-token"))
    store = Store.for_url(config.database_url)
    app = create_app(config, lambda: Store.for_url(config.database_url),
                     submit=daemon.intake.submit)
    before = _job_rows(store)
    job = sdxl_job(seed=4242).encode()
    with TestClient(app, base_url="http://farm.lan:8765") as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = client.post("/api/jobs?name=remote.toml", content=job,
                                   headers={"Content-Type": "application/toml", **headers})
            assert response.status_code == 401
        assert _job_rows(store) == before
        # A form on another site cannot post jobs even with a user's token in the URL.
        response = client.post("/api/jobs?name=remote.toml&token=s3cret-token", content=job,
                               headers={"Content-Type": "application/toml",
                                        "Origin": "http://evil.example"})
        assert response.status_code == 403
        assert _job_rows(store) == before
        response = client.post("/api/jobs?name=remote.toml", content=job,
                               headers={"Content-Type": "application/toml",
                                        "Authorization": "Bearer s3cret-token"})
        assert response.status_code == 201, response.text
        assert response.json()["url"].startswith("http://farm.lan:8765/jobs/")
    app.state.farm.close()
    assert _job_rows(store) == before + 1
    assert (config.paths.jobs / "processing" / "remote.toml").is_file()
    store.dispose()


def test_lorafarm_submit_posts_files_or_drops_them_into_the_inbox(running, tmp_path) -> None:  # type: ignore[no-untyped-def]
    farm, daemon = running
    good = tmp_path / "cli-job.toml"
    good.write_text(sdxl_job(seed=77, count=1))
    bad = tmp_path / "cli-bad.toml"
    bad.write_text(sdxl_job(checkpoint="nope"))
    result = farm.cli("submit", str(good), str(bad), "--json")
    assert result.returncode == 1, result.stderr
    rows = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert rows["cli-job.toml"]["status"] == 201 and rows["cli-job.toml"]["job_id"]
    assert rows["cli-bad.toml"]["status"] == 400
    assert "unknown checkpoint 'nope'" in rows["cli-bad.toml"]["report"]
    # With the daemon stopped, the file goes into the inbox for the next daemon.
    daemon.stop()
    farm.wait_for(lambda: not (farm.config.paths.state / "web.url").exists(), timeout=120)
    other = tmp_path / "later.toml"
    other.write_text(sdxl_job(seed=78, count=1))
    result = farm.cli("submit", str(other))
    assert result.returncode == 0, result.stderr
    assert "written into the inbox" in result.stdout
    assert (farm.jobs / "later.toml").read_text() == other.read_text()
    # An explicit --url that does not answer is an error, not a silent drop.
    result = farm.cli("submit", str(other), "--url", "http://127.0.0.1:9/")
    assert result.returncode == 2 and "no daemon answered" in result.stderr
