"""`lorafarm plugins [--json]`: every plugin loaded (distribution, version, module, what it
provides) and every plugin skipped, with the reason."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from daemon.config import load_config

# Same default as daemon.cli.main; not imported from there because main imports this module.
DEFAULT_CONFIG = "config.toml"


def add_plugins_command(subparsers: Any) -> None:
    text = "list the plugins loaded (families, job formats, hooks) and those skipped, and why"
    parser = subparsers.add_parser("plugins", help=text, description=text)
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                        help="config file (./config.toml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=cmd_plugins)


def cmd_plugins(args: argparse.Namespace) -> int:
    """Exit code 0, or 1 when a plugin was skipped (so a setup script can notice)."""
    from daemon.contract.loader import Plugins

    config = load_config(args.config)
    report = Plugins(config.plugins).report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 1 if report["skipped"] else 0


def format_report(report: dict[str, Any]) -> str:
    lines = [f"loaded ({len(report['loaded'])}):"]
    for plugin in report["loaded"]:
        origin = (f"{plugin['distribution']} {plugin['version'] or ''}".strip()
                  if plugin["distribution"] else plugin["source"])
        lines.append(f"  {plugin['name']:<20} {origin:<20} {plugin['module']}")
        provides = [f"{what}: {', '.join(plugin[key])}" for what, key in (
            ("families", "families"), ("job formats", "job_formats"), ("hooks", "hooks"))
            if plugin[key]]
        lines.append(f"  {'':<20} {'; '.join(provides) or 'provides nothing'}")
        lines += [f"  {'':<20} problem: {problem}" for problem in plugin["problems"]]
    lines.append(f"skipped ({len(report['skipped'])}):")
    for plugin in report["skipped"]:
        origin = (f"distribution {plugin['distribution']} {plugin['version'] or ''}".strip()
                  + ", " if plugin["distribution"] else "")
        lines.append(f"  {plugin['name']:<20} {origin}{plugin['source']}")
        lines.append(f"  {'':<20} {plugin['reason']}")
    if not report["skipped"]:
        lines.append("  none")
    return "\n".join(lines)
