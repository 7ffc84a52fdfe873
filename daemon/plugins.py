"""The plugin manager: loads built-in and third-party plugins from the `lorafarm` entry-point
group, plus modules named in config.toml, and collects what they register."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from daemon import hookimpl, hookspecs  # noqa: F401  (hookimpl re-exported for plugins)
from daemon.family import Family
from daemon.postprocess import PostProcessResult, merge_results

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lorafarm"


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


class Plugins:
    """The loaded plugins and what they registered: families and job-file parsers."""

    def __init__(self, extra_modules: Iterable[str] = (), *, entry_points: bool = True) -> None:
        self.manager = pluggy.PluginManager("lorafarm")
        self.manager.add_hookspecs(hookspecs)
        if entry_points:
            self.manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for name in extra_modules:
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise PluginError(
                    f"plugin module {name!r} (config.toml `plugins`) could not be imported: "
                    f"{exc}; install it or remove it from the list") from exc
            if not self.manager.is_registered(module):
                self.manager.register(module, name=name)
        self.families: dict[str, Family] = {}
        self.manager.hook.register_families(register=self._register_family)
        self.job_parsers: dict[str, Callable[[Any], dict[str, Any]]] = {}
        self.binary_parsers: set[str] = set()  # suffixes whose parser takes bytes
        self.manager.hook.register_job_parsers(register=self._register_parser)

    def _register_family(self, family: Family) -> None:
        if family.name in self.families:
            raise PluginError(f"two plugins register a family named {family.name!r}")
        self.families[family.name] = family

    def _register_parser(self, suffix: str, parse: Callable[[Any], dict[str, Any]],
                         binary: bool = False) -> None:
        self.job_parsers[suffix.lower()] = parse
        if binary:
            self.binary_parsers.add(suffix.lower())

    def family(self, name: str) -> Family:
        return self.families[name]

    def output_metadata(self, spec: Any, family: Family) -> dict[str, str]:
        merged: dict[str, str] = {}
        for entries in self.manager.hook.output_metadata(spec=spec, family=family):
            if entries:
                merged.update(entries)
        return merged

    def post_process(self, spec: Any, image: Any, path: Any,
                     steps: tuple[Any, ...]) -> PostProcessResult:
        """Every plugin's `post_process` result for one image, merged (see merge_results)."""
        return merge_results(self.manager.hook.post_process(spec=spec, image=image, path=path,
                                                            steps=steps))

    def notify(self, kind: str, message: str, data: dict[str, Any]) -> None:
        try:
            self.manager.hook.on_event(kind=kind, message=message, data=data)
        except Exception:  # a notification plugin must never take the daemon down
            log.exception("an on_event plugin raised; ignored")
