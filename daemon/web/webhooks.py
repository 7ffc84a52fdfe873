"""Per-event webhooks: config.toml `[[webhooks]]`, a JSON POST for each event a receiver asks
for (job_accepted, render_done, render_failed, job_finished, queue_drained).

Where the events come from: the event rows this daemon commits. A listener on the daemon's
database sessions collects the `Event` rows each transaction adds and, once it commits,
hands them to the senders; a transaction that rolls back sends nothing. So every path that
records a render done or failed (the output writer, a worker failing a batch, a lease that
ran out, a cancel from the page) is covered without each one having to remember to notify,
and in a farm each event is sent once, by the host that recorded it.

Off the render path: after the commit the listener only appends to a list. Each webhook has
its own sender thread, which builds the payload (job state, outputs, page URL, read from the
database at send time), posts it, and on failure tries again after `backoff_seconds`,
doubling each time, `retries` times. A delivery that never succeeds is recorded as a
`webhook_failed` event. A dead or slow receiver slows only its own sender thread.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from daemon.config import Config, WebhookSettings
from daemon.store import queries
from daemon.store.models import Event, Job, Render, Store, add_event, utcnow

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0
MAX_PENDING = 10_000  # per webhook; beyond it the oldest delivery is dropped (and recorded)
SHUTDOWN_GRACE_SECONDS = 5.0  # what close() gives deliveries that are due
_SESSION_KEY = "lorafarm_webhook_events"


@dataclass(order=True)
class _Delivery:
    due: float
    order: int
    kind: str = field(compare=False)
    event: dict[str, Any] = field(compare=False)  # the event row's fields
    attempt: int = field(default=0, compare=False)
    payload: dict[str, Any] | None = field(default=None, compare=False)
    last_error: str = field(default="", compare=False)


class Webhooks:
    """The `[[webhooks]]` of one daemon: `start()` after the store is ready, `close()` at
    shutdown. `page_url()` gives the status page's base URL (None when it is off)."""

    def __init__(self, config: Config, store: Store, page_url: Callable[[], str | None],
                 host: str) -> None:
        self.config = config
        self.store = store
        self.page_url = page_url
        self.host = host
        self.senders = [_Sender(self, hook) for hook in config.webhooks]
        self._wanted = {kind for hook in config.webhooks for kind in hook.events}
        self._listening = False
        # One bound method object each: `event.remove` needs the very one `listen` got.
        self._listeners = (("after_flush", self._after_flush),
                           ("after_commit", self._after_commit),
                           ("after_rollback", self._after_rollback))

    def start(self) -> None:
        if not self.senders:
            return
        for name, listener in self._listeners:
            sa_event.listen(Session, name, listener)
        self._listening = True
        for sender in self.senders:
            sender.start()

    def close(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        if self._listening:
            for name, listener in self._listeners:
                sa_event.remove(Session, name, listener)
            self._listening = False
        deadline = time.monotonic() + grace
        for sender in self.senders:
            sender.stop(deadline)

    # -- collecting committed events -------------------------------------------------------

    def _ours(self, session: Session) -> bool:
        return session.bind is self.store.engine

    def _after_flush(self, session: Session, _context: Any) -> None:
        if not self._ours(session):
            return
        for row in session.new:
            if isinstance(row, Event) and row.kind in self._wanted:
                session.info.setdefault(_SESSION_KEY, []).append({
                    "id": row.id, "kind": row.kind, "job_id": row.job_id,
                    "render_id": row.render_id, "message": row.message,
                    "data": json.loads(row.data_json or "{}"),
                    "at": queries.iso(row.at) if row.at else queries.iso(utcnow())})

    def _after_commit(self, session: Session) -> None:
        events = session.info.pop(_SESSION_KEY, None)
        if not events:
            return
        for sender in self.senders:
            sender.add([e for e in events if e["kind"] in sender.hook.events])

    def _after_rollback(self, session: Session) -> None:
        session.info.pop(_SESSION_KEY, None)

    # -- payloads --------------------------------------------------------------------------

    def payload(self, kind: str, event: dict[str, Any]) -> dict[str, Any]:
        """What a receiver gets: the event, and the job as the database has it now."""
        base = self.page_url()
        body: dict[str, Any] = {
            "event": kind, "at": event["at"], "host": self.host, "message": event["message"],
            "job_id": event["job_id"], "render_id": event["render_id"],
        }
        outputs_dir = self.config.paths.outputs
        with self.store.session() as session:
            if event["job_id"] is not None:
                job = session.get(Job, event["job_id"])
                if job is not None:
                    done = queries.done_outputs(session, job.id)
                    counts = queries.render_counts(session, job_id=job.id)
                    body.update(job_name=job.name, file=job.file_name, state=job.state,
                                error=job.error, renders=counts,
                                outputs=[_output(outputs_dir, path, base) for _, path in done],
                                page_url=f"{base}jobs/{job.id}" if base else None)
            if event["render_id"] is not None:
                render = session.get(Render, event["render_id"])
                if render is not None:
                    body["render"] = {
                        "index": render.index, "seed": render.seed, "state": render.state,
                        "checkpoint": render.checkpoint, "error": render.error,
                        "output": (_output(outputs_dir, render.output_path, base)
                                   if render.output_path else None)}
        if kind == "queue_drained":
            body.update(event["data"])
        return body

    def record_failure(self, hook: WebhookSettings, delivery: _Delivery, why: str) -> None:
        try:
            with self.store.session() as session:
                add_event(session, "webhook_failed",
                          f"{_safe(hook.url)}: {delivery.kind} not delivered: {why}",
                          job_id=delivery.event["job_id"],
                          render_id=delivery.event["render_id"], url=_safe(hook.url),
                          event=delivery.kind, attempts=delivery.attempt, error=why)
        except Exception:
            log.exception("could not record a failed webhook delivery")


class _Sender:
    """One webhook's thread: deliveries in a heap by due time."""

    def __init__(self, owner: Webhooks, hook: WebhookSettings) -> None:
        self.owner = owner
        self.hook = hook
        self._heap: list[_Delivery] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline = 0.0
        self._thread = threading.Thread(target=self._run, name=f"webhook-{_safe(hook.url)}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        dropped: list[_Delivery] = []
        with self._cond:
            now = time.monotonic()
            for event in events:
                heapq.heappush(self._heap, _Delivery(now, next(self._order), event["kind"],
                                                     event))
            while len(self._heap) > MAX_PENDING:
                oldest = min(self._heap, key=lambda d: d.order)
                self._heap.remove(oldest)
                dropped.append(oldest)
            if dropped:
                heapq.heapify(self._heap)
            self._cond.notify()
        for delivery in dropped:
            self.owner.record_failure(self.hook, delivery, f"more than {MAX_PENDING} "
                                      "deliveries waiting (the receiver is down)")

    def stop(self, deadline: float) -> None:
        if self._thread.ident is None:
            return  # never started (the daemon stopped during start-up)
        with self._cond:
            self._stopping, self._deadline = True, deadline
            self._cond.notify()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + self.hook
                          .timeout_seconds + 1.0)

    def _next(self) -> _Delivery | None:
        """The next delivery that is due; None when stopping and nothing more can be sent."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._stopping and now >= self._deadline:
                    return None
                if self._heap and (self._heap[0].due <= now or self._stopping):
                    # Stopping: what waits for a retry gets its last try now.
                    return heapq.heappop(self._heap)
                if self._stopping and not self._heap:
                    return None
                wait = (self._heap[0].due - now) if self._heap else None
                if self._stopping:
                    wait = min(wait or 0.5, self._deadline - now)
                self._cond.wait(timeout=wait)

    def _run(self) -> None:
        while True:
            delivery = self._next()
            if delivery is None:
                break
            try:
                self._attempt(delivery)
            except Exception:  # a sender thread must outlive any one delivery
                log.exception("webhook %s: delivery failed unexpectedly", _safe(self.hook.url))
        with self._cond:
            left, self._heap = self._heap, []
        for delivery in left:
            last = delivery.last_error or "none"
            self.owner.record_failure(self.hook, delivery, "the daemon stopped before it "
                                      f"was delivered (last error: {last})")

    def _attempt(self, delivery: _Delivery) -> None:
        if delivery.payload is None:
            delivery.payload = self.owner.payload(delivery.kind, delivery.event)
        delivery.attempt += 1
        error = post_json(self.hook.url, delivery.payload, dict(self.hook.headers),
                          self.hook.timeout_seconds)
        if error is None:
            return
        delivery.last_error = error
        stopping = self._stopping
        if delivery.attempt > self.hook.retries or stopping:
            log.warning("webhook %s: %s not delivered after %d attempt(s): %s",
                        _safe(self.hook.url), delivery.kind, delivery.attempt, error)
            self.owner.record_failure(self.hook, delivery,
                                      f"{error} (after {delivery.attempt} attempt(s))")
            return
        wait = min(MAX_BACKOFF_SECONDS,
                   self.hook.backoff_seconds * 2 ** (delivery.attempt - 1))
        log.info("webhook %s: %s failed (%s); trying again in %.1f s", _safe(self.hook.url),
                 delivery.kind, error, wait)
        with self._cond:
            delivery.due = time.monotonic() + wait
            heapq.heappush(self._heap, delivery)


def post_json(url: str, body: dict[str, Any], headers: dict[str, str],
              timeout: float) -> str | None:
    """POST `body` as JSON; None on a 2xx answer, else what went wrong. Never raises."""
    data = json.dumps(body, default=str).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "lorafarm", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))
    except Exception as exc:  # anything else from a receiver is still not the daemon's problem
        return f"{type(exc).__name__}: {exc}"


def _output(outputs_dir: Any, path: str | None, base: str | None) -> dict[str, Any]:
    rel = queries.output_relpath(outputs_dir, path)
    return {"path": path, "url": f"{base}files/{rel}" if base and rel else None}


def _safe(url: str) -> str:
    """The URL without its query (webhook URLs often carry a secret there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
