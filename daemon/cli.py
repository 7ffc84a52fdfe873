"""The `lorafarm` command line.

    lorafarm run [--config FILE] [--until-idle]    the daemon, in the foreground
    lorafarm demo [--dir DIR] [--no-run]           tiny models + sample jobs, then run them
    lorafarm status | history | models | loras [--json]   read the history and libraries
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
    from daemon.console import configure_logging

    configure_logging(json_lines=getattr(args, "log_json", False),
                      verbose=getattr(args, "verbose", False))
    # The libraries log loudly about things that are expected here (e.g. no CUDA).
    quiet_libraries()
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"lorafarm: config error: {exc}", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """The libraries log loudly about what is expected here (no CUDA, no torchvision) and draw
    progress bars per component; the daemon reports progress itself."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # watchdog logs a harmless error when its inotify thread is stopped mid-read.
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafarm", description="LoRA render daemon")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    _config_arg(run)
    run.add_argument("--until-idle", action="store_true",
                     help="exit 0 once nothing is queued or running")
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument("--name", default=None,
                     help="this daemon's name in a farm (default: host name and process id)")
    run.add_argument("--log-json", action="store_true",
                     help="log lines as JSON objects (for journald, Loki, jq)")
    run.add_argument("--no-live", action="store_true",
                     help="no live progress display even on a terminal")
    run.set_defaults(handler=cmd_run)

    demo = sub.add_parser("demo", help="write tiny demo models and jobs, then render them")
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="demo folder (./demo)")
    demo.add_argument("--no-run", action="store_true", help="only write the files")
    demo.set_defaults(handler=cmd_demo)

    from daemon.cli_control import add_control_commands

    add_control_commands(sub)

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
        query.set_defaults(handler=handler)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                        help="config file (./config.toml)")


def cmd_submit(args: argparse.Namespace) -> int:
    from daemon.submit import submit_files

    return submit_files(load_config(args.config), args.files, args.url, args.token, args.json)


# -- run / demo ---------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    live = sys.stderr.isatty() and not args.log_json and not args.no_live
    return run_daemon(load_config(args.config), until_idle=args.until_idle, live=live,
                      name=args.name)


def run_daemon(config: Config, *, until_idle: bool, live: bool = False,
               name: str | None = None) -> int:
    from daemon.runner import Daemon, DaemonLockedError

    display = None
    try:
        daemon = Daemon(config, name=name)
        if live:
            from daemon.console import LiveDisplay

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
    from daemon.demo import write_demo
    from daemon.plugins import Plugins

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
    from daemon.store import Store

    url = config.database_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return None
    return Store(url, writer=False)


def cmd_status(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from daemon.runner import daemon_pid
    from daemon.store import Job, Render

    config = load_config(args.config)
    store = _reader(config)
    renders: dict[str, int] = {}
    jobs: dict[str, int] = {}
    if store is not None:
        with store.session() as session:
            renders = dict(session.execute(select(Render.state, func.count())
                                           .group_by(Render.state)).all())
            jobs = dict(session.execute(select(Job.state, func.count())
                                        .group_by(Job.state)).all())
    from daemon.web import status_url

    pid = daemon_pid(config)
    page = status_url(config) if config.web.enabled else None
    status = {"daemon": {"running": pid is not None, "pid": pid}, "page": page,
              "config": str(config.source), "jobs": jobs, "renders": renders}
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"daemon: {'running (pid ' + str(pid) + ')' if pid else 'not running'}")
        if page:
            print(f"page:    {page}")
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
    """The newest `limit` jobs with their renders; with `tags` / `min_score`, only renders
    whose post-processing results match (and only jobs that have such a render)."""
    from sqlalchemy import select

    from daemon.store import Job, Render, RenderScore

    store = _reader(config)
    if store is None:
        return []
    records = []
    with store.session() as session:
        matching = None
        keep: set[int] = set()
        if tags or min_score is not None:
            matching = select(Render.id)
            for tag in tags:
                matching = matching.where(Render.id.in_(select(RenderScore.render_id).where(
                    RenderScore.kind == "tag", RenderScore.name == tag)))
            if min_score is not None:
                name, least = min_score
                scored = select(RenderScore.render_id).where(RenderScore.kind == "score",
                                                             RenderScore.value >= least)
                if name is not None:
                    scored = scored.where(RenderScore.name == name)
                matching = matching.where(Render.id.in_(scored))
        jobs = select(Job).order_by(Job.id.desc()).limit(limit)
        if matching is not None:
            jobs = jobs.where(Job.id.in_(select(Render.job_id).where(Render.id.in_(matching))))
            keep = set(session.scalars(matching))
        for job in session.scalars(jobs):
            renders = [r for r in job.renders if matching is None or r.id in keep]
            results = _render_results(session, [r.id for r in renders])
            records.append({
                "id": job.id, "name": job.name, "file": job.file_name,
                "file_path": job.file_path, "state": job.state, "priority": job.priority,
                "error": job.error, "warnings": job.warnings,
                "created_at": job.created_at.isoformat(timespec="seconds") + "Z",
                "finished_at": (job.finished_at.isoformat(timespec="seconds") + "Z"
                                if job.finished_at else None),
                "job": json.loads(job.spec_json) if job.spec_json else None,
                "renders": [_render_record(r, results.get(r.id, [])) for r in renders],
            })
    store.dispose()
    return records


def _render_results(session: Any, render_ids: list[int]) -> dict[int, list[Any]]:
    from sqlalchemy import select

    from daemon.store import RenderScore

    rows: dict[int, list[Any]] = {}
    if render_ids:
        for row in session.scalars(select(RenderScore).where(
                RenderScore.render_id.in_(render_ids)).order_by(RenderScore.id)):
            rows.setdefault(row.render_id, []).append(row)
    return rows


