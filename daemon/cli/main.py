"""The `lorafarm` command line.

    lorafarm run [--config FILE] [--until-idle]    the daemon, in the foreground
    lorafarm demo [--dir DIR] [--no-run]           tiny models + sample jobs, then run them
    lorafarm status | history | models | loras [--json]   read the history and libraries
    lorafarm plugins [--json]                      plugins loaded and skipped, and why
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError, load_config

DEFAULT_CONFIG = "config.toml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from daemon.runtime.console import configure_logging

    configure_logging(json_lines=getattr(args, "log_json", False),
                      verbose=getattr(args, "verbose", False))
    try:
        try:
            return int(args.handler(args) or 0)
        except Exception as exc:
            # A read-only verb on a database an older lorafarm wrote (no daemon has run
            # since the upgrade): bring the schema up to date, as the daemon's start does,
            # and answer again.
            if not _upgraded_old_schema(args, exc):
                raise
            return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"lorafarm: config error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `lorafarm history --json | head`: the reader has all it wanted. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _upgraded_old_schema(args: argparse.Namespace, exc: Exception) -> bool:
    """Whether `exc` is a query meeting an older schema (a missing column or table), which
    was then migrated to the newest one. Only where no daemon runs: a running daemon has
    migrated its database at start."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    text = str(exc).lower()
    if not isinstance(exc, OperationalError | ProgrammingError) or not (
            "no such column" in text or "no such table" in text or "does not exist" in text):
        return False
    config_path = getattr(args, "config", None)
    if config_path is None:
        return False
    from daemon.store.models import Store
    from daemon.store.state_lock import daemon_pid

    config = load_config(config_path)
    if daemon_pid(config.paths.state) is not None:
        return False
    print("lorafarm: upgrading the history database to this version's schema",
          file=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    store = Store.for_url(config.database_url)
    try:
        store.migrate()
    finally:
        store.dispose()
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafarm", description="LoRA render daemon")
    parser.add_argument("--version", action="version", version=f"lorafarm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    _config_arg(run)
    run.add_argument("--until-idle", action="store_true",
                     help="exit 0 once nothing is queued or running")
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument("--name", default=None,
                     help="this daemon's name in a farm (default: host name and a short hash "
                          "of the state folder, the same across restarts)")
    run.add_argument("--log-json", action="store_true",
                     help="log lines as JSON objects (for journald, Loki, jq)")
    run.add_argument("--no-live", action="store_true",
                     help="no live progress display even on a terminal")
    run.set_defaults(handler=cmd_run)

    demo = sub.add_parser("demo", help="write tiny demo models and jobs, then render them")
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="demo folder (./demo)")
    demo.add_argument("--no-run", action="store_true", help="only write the files")
    demo.set_defaults(handler=cmd_demo)

    from daemon.cli.control import add_control_commands

    add_control_commands(sub)
    from daemon.cli.plugins import add_plugins_command

    add_plugins_command(sub)

    submit = sub.add_parser("submit", help="send job files to a running daemon over HTTP",
                            description="POST job files to a daemon's /api/jobs (the same "
                            "checks as a dropped file); with no --url and no daemon "
                            "answering, write them into the jobs/ inbox instead")
    _config_arg(submit)
    submit.add_argument("files", type=Path, nargs="+", metavar="FILE", help="job files")
    submit.add_argument("--url", help="the daemon's page, e.g. http://render1:8765/ "
                        "(default: this config's daemon)")
    submit.add_argument("--token", default=None,
                        help="the daemon's [web] token (default: this config's)")
    submit.add_argument("--json", action="store_true", help="machine-readable output")
    submit.set_defaults(handler=cmd_submit)

    backup = sub.add_parser("backup", help="copy the history database (safe while running)")
    _config_arg(backup)
    backup.add_argument("dest", type=Path, help="a file, or a folder for a dated copy")
    backup.set_defaults(handler=cmd_backup)

    for name, handler, text in (("status", cmd_status, "queue and daemon state"),
                                ("history", cmd_history, "jobs and their renders"),
                                ("models", cmd_models, "checkpoints the registry knows"),
                                ("loras", cmd_loras, "the LoRA library"),
                                ("embeddings", cmd_embeddings,
                                 "textual-inversion embeddings (embeddings/, UI trees)"),
                                ("stats", cmd_stats, "throughput, busy fraction, ETA"),
                                ("hosts", cmd_hosts, "the daemons sharing this database")):
        query = sub.add_parser(name, help=text)
        _config_arg(query)
        query.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "history":
            query.add_argument("--limit", type=int, default=50, help="newest N jobs (50)")
            query.add_argument("--tag", action="append", default=[], metavar="TAG",
                               help="only renders a post-processing tagger tagged TAG "
                                    "(repeat: all of them)")
            query.add_argument("--min-score", type=_min_score, default=None,
                               metavar="[NAME=]X",
                               help="only renders with a post-processing score >= X "
                                    "(any score, or the one called NAME)")
        if name in ("models", "loras"):
            query.add_argument("--scan", action="store_true",
                               help="look at the folders now (loads the family plugins) "
                                    "instead of reading the daemon's index")
        query.set_defaults(handler=handler)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorafarm")
    except PackageNotFoundError:  # run from a checkout that is not installed
        from daemon import __version__

        return __version__


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                        help="config file (./config.toml)")


