"""Where the status page is served, for `lorafarm status` and the daemon's log: light enough
for the CLI's read-only verbs (no web framework imported)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from daemon.config import Config
from daemon.store.state_lock import daemon_pid

URL_FILE = "web.url"  # in the state folder while the page is served (port 0 picks one)


def page_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()  # a wildcard bind is reached by the machine's name
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def status_url(config: Config) -> str:
    """The status page's address for `lorafarm status`: the one the running daemon wrote
    (it knows the port when port 0 picked one), else the one config.toml gives. Without
    the token: `?token=` from config.toml [web] has to be added for a non-loopback bind."""
    url_file = config.paths.state / URL_FILE
    try:
        written = url_file.read_text(encoding="utf-8").strip()
    except OSError:
        written = ""
    # A file left by a daemon that died names a port nobody listens on any more.
    if written and daemon_pid(config.paths.state) is not None:
        return written
    return page_url(config.web.host, config.web.port)


def page_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether something answers HTTP at the page's address (any status: a page that wants
    a token answers 401, and that is still a page being served)."""
    try:
        with urllib.request.urlopen(url + "api/status", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
