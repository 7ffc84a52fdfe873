"""The status page as a user (and a script) meets it: the queue with progress and an ETA, the
history gallery, a job page with its LoRAs, the LoRA library, the control buttons, the output
files (and nothing else), the token, and /metrics."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import urllib.request
from collections.abc import Iterator

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from starlette.testclient import TestClient

from daemon.config import WebSettings
from daemon.queue import control
from daemon.queue.scheduler import claim_next_batch
from daemon.store.models import RENDER_CANCELLED, Render, Store
from daemon.web.server import create_app, serve_in_thread, status_url
from tests.conftest import sdxl_job
from tests.support.night_farm import Night, night  # noqa: F401  (the shared rendered night)

LOCAL = "http://127.0.0.1"


@pytest.fixture
def client(night: Night) -> Iterator[TestClient]:  # noqa: F811
    app = create_app(night.farm.config, lambda: Store.for_path(night.farm.config.paths.database))
    with TestClient(app, base_url=LOCAL) as test_client:
        yield test_client
    app.state.farm.close()


def _accept(night: Night, name: str, text: str) -> int:  # noqa: F811
    """Queue a job without rendering it (the daemon starts, takes the file, stops)."""
    daemon = night.farm.daemon()
    daemon.start()
    night.farm.drop(name, text)
    [job_id] = daemon.intake.scan().accepted
    daemon.close()
    return job_id


def test_the_queue_api_counts_the_night_and_lists_the_newest_renders(client, night) -> None:  # noqa: F811
    queue = client.get("/api/queue").json()
    assert queue["done"] == 4 and queue["failed"] == 1
    assert queue["queued"] == 0 and queue["running_count"] == 0
    assert queue["eta_seconds"] == 0.0 and queue["paused"] is False
    assert queue["done_last_hour"] == 4
    assert queue["seconds_per_step"] > 0  # measured from the night's batches
    recent = queue["recent"]
    assert len(recent) == 4 and all(t["poster"].endswith(".png") for t in recent)

    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="done-count">4<' in page.text
    assert page.text.count('class="thumb"') == 4
    assert "Nothing queued." in page.text
    # The refresh script and the stylesheet are ours: not escaped like user text.
    assert "setTimeout(tick, 2000)" in page.text and 'path.includes("?")' in page.text
    # No external assets: every src and href stays on this origin.
    assert not re.search(r'(src|href)="(https?:)?//', page.text)
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_running_renders_show_their_progress_and_the_queue_an_eta(client, night) -> None:  # noqa: F811
    job_id = _accept(night, "waiting.toml", sdxl_job(prompt="later", seed=900, count=3,
                                                     steps=4))
    try:
        [running] = claim_next_batch(night.store, 1)
        with night.store.session() as session:
            session.execute(update(Render).where(Render.id == running.render_id)
                            .values(progress_step=1, progress_total=4))
        queue = client.get("/api/queue").json()
        assert queue["queued"] == 2 and queue["running_count"] == 1
        [row] = queue["running_renders"]
        assert (row["job_id"], row["progress_step"], row["progress_total"]) == (job_id, 1, 4)
        assert row["progress"] == 0.25
        rate = queue["seconds_per_step"]
        assert row["eta_seconds"] == pytest.approx(3 * rate, rel=0.05, abs=0.05)
        etas = [r["eta_seconds"] for r in queue["queued_renders"]]
        # Each queued render waits for the ones before it: the ETA grows down the queue.
        assert etas == sorted(etas) and etas[0] == pytest.approx(7 * rate, rel=0.05, abs=0.05)
        assert queue["eta_seconds"] == pytest.approx(11 * rate, rel=0.05, abs=0.05)
        page = client.get("/").text
        assert "1/4" in page and 'class="state state-running"' in page
    finally:
        # Leave the night's figures as they were: the job is cancelled, and its running
        # render (no worker holds it) is ended as cancelled too, not as a failure.
        control.cancel_job(night.farm.config, night.store, job_id, by="test")
        with night.store.session() as session:
            session.execute(update(Render).where(Render.id == running.render_id)
                            .values(state=RENDER_CANCELLED))


def test_the_job_page_shows_parameters_loras_with_hashes_and_patched_modules(
        client, night) -> None:  # noqa: F811
    job = client.get(f"/api/jobs/{night.lora_job}").json()
    assert job["state"] == "done" and job["job"]["prompt"] == "an inked <lighthouse>"
    [lora] = job["loras"]
    assert lora["name"] == "ink" and lora["strength"] == 0.8
    assert re.fullmatch(r"[0-9a-f]{10}", lora["autov2"])
    assert re.fullmatch(r"[0-9a-f]{12}", lora["autov3"])
    assert lora["patched"]["unet"] > 0 and lora["modules_in_file"] > 0
    assert lora["family"] == "sdxl"
    assert any("lineage unknown" in w for w in job["warnings"])
    assert [r["seed"] for r in job["renders"]] == [7, 8]
    assert all(r["spec"]["steps"] == 3 and r["file"].endswith(".png") for r in job["renders"])
    assert [e["kind"] for e in job["events"]][0] == "job_accepted"

    page = client.get(f"/jobs/{night.lora_job}").text
    assert lora["autov2"] in page and lora["autov3"] in page
    assert f"unet {lora['patched']['unet']}" in page
    assert "lineage unknown" in page  # the warning
    # The prompt is user text: escaped, never markup.
    assert "an inked &lt;lighthouse&gt;" in page and "<lighthouse>" not in page
    assert page.count('class="thumb"') == 2
    assert "Cancel job" not in page and "Retry failed renders" not in page


def test_a_failed_job_page_shows_the_reason_and_offers_a_retry(client, night) -> None:  # noqa: F811
    page = client.get(f"/jobs/{night.failed_job}").text
    assert "patched no module" in page and "Retry failed renders" in page
    missing = client.get("/jobs/999")
    assert missing.status_code == 404 and "there is no job 999" in missing.text
    assert client.get("/api/jobs/999").status_code == 404


def test_the_history_and_the_lora_library(client, night) -> None:  # noqa: F811
    history = client.get("/api/history").json()
    by_id = {job["id"]: job for job in history}
    assert len(by_id[night.plain_job]["thumbs"]) == 2
    assert by_id[night.failed_job]["renders"] == {"failed": 1}
    page = client.get("/history").text
    assert page.count('class="thumb"') >= 4 and "patched no module" in page

    loras = {row["name"]: row for row in client.get("/api/loras").json()}
    assert loras["ink"]["family"] == "sdxl" and loras["ink"]["state"] == "ok"
    assert loras["dud"]["lineage"] == "sdxl" and "sidecar" in loras["dud"]["lineage_source"]
    page = client.get("/loras").text
    assert 'id="lora-ink"' in page and loras["ink"]["autov3"] in page


def test_gallery_thumbnails_and_output_files_are_served(client, night) -> None:  # noqa: F811
    gallery = client.get("/api/gallery").json()
    assert len(gallery) == 4
    for item in gallery:
        thumb = client.get(f"/thumbs/{item['poster']}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(thumb.content)).size == (64, 64)
        full = client.get(f"/files/{item['file']}")
        assert full.content == (night.farm.outputs / item["file"]).read_bytes()
    # A video's thumbnail is its poster: the same name with .png.
    first = gallery[0]["file"]
    video = night.farm.outputs / "clip-99" / "00000-1.mp4"
    video.parent.mkdir(exist_ok=True)
    video.write_bytes(b"not really a video")
    video.with_suffix(".png").write_bytes((night.farm.outputs / first).read_bytes())
    assert client.get("/thumbs/clip-99/00000-1.mp4").headers["content-type"] == "image/png"
    assert client.get("/files/clip-99/00000-1.mp4").content == b"not really a video"


def test_nothing_outside_the_outputs_folder_is_served(client, night, tmp_path) -> None:  # noqa: F811
    outputs = night.farm.outputs
    secret = tmp_path / "secret.png"
    secret.write_bytes((next(outputs.rglob("*.png"))).read_bytes())
    (outputs / "escape.png").unlink(missing_ok=True)
    (outputs / "escape.png").symlink_to(secret)
    (outputs / ".partial-x.png").write_bytes(b"half")
    (outputs / "notes.sqlite").write_bytes(b"x")
    for path in ("../state/lorafarm.sqlite", "%2e%2e/state/lorafarm.sqlite",
                 "..%2fstate%2florafarm.sqlite", "%2e%2e%2f%2e%2e%2fconfig.toml",
                 "%2fetc%2fpasswd", "/etc/passwd", "escape.png", ".partial-x.png",
                 "notes.sqlite", "", "clip-99/..%2f..%2fstate/lorafarm.sqlite",
                 "%00.png"):
        for prefix in ("/files/", "/thumbs/"):
            response = client.get(prefix + path)
            assert response.status_code == 404, (prefix + path, response.status_code)
            assert b"SQLite" not in response.content and b"root:" not in response.content


def test_a_non_loopback_page_needs_the_token(night) -> None:  # noqa: F811
    config = dataclasses.replace(night.farm.config,
                                 web=WebSettings(host="0.0.0.0", token="s3cret-token"))
    app = create_app(config, lambda: Store.for_path(config.paths.database))
    with TestClient(app, base_url="http://farm.lan:8765") as client:
        for path in ("/", "/api/queue", "/metrics", "/files/x.png"):
            assert client.get(path).status_code == 401
            assert client.get(path + "?token=wrong").status_code == 401
        assert client.post("/api/pause").status_code == 401
        response = client.get("/api/queue", headers={"Authorization": "Bearer s3cret-token"})
        assert response.status_code == 200
        page = client.get("/?token=s3cret-token")
        assert page.status_code == 200
        # Links, thumbnails and the refresh carry the token the page was opened with.
        assert 'href="/history?token=s3cret-token"' in page.text
        assert 'data-token="s3cret-token"' in page.text
        assert page.headers["referrer-policy"] == "same-origin"
    app.state.farm.close()


def test_a_loopback_page_refuses_other_hosts_and_cross_site_posts(client) -> None:
    app = client.app
    with TestClient(app, base_url="http://attacker.example") as foreign:
        assert foreign.get("/api/queue").status_code == 403
    with TestClient(app, base_url="http://localhost:8765") as local:
        assert local.get("/api/queue").status_code == 200
    refused = client.post("/api/pause", headers={"Origin": "http://attacker.example"})
    assert refused.status_code == 403
    assert client.get("/api/queue").json()["paused"] is False


def test_the_buttons_call_the_control_verbs(client, night) -> None:  # noqa: F811
    try:
        response = client.post("/pause", headers={"Origin": LOCAL}, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/?msg=")
        assert control.is_paused(night.store)
        page = client.get(response.headers["location"]).text
        assert 'id="paused-state" class="state state-paused">paused<' in page
        assert "no new renders start" in page  # the message of the verb
        assert client.post("/api/pause").json()["message"] == "already paused"
    finally:
        resumed = client.post("/api/resume").json()
    assert resumed["ok"] and resumed["paused"] is False and not control.is_paused(night.store)

    missing = client.post("/api/jobs/999/cancel")
    assert missing.status_code == 404 and "there is no job 999" in missing.json()["error"]
    done = client.post(f"/api/jobs/{night.lora_job}/cancel")
    assert done.status_code == 409 and "already ended (done" in done.json()["error"]
    form = client.post(f"/jobs/{night.lora_job}/retry")
    assert form.status_code == 409 and "only failed or cancelled" in form.text
    assert client.post("/api/jobs/1/explode").status_code in (404, 405)
    assert client.get("/api/pause").status_code == 405


def test_metrics_speak_the_prometheus_text_format(client, night) -> None:  # noqa: F811
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    renders = {s.labels["state"]: s.value for s in families["lorafarm_queue_renders"].samples}
    assert renders["done"] == 4 and renders["failed"] == 1 and renders["queued"] == 0
    assert families["lorafarm_renders_done_last_hour"].samples[0].value == 4
    assert families["lorafarm_render_failures"].samples[0].value >= 1
    assert families["lorafarm_pipeline_loads"].samples[0].value >= 1
    assert families["lorafarm_paused"].samples[0].value == 0
    assert "lorafarm_render_failures_total" in response.text
    # Each app has its own registry: a second app in the same process works too.
    other = create_app(night.farm.config, lambda: night.store)
    with TestClient(other, base_url=LOCAL) as second:
        assert "lorafarm_queue_renders" in second.get("/metrics").text


def test_serve_in_thread_picks_a_free_port_and_stops(night) -> None:  # noqa: F811
    config = dataclasses.replace(night.farm.config, web=WebSettings(port=0))
    app = create_app(config, lambda: Store.for_path(config.paths.database))
    handle = serve_in_thread(config, app)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", handle.url) and handle.port > 0
        with urllib.request.urlopen(handle.url + "api/status", timeout=5) as response:
            status = json.load(response)
        assert status["renders"]["done"] == 4
        assert (config.paths.state / "web.url").read_text().strip() == handle.url
    finally:
        handle.stop()
    assert not (config.paths.state / "web.url").exists()
    # No daemon runs here, so `lorafarm status` shows the configured address.
    assert status_url(night.farm.config) == "http://127.0.0.1:8765/"


def test_gpu_memory_is_reported_where_cuda_is(client, monkeypatch) -> None:
    """No GPU here: a stand-in torch.cuda shows what a CUDA daemon's /metrics carries."""
    import sys
    import types

    cuda = types.SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: 1,
        memory_allocated=lambda index: 3 * 2**30, memory_reserved=lambda index: 4 * 2**30,
        mem_get_info=lambda index: (100 * 2**30, 141 * 2**30))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    [allocated] = families["lorafarm_gpu_memory_allocated_bytes"].samples
    assert allocated.labels == {"device": "cuda:0"} and allocated.value == 3 * 2**30
    assert families["lorafarm_gpu_memory_used_bytes"].samples[0].value == 41 * 2**30
    assert families["lorafarm_gpu_memory_total_bytes"].samples[0].value == 141 * 2**30