def cmd_submit(args: argparse.Namespace) -> int:
    from daemon.web.submit import submit_files

    return submit_files(load_config(args.config), args.files, args.url, args.token, args.json)


# -- run / demo ---------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    live = sys.stderr.isatty() and not args.log_json and not args.no_live
    return run_daemon(load_config(args.config), until_idle=args.until_idle, live=live,
                      name=args.name)


def run_daemon(config: Config, *, until_idle: bool, live: bool = False,
               name: str | None = None) -> int:
    from daemon.runtime.runner import Daemon, DaemonLockedError

    display = None
    try:
        daemon = Daemon(config, name=name)
        if live:
            from daemon.runtime.console import LiveDisplay

            display = LiveDisplay(daemon.store)
            display.start()
        return daemon.run(until_idle=until_idle, install_signals=True)
    except DaemonLockedError as exc:
        print(f"lorafarm: {exc}", file=sys.stderr)
        return 3
    finally:
        if display is not None:
            display.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.cli.demo import write_demo
    from daemon.contract.loader import Plugins
    from daemon.runtime.console import quiet_libraries

    quiet_libraries()
    plugins = Plugins()
    config_path = write_demo(args.dir, plugins)
    print(f"demo written: {config_path}")
    if args.no_run:
        print(f"run it with: lorafarm run --config {config_path} --until-idle")
        return 0
    config = load_config(config_path)
    code = run_daemon(config, until_idle=True)
    _print_history(config, as_json=False, limit=20)
    print(f"\noutputs: {config.paths.outputs}")
    return code


# -- queries ------------------------------------------------------------------------------

def _reader(config: Config):  # type: ignore[no-untyped-def]
    from daemon.store.models import Store

    url = config.database_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return None
    return Store(url, writer=False)


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.store.queries import state_counts
    from daemon.store.state_lock import daemon_pid
    from daemon.web.address import page_answers, status_url

    config = load_config(args.config)
    store = _reader(config)
    renders: dict[str, int] = {}
    jobs: dict[str, int] = {}
    if store is not None:
        with store.session() as session:
            renders, jobs = state_counts(session)
        store.dispose()
    pid = daemon_pid(config.paths.state)
    # The page exists only while a daemon serves it: name it then, and say whether it answers.
    page = status_url(config) if config.web.enabled and pid is not None else None
    serving = page is not None and page_answers(page)
    status = {"daemon": {"running": pid is not None, "pid": pid}, "page": page,
              "page_answers": serving, "config": str(config.source), "jobs": jobs,
              "renders": renders}
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if pid is None:
        print(f"daemon:  not running (no daemon holds {config.paths.state})")
    else:
        print(f"daemon:  running (pid {pid})")
    if page is not None:
        print(f"page:    {page}" + ("" if serving else "  (not answering)"))
    print(f"jobs:    {_counts(jobs)}")
    print(f"renders: {_counts(renders)}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    _print_history(load_config(args.config), as_json=args.json, limit=args.limit,
                   tags=tuple(args.tag), min_score=args.min_score)
    return 0


def _min_score(text: str) -> tuple[str | None, float]:
    name, _, number = text.rpartition("=")
    try:
        return (name or None), float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a score: use a number (0.5) or NAME=number (aesthetic=0.5)"
        ) from None


def history_records(config: Config, limit: int = 50, *, tags: tuple[str, ...] = (),
                    min_score: tuple[str | None, float] | None = None) -> list[dict[str, Any]]:
    """`lorafarm history --json`'s records (see daemon.store.queries.history_records); an empty
    list before the first daemon has created the database."""
    from daemon.store.queries import history_records as query

    store = _reader(config)
    if store is None:
        return []
    try:
        with store.session() as session:
            return query(session, limit, tags=tags, min_score=min_score)
    finally:
        store.dispose()


