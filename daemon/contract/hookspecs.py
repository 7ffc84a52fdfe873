"""The lorafarm plugin hooks (pluggy project name "lorafarm").

Built-in families and plugins register through these hooks exactly like third-party ones:
each is a module listed in the `lorafarm` entry-point group (see pyproject.toml). A
third-party package adds its own entry point, e.g.

    [project.entry-points.lorafarm]
    my_family = "my_package.my_family"

and implements one or more of the hooks below with `@hookimpl`, imported, like everything
a plugin uses, from `daemon.plugin_api`. docs/writing-a-family.md is the guide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from PIL.Image import Image

    from daemon.config import PostprocessStep
    from daemon.contract.family import Family
    from daemon.contract.results import PostProcessResult
    from daemon.contract.spec import RenderSpec

hookspec = pluggy.HookspecMarker("lorafarm")


@hookspec
def register_families(register: Callable[[Family], None]) -> None:
    """Called once at start-up; call `register(family)` for each model family the plugin
    provides. Family names must be unique across all plugins."""


@hookspec
def register_job_parsers(register: Callable[..., None]) -> None:
    """Called once at start-up; call `register(suffix, parse)` for each job-file format, or
    `register(suffix, parse, binary=True)` for one read as bytes (images, videos).

    `suffix` is the file ending with its dot (".toml"); `parse(text)` (or `parse(raw)`)
    returns the job as a plain dict or raises `JobFileError` (plugin API; with a line
    number where known)."""


@hookspec
def output_metadata(spec: RenderSpec, family: Family) -> dict[str, str] | None:
    """Called for every output file before it is written; return text entries to embed
    (a PNG text chunk per key, e.g. {"parameters": "<A1111 infotext>"}), or None."""


@hookspec
def post_process(spec: RenderSpec, image: Image, path: Path,
                 steps: tuple[PostprocessStep, ...]) -> PostProcessResult | None:
    """Called for every finished image (not video) before its file is written, on the output
    writer's thread, with config.toml's `[[postprocess]]` chain (empty when none is set).
    Handle the steps the plugin understands, in order; return a `PostProcessResult` (a
    replacement image, scores, tags, a quality-gate verdict) or None. An exception is logged
    and the original image is written: post-processing never costs a render."""


@hookspec
def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
    """Called after the daemon records an event (job accepted, render done, render failed,
    job finished, ...). For notifications and metrics; must not raise or block for long."""
