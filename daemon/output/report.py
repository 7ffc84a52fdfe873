"""The morning report: a static HTML page in outputs/ and an optional webhook, written when
the queue drains.

The page is self-contained (inline CSS, no script) and refers to the outputs by relative
paths, so it works opened straight from disk, copied together with outputs/, or through the
status page's /files/. It lists what finished since `since`: a contact sheet of the renders,
the failures with their reasons, and the night's figures.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2

from daemon.config import Config
from daemon.store import queries
from daemon.store.models import (
    RENDER_CANCELLED,
    RENDER_DONE,
    RENDER_FAILED,
    Store,
    add_event,
    utcnow,
)

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 5.0  # seconds: the daemon must not hang on a slow receiver
LATEST_NAME = "morning-report.html"  # always the newest report, beside the dated ones


def write_morning_report(config: Config, store: Store, since: dt.datetime) -> Path:
    """Write outputs/morning-report-<UTC time>.html (and morning-report.html, the newest one)
    for what ended since `since`; returns the dated file's path."""
    with store.session() as session:
        summary = queries.night_summary(session, config.paths.outputs, since)
    return _write_report(config.paths.outputs, summary)


def _write_report(outputs: Path, summary: dict[str, Any]) -> Path:
    outputs.mkdir(parents=True, exist_ok=True)
    html = _TEMPLATES.get_template("report.html").render(s=summary, href=_href)
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    path = outputs / f"morning-report-{stamp}.html"
    _write_atomically(path, html)
    _write_atomically(outputs / LATEST_NAME, html)
    log.info("morning report: %s (%d done, %d failed)", path, summary["done"],
             summary["failed"])
    return path


def post_webhook(url: str, summary: dict[str, Any]) -> bool:
    """POST `summary` as JSON to `url`. Never raises: a webhook that is down or slow must not
    stop the daemon; the failure is logged and False returned."""
    if urlsplit(url).scheme not in ("http", "https"):
        log.warning("report.webhook_url %r is not an http(s) URL; not posting", url)
        return False
    body = json.dumps(summary, default=str).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "lorafarm"})
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as response:
            ok = 200 <= response.status < 300
            if not ok:
                log.warning("webhook %s answered %s", _safe(url), response.status)
            return ok
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("webhook %s failed: %s", _safe(url), exc)
    except Exception:  # anything else from a receiver is still not the daemon's problem
        log.exception("webhook %s failed", _safe(url))
    return False


def on_queue_drained(config: Config, store: Store, since: dt.datetime) -> Path | None:
    """What the runner calls when the queue drains: the report (when [report] enabled) and
    the webhook (when [report] webhook_url is set). Never raises; returns the report path."""
    if not config.report.enabled:
        return None
    path: Path | None = None
    try:
        with store.session() as session:
            summary = queries.night_summary(session, config.paths.outputs, since)
        path = _write_report(config.paths.outputs, summary)
    except Exception:
        log.exception("could not write the morning report")
        return None
    if config.report.webhook_url:
        # Receivers want figures, not every render: the report has those.
        summary.pop("renders", None)
        summary["failures"] = summary["failures"][:20]
        summary.update(event="queue_drained", report=str(path) if path else None)
        post_webhook(config.report.webhook_url, summary)
    return path


class DrainWatch:
    """Tells when the queue has drained and since when it was busy, so the runner only has
    to call `check()` on each turn of its main loop (one COUNT query; never raises).

    The night starts at the oldest render that was waiting when work was first seen, and ends
    when nothing is queued or running any more (a paused queue still has work: no report).
    Work that came and went between two checks is still reported, from the last report on.
    """

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._since: dt.datetime | None = None
        self._last_report = utcnow()
        self.reports: list[Path] = []

    def check(self) -> Path | None:
        try:
            return self._check()
        except Exception:
            log.exception("could not check whether the queue drained; will try again")
            return None

    def _check(self) -> Path | None:
        with self.store.session() as session:
            if queries.unfinished_renders(session):
                if self._since is None:
                    self._since = queries.first_unfinished_created(session)
                return None
            since = self._since or queries.first_created_finished_after(session,
                                                                        self._last_report)
        if since is None:
            return None  # idle, and nothing ended since the last report
        self._since, self._last_report = None, utcnow()
        self._record_drained(since)
        path = on_queue_drained(self.config, self.store, since)
        if path is not None:
            self.reports.append(path)
        return path

    def _record_drained(self, since: dt.datetime) -> None:
        """A `queue_drained` event with the period's counts (what [[webhooks]] send)."""
        with self.store.session() as session:
            counts = queries.render_counts(session, finished_since=since)
            add_event(session, "queue_drained",
                      f"the queue drained: {counts.get(RENDER_DONE, 0)} done, "
                      f"{counts.get(RENDER_FAILED, 0)} failed",
                      since=queries.iso(since), done=counts.get(RENDER_DONE, 0),
                      failed=counts.get(RENDER_FAILED, 0),
                      cancelled=counts.get(RENDER_CANCELLED, 0))


