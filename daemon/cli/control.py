"""`lorafarm pause | resume | cancel JOB | retry JOB`: the control verbs on the command line.

The handlers only parse and print; what a verb does lives in `daemon.queue.control`, which the
status page calls too. They talk to the database directly (not to the running daemon), so
they work whether or not a daemon runs: SQLite's busy timeout makes them take turns with it,
and the daemon sees the change at its next claim.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon.config import load_config

# Same default as daemon.cli.main; not imported from there because main imports this module.
DEFAULT_CONFIG = "config.toml"


def add_control_commands(subparsers: Any) -> None:
    """Register pause, resume, cancel and retry on the `lorafarm` sub-command parser."""
    for name, text in (("pause", "stop starting new renders (running ones finish)"),
                       ("resume", "start queued renders again after a pause")):
        verb = subparsers.add_parser(name, help=text, description=text)
        _common(verb)
        verb.set_defaults(handler=cmd_control, verb=name)
    for name, text in (("cancel", "cancel a job: queued renders are dropped, running ones "
                                  "finish, the job file goes to jobs/failed/"),
                       ("retry", "queue a failed or cancelled job's failed renders again")):
        verb = subparsers.add_parser(name, help=text, description=text)
        verb.add_argument("job", help="the job id (`lorafarm history` lists them)")
        _common(verb)
        verb.set_defaults(handler=cmd_control, verb=name)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                        help="config file (./config.toml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_control(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 1 the verb was refused (bad id or state), 2 config error (raised
    as ConfigError for cli.main to report)."""
    from daemon.queue import control
    from daemon.store.models import Store

    config = load_config(args.config)
    config.ensure_folders()
    # A writer store: the verbs write. Migrating is a no-op on a current database and lets
    # `lorafarm pause` work before the daemon ever ran (pause first, then start it).
    store = Store.for_url(config.database_url)
    try:
        store.migrate()
        if args.verb == "pause":
            result = control.pause(store, by="cli")
        elif args.verb == "resume":
            result = control.resume(store, by="cli")
        elif args.verb == "cancel":
            result = control.cancel_job(config, store, args.job, by="cli")
        else:
            result = control.retry_job(config, store, args.job, by="cli")
    except control.ControlError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"lorafarm {args.verb}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.message)
    return 0
