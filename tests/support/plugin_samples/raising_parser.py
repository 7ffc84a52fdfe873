"""A job format whose parser has a bug: it raises KeyError instead of JobFileError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemon import hookimpl


def parse_yaml(text: str) -> dict[str, Any]:
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {"checkpoint": fields["model"], "prompt": fields["prompt"]}  # KeyError: a bug


@hookimpl
def register_job_parsers(register: Callable[..., None]) -> None:
    register(".yaml", parse_yaml)
