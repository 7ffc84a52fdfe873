"""Jobs over HTTP: `POST /api/jobs` on the status page, and `lorafarm submit FILE...`.

The endpoint takes a job in the job-file schema (a JSON body, or TOML with content type
application/toml; `?name=portrait.toml` names its file) and hands the bytes to the daemon's
`Intake.submit`, which runs them through the checks a dropped file goes through and files
them the same way (jobs/processing/, then done/ or failed/). Answers:

- 201 with the job id, its page URL and where its file is;
- 400 with the same what/where/how report a rejected file gets (nothing is queued);
- 413 for a body larger than any job file, 415 for a type lorafarm does not read,
  503 when no daemon is behind the page or the database did not answer.

The page's guard applies as to the control verbs: open on a loopback bind, the token on any
other.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from daemon.contract.jobfile import JobFileError

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.intake.hot_folder import Submitted

log = logging.getLogger(__name__)

# Content type -> the file suffix whose parser reads it.
CONTENT_SUFFIXES = {"application/json": ".json", "application/toml": ".toml",
                    "text/toml": ".toml", "text/x-toml": ".toml"}
SUFFIX_CONTENT = {".json": "application/json", ".toml": "application/toml"}
MAX_BODY_BYTES = 512 * 1024 * 1024  # intake's own limits (1 MB for text jobs) apply after
SUBMIT_TIMEOUT = 30.0  # seconds: intake checks a job in well under a second


async def submit_job(request: Request,
                     submit: Callable[[str, bytes], Submitted] | None) -> Response:
    if submit is None:
        return _error(503, "this page has no daemon behind it to take jobs; start `lorafarm "
                      "run`, or drop the file into jobs/")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    suffix = CONTENT_SUFFIXES.get(content_type)
    name = request.query_params.get("name", "").strip()
    if name and not Path(name).suffix and suffix:
        name += suffix
    if not name:
        if suffix is None:
            return _error(415, f"content type {content_type or '(none)'!r} is not a job type "
                          "lorafarm reads; send application/json or application/toml, or "
                          "name the file with ?name=job.toml")
        name = f"submitted{suffix}"
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"the body is over {MAX_BODY_BYTES} bytes; that is no job file")
    try:
        submitted = await run_in_threadpool(submit, name, bytes(body))
    except JobFileError as exc:
        return JSONResponse({"ok": False, "error": exc.what, "key": exc.key, "line": exc.line,
                             "fix": exc.fix,
                             "report": f"{name} was not accepted.\n\n{exc.report()}\n"},
                            status_code=400)
    except Exception as exc:
        log.exception("a job posted to /api/jobs could not be taken in")
        return _error(503, f"the daemon could not take the job in ({type(exc).__name__}: "
                      f"{exc}); if it got as far as its file, the file waits in jobs/ and is "
                      "taken in from there (a second copy would be refused as a duplicate)")
    base = str(request.base_url)
    url = f"{base}jobs/{submitted.job_id}"
    return JSONResponse({"ok": True, "job_id": submitted.job_id, "url": url,
                         "api_url": f"{base}api/jobs/{submitted.job_id}",
                         "file_name": submitted.file_name, "file_path": submitted.file_path,
                         "renders": submitted.renders, "warnings": submitted.warnings},
                        status_code=201, headers={"Location": url})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


# -- the client: `lorafarm submit` ---------------------------------------------------------

class NoDaemonAnswered(OSError):
    """Nothing listens at the URL (connection refused, no route, timed out)."""


def post_job(url: str, path: Path, token: str = "") -> tuple[int, dict[str, Any]]:
    """POST one job file to a daemon's /api/jobs; returns (HTTP status, JSON answer).
    Raises NoDaemonAnswered when no server answers at all."""
    endpoint = url.rstrip("/") + "/api/jobs?name=" + quote(path.name)
    headers = {"Content-Type": SUFFIX_CONTENT.get(path.suffix.lower(),
                                                  "application/octet-stream"),
               "User-Agent": "lorafarm"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(endpoint, data=path.read_bytes(), method="POST",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=SUBMIT_TIMEOUT) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read()) or {"error": exc.reason}
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise NoDaemonAnswered(f"no daemon answered at {url}: "
                               f"{getattr(exc, 'reason', exc)}") from exc


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")[:500]}
    return value if isinstance(value, dict) else {"error": str(value)}


def drop_into_inbox(jobs: Path, path: Path) -> Path:
    """Write a job file into the inbox the way intake wants it: under a hidden temporary
    name first, then renamed (intake never sees half a file). A name already waiting there
    gets a -2, -3... suffix rather than replacing someone's job."""
    jobs.mkdir(parents=True, exist_ok=True)
    raw = path.read_bytes()
    stem, suffix = path.stem, path.suffix
    target, number = jobs / path.name, 2
    while target.exists():
        target, number = jobs / f"{stem}-{number}{suffix}", number + 1
    temp = jobs / f".{target.name}.tmp"
    with open(temp, "wb") as handle:
        handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, target)
    return target


def submit_files(config: Config, files: list[Path], url: str | None, token: str | None,
                 as_json: bool) -> int:
    """`lorafarm submit`: post each file; with no --url and no daemon answering, write them
    into the inbox instead. Exit code 0 when every job was queued, 1 when one was refused,
    2 when --url named a server that did not answer."""
    from daemon.web.address import status_url

    target = url or status_url(config)
    secret = config.web.token if token is None else token
    results: list[dict[str, Any]] = []
    code = 0
    for path in files:
        if not path.is_file():
            results.append({"file": str(path), "ok": False,
                            "error": f"{path} is not a file; give job files (.toml, .json)"})
            code = 1
            continue
        try:
            status, answer = post_job(target, path, secret)
        except NoDaemonAnswered as exc:
            if url is not None:
                results.append({"file": str(path), "ok": False, "error": str(exc)})
                code = 2
                continue
            dropped = drop_into_inbox(config.paths.jobs, path)
            results.append({"file": str(path), "ok": True, "dropped": str(dropped),
                            "message": f"no daemon answered at {target}; written into the "
                                       f"inbox as {dropped} (taken in when a daemon runs)"})
            continue
        answer.setdefault("ok", status == 201)
        results.append({"file": str(path), "status": status, **answer})
        if status != 201:
            code = max(code, 1)
    if as_json:
        print(json.dumps(results, indent=2))
        return code
    for row in results:
        if row.get("job_id") is not None:
            print(f"{row['file']}: job {row['job_id']} queued ({row.get('renders')} render(s)): "
                  f"{row['url']}")
            for warning in row.get("warnings") or ():
                print(f"  warning: {warning}")
        elif row.get("dropped"):
            print(f"{row['file']}: {row['message']}")
        else:
            print(f"{row['file']}: not accepted: "
                  f"{row.get('report') or row.get('error')}".rstrip(), file=sys.stderr)
    return code
