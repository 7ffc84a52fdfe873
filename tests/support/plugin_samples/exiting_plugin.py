"""A plugin whose every hook calls sys.exit(): a job parser, output metadata, post-processing
and events. In a daemon thread that is an exception like any other; it must cost only what
the plugin adds."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from daemon import hookimpl


def parse_yml(text: str) -> dict[str, Any]:
    sys.exit(2)


@hookimpl
def register_job_parsers(register: Callable[..., None]) -> None:
    register(".yml", parse_yml)


@hookimpl
def output_metadata(spec: Any, family: Any) -> dict[str, str]:
    sys.exit(3)


@hookimpl
def post_process(spec: Any, image: Any, path: Any, steps: Any) -> Any:
    sys.exit(4)


@hookimpl
def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
    sys.exit(5)