def _print_history(config: Config, *, as_json: bool, limit: int, tags: tuple[str, ...] = (),
                   min_score: tuple[str | None, float] | None = None) -> None:
    records = history_records(config, limit, tags=tags, min_score=min_score)
    if as_json:
        print(json.dumps(records, indent=2))
        return
    if not records:
        print("no jobs yet")
        return
    rows: list[list[object]] = []
    for job in records:
        rows.append([f"job {job['id']}", job["state"], "", job["file"]])
        if job["error"]:
            rows += [["", "", "", line] for line in job["error"].splitlines()]
        for r in job["renders"]:
            rows.append([f"  #{r['index']}", r["state"], r["seed"],
                         r["output"] or r["error"] or ""])
            if r["scores"] or r["tags"] or r["flagged"]:
                found = [f"{k} {v:.3f}" for k, v in r["scores"].items()] + list(r["tags"])
                mark = "  [reseeded]" if r["reseeded"] else "  [flagged]" if r["flagged"] \
                    else ""
                rows.append(["", "", "", f"{', '.join(found)}{mark}"])
    print(format_table(["JOB", "STATE", "SEED", "OUTPUT / ERROR"], rows))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows under their headers, each column as wide as its widest cell (the last column is
    not padded, so long paths do not push the others out of line)."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row]
                                          for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def inventory_host() -> str:
    """The name this machine's model and LoRA index is kept under: what a daemon started
    without --name files it under (Daemon.inventory_host), so the CLI reads, and scans into,
    the daemon's own index."""
    import socket

    return socket.gethostname()


