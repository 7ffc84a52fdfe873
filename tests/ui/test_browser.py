"""The status page in a real browser while a daemon renders: the user opens the page in the
evening, watches the queue move, opens a job, and sees the gallery.

Headless Debian Chromium (scripts/install-browser.sh) driven by Playwright. Playwright's own
browser download (`playwright install`) is never used: it cannot be fetched here.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from daemon.config import WebSettings
from daemon.queue import control
from daemon.store.models import Store
from daemon.web.server import create_app, serve_in_thread, status_url
from tests.conftest import sdxl_job

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT_COPY = Path("/tmp/lorafarm-status.png")
JOBS, PER_JOB = 6, 2
STEPS = 6  # the night starts paused, so speed does not matter; few steps keep it short
TOTAL = JOBS * PER_JOB
LOADED_THUMBNAILS = ("Array.from(document.querySelectorAll('img.thumb'))"
                     ".filter(img => img.complete && img.naturalWidth > 0).length")
ALL_THUMBNAILS_LOADED = ("Array.from(document.querySelectorAll('img.thumb'))"
                         ".every(img => img.complete && img.naturalWidth > 0)")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no /usr/bin/chromium: run scripts/install-browser.sh (Debian's chromium)")


def _done(page) -> int:  # type: ignore[no-untyped-def]
    return int(page.inner_text("#done-count"))


def _wait_for(page, expression: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Poll a JS expression from here: Playwright's wait_for_function evaluates strings in a
    way the page's Content-Security-Policy (rightly) forbids, and the test keeps the CSP on
    so that it also proves the page's own script runs under it."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {expression}")
        time.sleep(0.1)


def _wait_for_refreshes(page, count: int) -> None:  # type: ignore[no-untyped-def]
    """Let the page's own refresh run `count` more times."""
    seen = int(page.evaluate("Number(document.body.dataset.refreshes || 0)"))
    _wait_for(page, f"Number(document.body.dataset.refreshes || 0) >= {seen + count}", 15)


def _follow_done_count(page, until) -> list[int]:  # type: ignore[no-untyped-def]
    """The done counts the page shows, in order, until `until(count)` holds."""
    counts = [_done(page)]
    deadline = time.monotonic() + 120
    while not until(counts[-1]):
        assert time.monotonic() < deadline, f"the done count stopped at {counts}"
        time.sleep(0.1)
        if _done(page) != counts[-1]:
            counts.append(_done(page))
    return counts


def _accepted(farm) -> int:  # type: ignore[no-untyped-def]
    try:
        return len(farm.history())
    except OperationalError:  # the daemon has created the file but not the tables yet
        return 0


def _loaded_thumbnails(page) -> int:  # type: ignore[no-untyped-def]
    return int(page.evaluate(LOADED_THUMBNAILS))


def test_the_page_follows_a_night_of_renders(make_farm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    # One render per pipeline call, so the done count climbs one at a time.
    farm = make_farm(worker={"max_batch": 1})
    for i in range(JOBS):
        farm.drop(f"night-{i}.toml", sdxl_job(prompt=f"a lighthouse at dusk, variant {i}",
                                              seed=100 + 10 * i, count=PER_JOB, steps=STEPS))
    # The night starts paused, so the page opens on a full queue however fast this machine
    # renders; the user starts it with the Resume button.
    farm.config.ensure_folders()
    store = Store.for_path(farm.config.paths.database)
    store.migrate()
    control.pause(store, by="test")
    daemon = farm.daemon()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run(until_idle=True)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="daemon-under-test", daemon=True)
    thread.start()
    handle = None
    screenshot = tmp_path / "status.png"
    try:
        farm.wait_for(lambda: _accepted(farm) == JOBS, timeout=60)
        config = dataclasses.replace(farm.config, web=WebSettings(port=0))
        app = create_app(config, lambda: Store.for_path(config.paths.database))
        handle = serve_in_thread(config, app)
        # While the daemon runs, `lorafarm status` prints the address it really serves on.
        assert status_url(config) == handle.url
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(handle.url)
            assert page.inner_text("#paused-state") == "paused"
            assert (_done(page), page.inner_text("#queued-count")) == (0, str(TOTAL))
            assert page.locator("#queue-body tr").count() == TOTAL

            page.click("button:has-text('Resume')")
            assert "resumed" in page.inner_text("#msg")
            # The queue part refreshes itself every 2 s: the done count climbs without the
            # page being reloaded.
            counts = _follow_done_count(page, until=lambda done: done >= 1)

            # Pause midway: the render in flight finishes, then nothing more starts.
            page.click("button:has-text('Pause')")
            assert "paused" in page.inner_text("#msg")  # the page after the redirect
            _wait_for(page, "document.querySelector('#running-count').textContent === '0'"
                            " && document.querySelector('#paused-state').textContent"
                            " === 'paused'", 20)
            held = _done(page)
            if held < TOTAL:
                _wait_for_refreshes(page, 2)
                assert _done(page) == held and int(page.inner_text("#queued-count")) > 0
            # The picture of the night in progress: the figures, the paused queue with its
            # ETA, and the gallery filling up.
            _wait_for(page, f"{LOADED_THUMBNAILS} >= {held}", 10)
            page.screenshot(path=str(screenshot), full_page=True)

            page.click("button:has-text('Resume')")
            counts += _follow_done_count(page, until=lambda done: done == TOTAL)
            assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == TOTAL, counts
            _wait_for(page, "document.querySelectorAll('#queue-body tr').length === 0", 10)
            assert page.inner_text("#queued-count") == "0"
            assert page.inner_text("#eta") == "idle"
            # The newest renders appear as thumbnails that really loaded.
            _wait_for(page, f"{LOADED_THUMBNAILS} >= {TOTAL}", 20)
            page.screenshot(path=str(tmp_path / "drained.png"), full_page=True)

            # A job page: its parameters, its renders with their outputs.
            page.click("#recent a >> nth=0")
            page.wait_for_selector("#job-renders")
            assert re.search(r"/jobs/\d+", page.url)
            assert "done" in page.inner_text("#job-state")
            assert "a lighthouse at dusk" in page.inner_text("#job-params")
            _wait_for(page, ALL_THUMBNAILS_LOADED, 10)
            assert _loaded_thumbnails(page) == PER_JOB
            page.screenshot(path=str(tmp_path / "job.png"), full_page=True)

            # The history gallery: every render's thumbnail.
            page.click("header >> text=History")
            page.wait_for_selector(".job")
            _wait_for(page, ALL_THUMBNAILS_LOADED, 10)
            assert _loaded_thumbnails(page) == TOTAL
            browser.close()
    finally:
        if handle is not None:
            handle.stop()
        daemon.stop()
        thread.join(timeout=60)
        store.dispose()
    assert not errors and not thread.is_alive()
    assert all(job["state"] == "done" for job in farm.history())

    # A real screenshot, not an empty page: a PNG of the page's size with content.
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.width == 1280 and image.height >= 600
        colours = image.convert("RGB").resize((64, 64)).getcolors(64 * 64)
        assert colours is not None and len(colours) > 20
    assert screenshot.stat().st_size > 20_000
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
