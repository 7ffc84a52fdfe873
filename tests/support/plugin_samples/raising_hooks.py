"""Output metadata, post-processing and event hooks that raise on every call."""

from __future__ import annotations

from typing import Any

from daemon import hookimpl


@hookimpl
def output_metadata(spec: Any, family: Any) -> dict[str, str]:
    return {"broken": spec.no_such_field}  # AttributeError: a bug


@hookimpl
def post_process(spec: Any, image: Any, path: Any, steps: Any) -> Any:
    raise RuntimeError("the upscaler model is missing")


@hookimpl
def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
    raise ConnectionError("the notification server is down")