def _from_index_note(verb: str, pending_hashes: int = 0) -> None:
    """Say where a table came from (stderr: stdout stays the table)."""
    pending = (f"; {pending_hashes} hash(es) not computed yet (the daemon hashes in the "
               "background; --scan waits for them)" if pending_hashes else "")
    print(f"lorafarm: as of the daemon's last scan{pending}; `lorafarm {verb} --scan` looks "
          "at the folders now", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    """Checkpoints: from the index the daemon keeps (no plugin is loaded, nothing is hashed);
    scanned here, as the daemon does, with --scan or while the index is empty or was written
    by a lorafarm that did not record everything listed."""
    config = load_config(args.config)
    host = inventory_host()
    rows = [] if getattr(args, "scan", False) else _indexed_model_rows(config, host)
    from_index = bool(rows)
    if not rows:
        rows = _scanned_model_rows(config, host)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints in {', '.join(str(p) for p in config.paths.checkpoint_folders)}")
        return 0
    table: list[list[object]] = []
    for row in rows:
        table.append([row["name"], row["family"] or "?", row["state"], row["hash"],
                      row["quantization"], row["file"]])
        notes = ([f"transformer_2: {row['transformer_2']}"] if row["transformer_2"] else [])
        notes += [f"{key}: {path}" for key, path in row["components"].items()]
        notes += [row["reason"]] if row["state"] != "ok" and row["reason"] else []
        table += [["", "", "", "", "", f"  {note}"] for note in notes]
    print(format_table(["NAME", "FAMILY", "STATE", "HASH", "QUANTIZED", "FILE"], table))
    if from_index:
        _from_index_note("models", sum(1 for row in rows
                                       if row["state"] == "ok" and row["hash"] is None))
    return 0


def _model_row(info: Any, model_hash: str | None, parts: dict[str, str]) -> dict[str, Any]:
    """One checkpoint as `lorafarm models --json` lists it."""
    return {"name": info.name, "family": info.family, "lineage": info.lineage,
            "quantization": info.quantization,
            "transformer_2": str(info.transformer_2) if info.transformer_2 else None,
            "components": dict(sorted(parts.items())),
            "kind": info.kind, "file": str(info.path), "hash": model_hash,
            "state": info.state, "reason": info.reason}


def _indexed_model_rows(config: Config, host: str) -> list[dict[str, Any]]:
    """The checkpoints of the daemon's index (hashes it has not finished are null)."""
    from daemon.library.registry import indexed_checkpoints

    store = _reader(config)
    if store is None:
        return []
    try:
        found = indexed_checkpoints(store, host)
    finally:
        store.dispose()
    return [_model_row(info, info.model_hash, parts) for info, parts in found]


def _scanned_model_rows(config: Config, host: str) -> list[dict[str, Any]]:
    """Scan the model folders into the index, as the daemon does, and hash what is new."""
    from daemon.contract.loader import Plugins
    from daemon.library.registry import Registry
    from daemon.runtime.console import quiet_libraries
    from daemon.store.models import Store

    config.ensure_folders()
    quiet_libraries()  # the family plugins bring diffusers in: recognising needs them
    # Scanning writes the index: use a writer store (the daemon may be running; SQLite's
    # busy timeout makes the two take turns).
    store = Store.for_url(config.database_url)
    store.migrate()
    plugins = Plugins(config.plugins)
    registry = Registry(config, store, plugins, host=host)
    rows = []
    try:
        for info in registry.scan():
            model_hash = (registry.model_hash(info.name, wait=True) if info.state == "ok"
                          else None)
            family = plugins.families.get(info.family) if info.family else None
            # The files its parts load from instead of the config folder: named, or paired
            # from the UI trees (what the daemon will assemble).
            parts = (family.component_sources(info.loaded())
                     if family is not None and info.state == "ok" else {})
            rows.append(_model_row(info, model_hash,
                                   {key: str(path) for key, path in parts.items()}))
    finally:
        registry.close()
        store.dispose()
    return rows


def cmd_hosts(args: argparse.Namespace) -> int:
    from daemon.queue.hosts import host_records

    config = load_config(args.config)
    store = _reader(config)
    records = host_records(store, config) if store is not None else []
    if store is not None:
        store.dispose()
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no hosts yet")
        return 0
    rows = [[host["name"], host["state"], host["last_heartbeat"], host["current_batch"],
             ", ".join(sorted({c for names in host["loaded"].values() for c in names})) or "-"]
            for host in records]
    print(format_table(["HOST", "STATE", "HEARTBEAT", "BATCH", "LOADED"], rows))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:

    config = load_config(args.config)
    store = _reader(config)
    if store is None:
        print(f"lorafarm: no database at {config.paths.database} yet", file=sys.stderr)
        return 1
    path = store.backup(args.dest)
    store.dispose()
    print(f"backup written: {path}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from daemon.store.queries import stats

    config = load_config(args.config)
    store = _reader(config)
    if store is None:
        print("no history yet" if not args.json else "{}")
        return 0
    figures = stats(store)
    store.dispose()
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(format_table(["FIGURE", "VALUE"],
                       [[key.replace("_", " "), value] for key, value in figures.items()]))
    return 0


def cmd_loras(args: argparse.Namespace) -> int:
    """The LoRA library: from the index the daemon keeps (no plugin is loaded); scanned here,
    as the daemon does, with --scan or while no daemon has indexed this host."""
    config = load_config(args.config)
    host = inventory_host()
    infos = [] if getattr(args, "scan", False) else _indexed_loras(config, host)
    # The daemon indexes checkpoints and LoRAs in one start-up scan: with checkpoints indexed
    # and no LoRA row, the library is empty (no need to load the plugins to say so).
    from_index = bool(infos) or (not getattr(args, "scan", False)
                                 and bool(_indexed_model_rows(config, host)))
    if not from_index:
        infos = _scanned_loras(config, host)
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    if not infos:
        print(f"no LoRAs in {config.paths.loras}")
        return 0
    rows: list[list[object]] = []
    for info in infos:
        rows.append([info.name, info.family or "?", info.lineage or "?", info.layout or "?",
                     info.rank, info.autov3, info.state])
        notes = [info.reason if info.state != "ok" else info.lineage_source]
        notes += [f"triggers: {', '.join(info.triggers)}"] if info.triggers else []
        rows += [["", "", "", "", "", "", f"  {note}"] for note in notes if note]
    print(format_table(["NAME", "FAMILY", "LINEAGE", "LAYOUT", "RANK", "AUTOV3", "STATE"], rows))
    if from_index:
        _from_index_note("loras")
    return 0


def _indexed_loras(config: Config, host: str) -> list[Any]:
    from daemon.library.loras import indexed_loras

    store = _reader(config)
    if store is None:
        return []
    try:
        return indexed_loras(store, [host])
    finally:
        store.dispose()


def _scanned_loras(config: Config, host: str) -> list[Any]:
    from daemon.contract.loader import Plugins
    from daemon.library.loras import LoraLibrary
    from daemon.runtime.console import quiet_libraries
    from daemon.store.models import Store

    config.ensure_folders()
    quiet_libraries()  # the family plugins bring diffusers in: recognising needs them
    store = Store.for_url(config.database_url)
    store.migrate()
    try:
        return LoraLibrary(config, store, Plugins(config.plugins), host=host).scan()
    finally:
        store.dispose()


def cmd_embeddings(args: argparse.Namespace) -> int:
    from daemon.contract.loader import Plugins
    from daemon.library.embeddings import EmbeddingLibrary

    config = load_config(args.config)
    infos = EmbeddingLibrary(config, Plugins(config.plugins)).scan()
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    if not infos:
        print("no embeddings in " + ", ".join(str(p) for p in config.paths.embedding_folders))
    for info in infos:
        print(f"{info.name:<28} {info.architecture or '?':<8} {info.vectors or '?':<3} "
              f"{info.autov2 or '-':<11} {info.state}")
        print(f"{'':<28} {info.path}" + (f"\n{'':<28} {info.reason}" if info.state != "ok"
                                         else ""))
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
