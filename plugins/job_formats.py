"""Built-in job-file formats: TOML and JSON (registered like any third-party parser)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemon.plugin_api import hookimpl, parse_json, parse_toml


@hookimpl
def register_job_parsers(register: Callable[[str, Callable[[str], dict[str, Any]]], None]) -> None:
    register(".toml", parse_toml)
    register(".json", parse_json)