def _render_record(render: Any, results: list[Any]) -> dict[str, Any]:
    spec = json.loads(render.spec_json)
    by_kind: dict[str, dict[str, float]] = {"score": {}, "tag": {}, "gate": {}}
    for row in results:
        by_kind.setdefault(row.kind, {})[row.name] = row.value
    gate = by_kind["gate"]
    return {"index": render.index, "seed": render.seed, "state": render.state,
            "attempts": render.attempts, "output": render.output_path, "error": render.error,
            "prompt": spec["prompt"], "loras": spec.get("loras", []),
            "lora_patches": json.loads(render.lora_report_json)
            if render.lora_report_json else None,
            "frames": render.frames, "fps": render.fps,
            "quantization": spec.get("extra", {}).get("quantization"),
            # Post-processing ([[postprocess]]): scorer numbers, tagger tags with their
            # confidence, and the quality gate's verdict.
            "scores": by_kind["score"], "tags": by_kind["tag"],
            "flagged": "flagged" in gate or "reseeded" in gate,
            "reseeded": "reseeded" in gate,
            "reseed_of": int(gate["reseed_of"]) if "reseed_of" in gate else None}


def _print_history(config: Config, *, as_json: bool, limit: int, tags: tuple[str, ...] = (),
                   min_score: tuple[str | None, float] | None = None) -> None:
    records = history_records(config, limit, tags=tags, min_score=min_score)
    if as_json:
        print(json.dumps(records, indent=2))
        return
    if not records:
        print("no jobs yet")
    for job in records:
        print(f"job {job['id']:>4}  {job['state']:<9} {job['file']}")
        if job["error"]:
            print("           " + job["error"].replace("\n", "\n           "))
        for r in job["renders"]:
            where = r["output"] or r["error"] or ""
            print(f"   #{r['index']:<3} seed {r['seed']:<11} {r['state']:<8} {where}")
            if r["scores"] or r["tags"] or r["flagged"]:
                found = [f"{k} {v:.3f}" for k, v in r["scores"].items()] + list(r["tags"])
                mark = "  [reseeded]" if r["reseeded"] else "  [flagged]" if r["flagged"] \
                    else ""
                print(f"        {', '.join(found)}{mark}")


def cmd_models(args: argparse.Namespace) -> int:
    from daemon.plugins import Plugins
    from daemon.registry import Registry
    from daemon.store import Store

    config = load_config(args.config)
    config.ensure_folders()
    # Scanning writes the index: use a writer store (the daemon may be running; SQLite's
    # busy timeout makes the two take turns).
    store = Store.for_url(config.database_url)
    store.migrate()
    plugins = Plugins(config.plugins)
    registry = Registry(config, store, plugins)
    infos = registry.scan()
    rows = []
    for info in infos:
        model_hash = registry.model_hash(info.name, wait=True) if info.state == "ok" else None
        family = plugins.families.get(info.family) if info.family else None
        # The files its parts load from instead of the config folder: named, or paired from
        # the UI trees (what the daemon will assemble).
        parts = (family.component_sources(info.loaded())
                 if family is not None and info.state == "ok" else {})
        rows.append({"name": info.name, "family": info.family, "lineage": info.lineage,
                     "quantization": info.quantization,
                     "transformer_2": str(info.transformer_2) if info.transformer_2 else None,
                     "components": {key: str(path) for key, path in sorted(parts.items())},
                     "kind": info.kind, "file": str(info.path), "hash": model_hash,
                     "state": info.state, "reason": info.reason})
    registry.close()
    store.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<32} {row['family'] or '?':<12} {row['hash'] or '-':<11} "
                  f"{row['state']:<13} {row['quantization'] or '-':<11} {row['file']}")
            if row["transformer_2"]:
                print(f"{'':<32} transformer_2: {row['transformer_2']}")
            for key, path in row["components"].items():
                print(f"{'':<32} {key}: {path}")
            if row["state"] != "ok":
                print(f"{'':<32} {row['reason']}")
    return 0


def cmd_hosts(args: argparse.Namespace) -> int:
    from daemon.hosts import host_records

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
    for host in records:
        loaded = sorted({c for names in host["loaded"].values() for c in names})
        print(f"{host['name']:<32} {host['state']:<20} heartbeat {host['last_heartbeat']}  "
              f"batch {host['current_batch'] or '-'}  loaded: {', '.join(loaded) or '-'}")
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
    from daemon.scheduler import stats

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
    for key, value in figures.items():
        print(f"{key.replace('_', ' '):<20} {value if value is not None else '-'}")
    return 0


def cmd_loras(args: argparse.Namespace) -> int:
    from daemon.lora_library import LoraLibrary
    from daemon.plugins import Plugins
    from daemon.store import Store

    config = load_config(args.config)
    config.ensure_folders()
    store = Store.for_url(config.database_url)
    store.migrate()
    infos = LoraLibrary(config, store, Plugins(config.plugins)).scan()
    store.dispose()
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    if not infos:
        print(f"no LoRAs in {config.paths.loras}")
    for info in infos:
        print(f"{info.name:<28} {info.family or '?':<10} {info.lineage or '?':<12} "
              f"{info.layout or '?':<10} r{info.rank or '?':<4} {info.autov3 or '-':<13} "
              f"{info.state}")
        if info.state != "ok" or info.lineage_source:
            print(f"{'':<28} {info.reason if info.state != 'ok' else info.lineage_source}")
        if info.triggers:
            print(f"{'':<28} triggers: {', '.join(info.triggers)}")
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