def _href(relpath: str | None) -> str:
    return quote(relpath) if relpath else ""


def _safe(url: str) -> str:
    """The URL without its query (webhook URLs often carry a secret there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".partial-{path.name}")  # skipped by the page and start-up repair
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


_REPORT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lorafarm morning report {{ s.until }}</title>
<style>
body { font:14px/1.45 system-ui, sans-serif; margin:1.2rem; color:#1d2430; background:#f6f7f9; }
h1 { font-size:1.3rem; } h2 { font-size:1.05rem; margin-top:1.4rem; }
.figures { display:flex; gap:1.6rem; flex-wrap:wrap; }
.figures b { display:block; font-size:1.4rem; } .muted { color:#667085; }
.sheet { display:flex; flex-wrap:wrap; gap:.6rem; }
figure { margin:0; width:160px; }
figure img { width:160px; height:160px; object-fit:cover; border-radius:6px;
  border:1px solid #d9dee7; background:#e7ebf0; }
figcaption { font-size:.8rem; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
table { border-collapse:collapse; } th, td { text-align:left; padding:.25rem .6rem;
  border-bottom:1px solid #d9dee7; vertical-align:top; }
.error { color:#7a1d15; white-space:pre-wrap; }
</style></head><body>
<h1>lorafarm: the night from {{ s.first_started or s.since }} to {{ s.until }}</h1>
<div class="figures">
 <div><b id="done">{{ s.done }}</b><span class="muted">renders done</span></div>
 <div><b id="failed">{{ s.failed }}</b><span class="muted">failed</span></div>
 <div><b>{{ s.cancelled }}</b><span class="muted">cancelled</span></div>
 <div><b id="busy">{{ '%.0f%%'|format(100 * s.busy_fraction)
   if s.busy_fraction is not none else '—' }}</b>
  <span class="muted">busy ({{ s.busy_seconds }} s rendering)</span></div>
 <div><b>{{ '%.0f%%'|format(100 * s.pipeline_fraction)
   if s.pipeline_fraction is not none else '—' }}</b>
  <span class="muted">of it inside pipeline calls</span></div>
 <div><b>{{ s.pipeline_loads }}</b><span class="muted">pipeline loads</span></div>
 <div><b>{{ s.still_queued }}</b><span class="muted">still queued</span></div>
</div>
<h2>Per checkpoint</h2>
<table id="per-checkpoint"><tr><th>Checkpoint</th><th>Done</th><th>Failed</th>
<th>Cancelled</th></tr>
{% for name, n in s.per_checkpoint.items() %}
<tr><td>{{ name }}</td><td>{{ n.done }}</td><td>{{ n.failed }}</td><td>{{ n.cancelled }}</td></tr>
{% endfor %}</table>
{% if s.failures %}
<h2>Failures</h2>
<table id="failures"><tr><th>Job</th><th>Render</th><th>Checkpoint</th><th>Reason</th></tr>
{% for f in s.failures %}
<tr><td>{{ f.job }} <span class="muted">(job {{ f.job_id }}, {{ f.file }})</span></td>
 <td>#{{ f.index }} seed {{ f.seed }}</td><td>{{ f.checkpoint }}</td>
 <td class="error">{{ f.error }}</td></tr>
{% endfor %}</table>
{% endif %}
{% if s.grids %}
<h2>Sweep grids</h2>
<ul id="grids">
{% for g in s.grids %}<li>{{ g.job }} <span class="muted">(job {{ g.job_id }})</span>:
 {% for f in g.files %}<a href="{{ href(f) }}">{{ f.rsplit('/', 1)[-1] }}</a> {% endfor %}</li>
{% endfor %}</ul>
{% endif %}
<h2>Contact sheet</h2>
<div class="sheet" id="sheet">
{% for r in s.renders if r.file %}
<figure><a href="{{ href(r.file) }}"><img src="{{ href(r.poster) }}" loading="lazy"
 alt="{{ r.prompt }}" title="{{ r.prompt }}"></a>
<figcaption>{{ r.job }} #{{ r.index }} · {{ r.seed }}{% if r.video %} · video{% endif %}
</figcaption></figure>
{% else %}<p class="muted">Nothing finished in this period.</p>
{% endfor %}
</div>
</body></html>
"""

_TEMPLATES = jinja2.Environment(loader=jinja2.DictLoader({"report.html": _REPORT}),
                                autoescape=True, undefined=jinja2.StrictUndefined)
