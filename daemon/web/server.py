"""The status page: the queue with live progress and an ETA, the history with a thumbnail
gallery, a page per job, the LoRA library, the control buttons, a JSON API for the same
data, the output files, and /metrics.

`create_app(config, store_factory)` builds the Starlette app; `serve_in_thread(config, app)`
runs it with uvicorn inside the daemon. The endpoints are plain synchronous functions
(Starlette runs them in its thread pool) because the store is synchronous SQLAlchemy.

Who may see it:
- Bound to loopback (the default), anyone on this machine may, but the Host header must be
  a loopback name, so a web page elsewhere cannot reach it through DNS rebinding.
- Bound to any other address, every request needs config.web.token, as `?token=` or
  `Authorization: Bearer`; links on the page carry the `?token=` they were opened with.
- A POST whose Origin is another site is refused (cross-site form posts could otherwise
  pause or cancel from any page the user visits).
Output files are served from config.paths.outputs only: nothing outside it, no hidden files
(partial outputs), no symlinks leading out.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import jinja2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.config import Config
from daemon.library.embeddings import EmbeddingLibrary
from daemon.queue import control
from daemon.store import queries
from daemon.store.models import Store
from daemon.store.state_lock import daemon_pid
from daemon.web.address import URL_FILE, page_url, status_url  # noqa: F401 (re-exported)
from daemon.web.metrics import build_registry
from daemon.web.submit import submit_job
from daemon.web.templates import CSS, SCRIPT, TEMPLATES

if TYPE_CHECKING:
    from daemon.contract.loader import Plugins
    from daemon.intake.hot_folder import Submitted

log = logging.getLogger(__name__)

SERVED_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".mp4", ".webm", ".html",
                   ".json", ".txt"}
THUMB_SIZE = 256
THUMB_CACHE_ENTRIES = 512  # ~20 KB each: a few MB for a night's gallery


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- the stores ------------------------------------------------------------------------------

class _Stores:
    """The factory's store (writes: the control verbs) plus a reader on the same database,
    made lazily at the first request, so pages never take SQLite's write lock."""

    def __init__(self, factory: Callable[[], Store]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._writer: Store | None = None
        self._reader: Store | None = None

    def writer(self) -> Store:
        with self._lock:
            if self._writer is None:
                self._writer = self._factory()
            return self._writer

    def reader(self) -> Store:
        writer = self.writer()
        with self._lock:
            if self._reader is None:
                self._reader = Store(writer.url, writer=False) if writer.is_sqlite else writer
            return self._reader

    def close(self) -> None:
        with self._lock:
            for store in {id(s): s for s in (self._reader, self._writer) if s}.values():
                store.dispose()
            self._reader = self._writer = None


# -- the guard -------------------------------------------------------------------------------

class _Guard:
    """Token, Host and Origin checks in front of every route (see the module docstring)."""

    def __init__(self, app: ASGIApp, config: Config) -> None:
        self.app = app
        self.token = config.web.token
        self.loopback = is_loopback(config.web.host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        problem = self.refuse(request)
        if problem is not None:
            await problem(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refuse(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        if self.loopback:
            name = urlsplit(f"//{host}").hostname or ""
            if not is_loopback(name):
                return PlainTextResponse(
                    f"lorafarm's page answers to loopback names only (got Host {host!r}); "
                    "open it as http://127.0.0.1:PORT/", status_code=403)
        else:
            given = request.query_params.get("token", "")
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
                return PlainTextResponse(
                    "a token is needed: add ?token=... (config.toml [web] token) to the URL, "
                    "or send Authorization: Bearer ...", status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="lorafarm"'})
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return PlainTextResponse(f"refused: a POST from another site ({origin})",
                                         status_code=403)
        return None


# -- the app ---------------------------------------------------------------------------------

@dataclass
class _Farm:
    config: Config
    stores: _Stores
    templates: jinja2.Environment
    thumbs: OrderedDict[tuple[str, int, int], bytes]
    thumbs_lock: threading.Lock

    @property
    def outputs(self) -> Path:
        return self.config.paths.outputs

    def close(self) -> None:
        self.stores.close()


def create_app(config: Config, store_factory: Callable[[], Store],
               plugins: Plugins | None = None,
               submit: Callable[[str, bytes], Submitted] | None = None,
               job_ended: Callable[[int], object] | None = None) -> Starlette:
    """The status page app. `store_factory` is called once, at the first request; the store
    it returns is disposed when the app is closed (`app.state.farm.close()`, which
    `serve_in_thread`'s handle does on stop). `plugins`: the daemon's loaded plugins, for
    the plugins page (None: loaded from config.toml at the first request). `submit` (the
    daemon's `Intake.submit`) takes jobs posted to /api/jobs; without it (no daemon behind
    the page) that answers 503. `job_ended` (the daemon's `JobEnd.ended`) is told of a job
    cancelled here, so its end is acted on at once (without it, at the daemon's next sweep)."""
    loaded_plugins: list[Plugins] = [plugins] if plugins is not None else []

    def plugin_report() -> dict[str, Any]:
        if not loaded_plugins:
            from daemon.contract.loader import Plugins  # imports torch: only when the page is asked

            loaded_plugins.append(Plugins(config.plugins))
        return loaded_plugins[0].report()

    templates = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True,
                                   undefined=jinja2.StrictUndefined)
    farm = _Farm(config, _Stores(store_factory), templates, OrderedDict(), threading.Lock())
    registry = build_registry(lambda: farm.stores.reader())

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        token = request.query_params.get("token", "")
        html = templates.get_template(name).render(
            css=CSS, script=SCRIPT, token=token, u=_linker(token),
            msg=request.query_params.get("msg", ""), **context)
        return HTMLResponse(html, status_code=status, headers=_PAGE_HEADERS)

    def error_page(request: Request, exc: control.ControlError, back: str) -> HTMLResponse:
        return page(request, "error.html", status=exc.status, title="Not done",
                    message=str(exc), back=back)

    # -- pages --

    def queue_page(request: Request) -> Response:
        with farm.stores.reader().session() as session:
            snapshot = queries.queue_snapshot(session, farm.outputs)
        return page(request, "queue.html", q=snapshot, daemon=_daemon_state(config))

    def history_page(request: Request) -> Response:
        limit = _int_param(request, "limit", 50, 1, 1000)
        with farm.stores.reader().session() as session:
            jobs = queries.history(session, farm.outputs, limit=limit)
        return page(request, "history.html", jobs=jobs)

    def job_page(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        with farm.stores.reader().session() as session:
            job = queries.job_detail(session, farm.outputs, job_id)
        if job is None:
            return error_page(request, control.UnknownJobError(f"there is no job {job_id}"),
                              "/history")
        return page(request, "job.html", job=job)

    embedding_library: list[EmbeddingLibrary] = []  # built at first use: it loads plugins

    def embedding_rows() -> list[dict[str, object]]:
        if not embedding_library:
            from daemon.contract.loader import Plugins

            embedding_library.append(EmbeddingLibrary(config, Plugins(config.plugins)))
        return [info.as_dict() for info in embedding_library[0].scan()]

    def loras_page(request: Request) -> Response:
        with farm.stores.reader().session() as session:
            loras = queries.lora_rows(session)
        return page(request, "loras.html", loras=loras, embeddings=embedding_rows())

    def api_embeddings(request: Request) -> Response:
        return JSONResponse(embedding_rows())

    def plugins_page(request: Request) -> Response:
        return page(request, "plugins.html", report=plugin_report())

    # -- control: the same functions as the CLI --

    def run_verb(verb: str, request: Request) -> control.ControlResult:
        store = farm.stores.writer()
        if verb == "pause":
            return control.pause(store, by="web")
        if verb == "resume":
            return control.resume(store, by="web")
        job_id = request.path_params["job_id"]
        if verb == "cancel":
            result = control.cancel_job(config, store, job_id, by="web")
            if job_ended is not None and result.job_id is not None:
                job_ended(result.job_id)
            return result
        return control.retry_job(config, store, job_id, by="web")

    def verb_form(verb: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            job_id = request.path_params.get("job_id")
            back = f"/jobs/{job_id}" if job_id is not None else "/"
            try:
                result = run_verb(verb, request)
            except control.ControlError as exc:
                return error_page(request, exc, back)
            # Post/redirect/get: reloading the page does not post again.
            query = {"msg": result.message}
            if request.query_params.get("token"):
                query["token"] = request.query_params["token"]
            return RedirectResponse(f"{back}?{urlencode(query)}", status_code=303)
        return endpoint

    def verb_api(verb: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            try:
                result = run_verb(verb, request)
            except control.ControlError as exc:
                return JSONResponse({"ok": False, "error": str(exc)}, status_code=exc.status)
            return JSONResponse(result.as_dict())
        return endpoint

    # -- JSON API --

    def api_status(request: Request) -> Response:
        with farm.stores.reader().session() as session:
            renders, jobs = queries.state_counts(session)
            paused = queries.is_paused_in(session)
        return JSONResponse({"daemon": _daemon_state(config), "paused": paused,
                             "renders": renders, "jobs": jobs})

    def api_queue(request: Request) -> Response:
        limit = _int_param(request, "limit", queries.QUEUE_ROWS, 0, 10_000)
        with farm.stores.reader().session() as session:
            snapshot = queries.queue_snapshot(session, farm.outputs, limit=limit)
        return JSONResponse(snapshot, headers={"Cache-Control": "no-store"})

    def api_history(request: Request) -> Response:
        limit = _int_param(request, "limit", 50, 1, 1000)
        with farm.stores.reader().session() as session:
            return JSONResponse(queries.history(session, farm.outputs, limit=limit))

    def api_gallery(request: Request) -> Response:
        limit = _int_param(request, "limit", 60, 1, 1000)
        with farm.stores.reader().session() as session:
            return JSONResponse(queries.gallery(session, farm.outputs, limit=limit))

    def api_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        with farm.stores.reader().session() as session:
            job = queries.job_detail(session, farm.outputs, job_id)
        if job is None:
            return JSONResponse({"ok": False, "error": f"there is no job {job_id}"},
                                status_code=404)
        return JSONResponse(job)

    def api_loras(request: Request) -> Response:
        with farm.stores.reader().session() as session:
            return JSONResponse(queries.lora_rows(session))

    def api_plugins(request: Request) -> Response:
        return JSONResponse(plugin_report())

    async def api_submit(request: Request) -> Response:
        return await submit_job(request, submit)

    # -- files --

    def output_file(request: Request) -> Response:
        path = _output_path(farm.outputs, request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "private, max-age=60",
                                           "X-Content-Type-Options": "nosniff"})

    def thumbnail(request: Request) -> Response:
        path = _output_path(farm.outputs, request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            poster = path.with_suffix(".png")
            if not poster.is_file():
                return PlainTextResponse("no poster for this file", status_code=404)
            path = poster
        data = _thumbnail_bytes(farm, path)
        if data is None:
            return FileResponse(path)  # unreadable as an image here: let the browser try
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=60"})

    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/", queue_page),
        Route("/history", history_page),
        Route("/jobs/{job_id:int}", job_page),
        Route("/loras", loras_page),
        Route("/files/{path:path}", output_file),
        Route("/thumbs/{path:path}", thumbnail),
        Route("/metrics", metrics),
        Route("/api/status", api_status),
        Route("/api/queue", api_queue),
        Route("/api/history", api_history),
        Route("/api/gallery", api_gallery),
        Route("/api/jobs", api_submit, methods=["POST"]),
        Route("/api/jobs/{job_id:int}", api_job),
        Route("/api/loras", api_loras),
        Route("/plugins", plugins_page),
        Route("/api/plugins", api_plugins),
        Route("/api/embeddings", api_embeddings),
    ]
    for prefix, make in (("", verb_form), ("/api", verb_api)):
        routes += [Route(f"{prefix}/{verb}", make(verb), methods=["POST"])
                   for verb in ("pause", "resume")]
        routes += [Route(f"{prefix}/jobs/{{job_id:int}}/{verb}", make(verb), methods=["POST"])
                   for verb in ("cancel", "retry")]
    app = Starlette(routes=routes)
    app.add_middleware(_Guard, config=config)  # type: ignore[arg-type]
    app.state.farm = farm
    return app


_PAGE_HEADERS = {
    # No external assets; the inline style and script are ours.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self' 'unsafe-inline'; img-src 'self'; "
                               "media-src 'self'; frame-ancestors 'none'",
    # A ?token= in the address must not leak to other sites through the Referer header.
    # Not "no-referrer": with it Chromium sends `Origin: null` on the page's own form
    # posts, which the guard must refuse like any opaque origin.
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def _linker(token: str) -> Callable[[str], str]:
    def link(path: str) -> str:
        if not token:
            return path
        return f"{path}{'&' if '?' in path else '?'}{urlencode({'token': token})}"
    return link


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query_params.get(name, default))
    except ValueError:
        return default
    return max(low, min(high, value))


def _daemon_state(config: Config) -> dict[str, Any]:
    pid = daemon_pid(config.paths.state)
    return {"running": pid is not None, "pid": pid}


def _output_path(outputs: Path, relative: str) -> Path | None:
    """The file under outputs/ that `relative` names, or None: absolute paths, `..`, hidden
    names (partial outputs), symlinks leading out, folders and unknown types are refused."""
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    parts = Path(relative).parts
    if Path(relative).is_absolute() or any(p in ("..", ".") or p.startswith(".") for p in parts):
        return None
    root = outputs.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    if candidate.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return candidate


def _thumbnail_bytes(farm: _Farm, path: Path) -> bytes | None:
    from PIL import Image

    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with farm.thumbs_lock:
        cached = farm.thumbs.get(key)
        if cached is not None:
            farm.thumbs.move_to_end(key)
            return cached
    try:
        with Image.open(path) as image:
            image.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buffer = io.BytesIO()
            image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB").save(
                buffer, format="PNG", optimize=False)
    except Exception as exc:  # a damaged file must not break the gallery
        log.warning("no thumbnail for %s: %s", path, exc)
        return None
    data = buffer.getvalue()
    with farm.thumbs_lock:
        farm.thumbs[key] = data
        while len(farm.thumbs) > THUMB_CACHE_ENTRIES:
            farm.thumbs.popitem(last=False)
    return data


# -- serving ---------------------------------------------------------------------------------

@dataclass
class WebHandle:
    """The page served in a background thread: `.url` to print, `.stop()` at shutdown."""

    url: str
    port: int
    server: Any  # uvicorn.Server
    thread: threading.Thread
    app: Starlette
    url_file: Path | None

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
        farm = getattr(self.app.state, "farm", None)
        if farm is not None:
            farm.close()
        if self.url_file is not None:
            self.url_file.unlink(missing_ok=True)


class WebStartError(RuntimeError):
    """The page could not be served (e.g. the port is taken); the message says what to do."""


def serve_in_thread(config: Config, app: Starlette, *, start_timeout: float = 10.0) -> WebHandle:
    """Serve `app` on config.web.host:port (port 0: a free port, reported in `.url`) with
    uvicorn in a daemon thread. The socket is bound here, before the thread starts, so a
    taken port is an error the caller sees at once."""
    import uvicorn

    host, port = config.web.host, config.web.port
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as exc:
        raise WebStartError(f"cannot serve the status page on {host}:{port}: {exc.strerror}; "
                            "set another [web] port in config.toml (0 picks a free one), or "
                            "[web] enabled = false") from exc
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False,  # the access log would show ?token=
        lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="status-page", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise WebStartError(f"the status page did not start on {host}:{bound_port}")
        time.sleep(0.02)
    url = page_url(host, bound_port)
    url_file = config.paths.state / URL_FILE
    try:
        url_file.write_text(url + "\n", encoding="utf-8")
    except OSError:
        url_file = None  # only `lorafarm status` reads it; serving matters more
    log.info("status page: %s", url)
    return WebHandle(url=url, port=bound_port, server=server, thread=thread, app=app,
                     url_file=url_file)

