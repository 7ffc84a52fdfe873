"""The plugin manager: loads built-in and third-party plugins from the `lorafarm` entry-point
group, plus modules named in config.toml, and collects what they register.

Each plugin is loaded on its own: one that fails to import, raises while registering, builds
a family that cannot be instantiated or registers a name another plugin already took is
skipped with one log line naming its distribution, its entry point and the reason, and the
others run. Hook calls made while the daemon runs (output metadata, post-processing, events)
call each plugin separately too, so one plugin's exception costs only its own contribution.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pluggy

from daemon import hookimpl  # noqa: F401  (re-exported for plugins)
from daemon.contract import hookspecs
from daemon.contract.family import Family
from daemon.contract.faults import PLUGIN_ERRORS, FaultLog, describe_fault, fault_key
from daemon.contract.results import PostProcessResult, merge_results

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lorafarm"
OWN_DISTRIBUTION = "lorafarm"
PROBE_FAULT = "'s probe raised"  # in a file's reason when a family's probe raised on it
HOOK_NAMES = tuple(sorted(name for name in dir(hookspecs)
                          if hasattr(getattr(hookspecs, name), "lorafarm_spec")))


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


@dataclass
class PluginInfo:
    """A loaded plugin and what it provides (`lorafarm plugins`)."""

    name: str
    module: str
    source: str  # "entry point lorafarm:NAME = MODULE" or "config.toml plugins"
    distribution: str | None = None
    version: str | None = None
    families: list[str] = field(default_factory=list)
    job_formats: list[str] = field(default_factory=list)  # suffixes
    hooks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # e.g. misspelled hooks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SkippedPlugin:
    """A plugin that was not loaded, and why."""

    name: str
    module: str
    source: str
    reason: str
    distribution: str | None = None
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Candidate:
    name: str
    module: str
    source: str
    distribution: str | None
    version: str | None
    load: Callable[[], Any]

    @property
    def label(self) -> str:
        dist = (f"{self.distribution} {self.version}" if self.version else self.distribution)
        return f"plugin {self.name!r} ({f'distribution {dist}, ' if dist else ''}{self.source})"


class _Skip(Exception):
    """Why a plugin is not loaded (the message is the reason)."""


class Plugins:
    """The loaded plugins and what they registered: families and job-file parsers."""

    def __init__(self, extra_modules: Iterable[str] = (), *, entry_points: bool = True) -> None:
        self.manager = pluggy.PluginManager("lorafarm")
        self.manager.add_hookspecs(hookspecs)
        self.loaded: list[PluginInfo] = []
        self.skipped: list[SkippedPlugin] = []
        self.families: dict[str, Family] = {}
        self.family_plugins: dict[str, str] = {}  # family name -> plugin name
        self.job_parsers: dict[str, Callable[[Any], dict[str, Any]]] = {}
        self.parser_plugins: dict[str, str] = {}  # suffix -> plugin name
        self.binary_parsers: set[str] = set()  # suffixes whose parser takes bytes
        self.faults = FaultLog()
        candidates = _entry_point_candidates() if entry_points else []
        candidates += [_Candidate(name, name, "config.toml `plugins`", None, None,
                                  lambda name=name: importlib.import_module(name))
                       for name in extra_modules]
        for candidate in candidates:
            self._load(candidate)

    # -- loading ---------------------------------------------------------------------------

    def _load(self, candidate: _Candidate) -> None:
        if self.manager.has_plugin(candidate.name) or any(
                p.name == candidate.name for p in self.skipped):
            return  # the same entry point seen twice on sys.path: the first one counts
        try:
            try:
                module = candidate.load()
            except PLUGIN_ERRORS as exc:
                raise _Skip(f"importing {candidate.module} failed: "
                            f"{describe_fault(exc, None)}") from exc
            if self.manager.is_registered(module):
                return  # an entry point module also named in config.toml
            try:
                self.manager.register(module, name=candidate.name)
            except Exception as exc:  # PluginValidationError: a hook with wrong arguments
                raise _Skip(f"its hooks do not match lorafarm's: {exc}") from exc
            try:
                info = self._collect(candidate, module)
            except _Skip:
                self.manager.unregister(module)
                raise
        except _Skip as skip:
            reason = str(skip)
            self.skipped.append(SkippedPlugin(
                name=candidate.name, module=candidate.module, source=candidate.source,
                reason=reason, distribution=candidate.distribution, version=candidate.version))
            log.error("skipped %s: %s; everything else runs", candidate.label, reason)
            return
        for family in info.families:
            self.family_plugins[family] = info.name
        self.loaded.append(info)

    def _collect(self, candidate: _Candidate, module: Any) -> PluginInfo:
        """Call the plugin's registration hooks and check what it registers; raises _Skip."""
        info = PluginInfo(name=candidate.name, module=getattr(module, "__name__", candidate.module),
                          source=candidate.source, distribution=candidate.distribution,
                          version=candidate.version)
        info.hooks = sorted(caller.name for caller in self.manager.get_hookcallers(module) or []
                            if caller.has_spec())
        for caller in self.manager.get_hookcallers(module) or []:
            if caller.has_spec():
                continue
            close = difflib.get_close_matches(caller.name, HOOK_NAMES, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else f"lorafarm's hooks: {HOOK_NAMES}"
            problem = (f"hook `{caller.name}` is not a lorafarm hook and is never called "
                       f"({hint})")
            info.problems.append(problem)
            log.warning("%s: %s", candidate.label, problem)
        families: list[Family] = []
        parsers: list[tuple[str, Callable[[Any], dict[str, Any]], bool]] = []

        def register_family(family: Family) -> None:
            families.append(family)

        def register_parser(suffix: str, parse: Callable[[Any], dict[str, Any]],
                            binary: bool = False) -> None:
            parsers.append((suffix, parse, binary))

        for hook, register in (("register_families", register_family),
                               ("register_job_parsers", register_parser)):
            for impl in self._impls(hook, module):
                try:
                    _call(impl, register=register)
                except PLUGIN_ERRORS as exc:
                    raise _Skip(f"its `{hook}` hook raised {describe_fault(exc, module)}") from exc
        for family in families:
            if not isinstance(family, Family):
                raise _Skip(f"registered {type(family).__name__} as a family; register an "
                            "instance of a daemon.family.Family subclass")
            name = getattr(family, "name", None)
            if not isinstance(name, str) or not name:
                raise _Skip(f"family {type(family).__name__} has no `name`")
            if name in self.families or [f.name for f in families].count(name) > 1:
                owner = self.family_plugins.get(name, candidate.name)
                raise _Skip(f"it registers a family named {name!r}, which plugin {owner!r} "
                            "already registers; family names must be unique (rename it)")
        for suffix, parse, _ in parsers:
            if not isinstance(suffix, str) or not suffix.startswith(".") or not callable(parse):
                raise _Skip(f"register_job_parsers got ({suffix!r}, {parse!r}); it takes a "
                            "suffix such as \".toml\" and a function")
            if suffix.lower() in self.job_parsers:
                raise _Skip(f"it registers a parser for {suffix.lower()}, which plugin "
                            f"{self.parser_plugins[suffix.lower()]!r} already reads")
        for family in families:
            self.families[family.name] = family
            info.families.append(family.name)
        for suffix, parse, binary in parsers:
            self.job_parsers[suffix.lower()] = parse
            self.parser_plugins[suffix.lower()] = candidate.name
            if binary:
                self.binary_parsers.add(suffix.lower())
            info.job_formats.append(suffix.lower())
        return info

    def _impls(self, hook: str, plugin: Any = None) -> list[Any]:
        """The hook's implementations in pluggy's call order (last registered first), or
        only `plugin`'s."""
        impls = list(reversed(getattr(self.manager.hook, hook).get_hookimpls()))
        # Wrappers (none of lorafarm's hooks uses them) cannot be called on their own.
        return [i for i in impls if (plugin is None or i.plugin is plugin)
                and not (i.hookwrapper or i.wrapper)]

    def _each(self, hook: str, **kwargs: Any) -> Iterator[tuple[Any, Any, BaseException | None]]:
        """Call every plugin's implementation of `hook` separately: (impl, result, error)."""
        for impl in self._impls(hook):
            try:
                yield impl, _call(impl, **kwargs), None
            except PLUGIN_ERRORS as exc:
                yield impl, None, exc

    def _fault(self, hook: str, impl: Any, exc: BaseException,
               on_fault: Callable[[str, str], None] | None, what: str) -> str:
        reason = (f"plugin {impl.plugin_name!r} raised in `{hook}`: "
                  f"{describe_fault(exc, impl.plugin)}; {what}")
        self.faults.exception(fault_key(exc, hook, impl.plugin_name), reason, exc)
        if on_fault is not None:
            on_fault(impl.plugin_name, reason)
        return reason

    # -- queries ---------------------------------------------------------------------------

    def family(self, name: str) -> Family:
        return self.families[name]

    def plugin_of_family(self, name: str) -> str | None:
        return self.family_plugins.get(name)

    def plugin_of_parser(self, suffix: str) -> str | None:
        return self.parser_plugins.get(suffix.lower())

    def probe_fault(self, family: Family, path: Any, exc: BaseException) -> str:
        """The reason shown for a file whose probe by `family` raised; the traceback is logged
        once per file and plugin, not at every rescan."""
        plugin = self.plugin_of_family(family.name)
        reason = (f"family {family.name}{PROBE_FAULT} {describe_fault(exc, family)} (a bug in "
                  f"that plugin, {plugin!r}; the file itself may be fine)")
        self.faults.exception(("probe", family.name, str(path)),
                              f"probing {path}: {reason}", exc)
        return reason

    def report(self) -> dict[str, Any]:
        """What `lorafarm plugins --json` and the status page show."""
        return {"loaded": [p.to_dict() for p in self.loaded],
                "skipped": [p.to_dict() for p in self.skipped]}

    # -- hooks while running ---------------------------------------------------------------

    def output_metadata(self, spec: Any, family: Family,
                        on_fault: Callable[[str, str], None] | None = None) -> dict[str, str]:
        """Every plugin's metadata entries, merged; a plugin that raises or returns something
        else than text entries is left out (`on_fault(plugin, reason)` is told)."""
        merged: dict[str, str] = {}
        for impl, entries, error in self._each("output_metadata", spec=spec, family=family):
            if error is not None:
                self._fault("output_metadata", impl, error, on_fault,
                            "the output is written without its entries")
                continue
            if entries is None:
                continue
            if not isinstance(entries, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
                reason = (f"plugin {impl.plugin_name!r}: `output_metadata` returned "
                          f"{type(entries).__name__}, not a dict of text entries; the output "
                          "is written without them")
                if self.faults.first(("output_metadata", impl.plugin_name, "type")):
                    log.error("%s", reason)
                if on_fault is not None:
                    on_fault(impl.plugin_name, reason)
                continue
            merged.update(entries)
        return merged

    def post_process(self, spec: Any, image: Any, path: Any, steps: tuple[Any, ...],
                     on_fault: Callable[[str, str], None] | None = None) -> PostProcessResult:
        """Every plugin's `post_process` result for one image, merged (see merge_results); a
        plugin that raises or returns something else is left out."""
        results = []
        for impl, result, error in self._each("post_process", spec=spec, image=image,
                                              path=path, steps=steps):
            if error is not None:
                self._fault("post_process", impl, error, on_fault,
                            "the image is written without its post-processing")
            elif result is not None and not isinstance(result, PostProcessResult):
                reason = (f"plugin {impl.plugin_name!r}: `post_process` returned "
                          f"{type(result).__name__}, not a PostProcessResult; ignored")
                if self.faults.first(("post_process", impl.plugin_name, "type")):
                    log.error("%s", reason)
                if on_fault is not None:
                    on_fault(impl.plugin_name, reason)
            else:
                results.append(result)
        return merge_results(results)

    def notify(self, kind: str, message: str, data: dict[str, Any]) -> None:
        """Tell every `on_event` plugin; a notification plugin never takes the daemon down,
        and one that fails on every event is logged once."""
        for impl, _, error in self._each("on_event", kind=kind, message=message, data=data):
            if error is not None:
                self._fault("on_event", impl, error, None, "the event is not passed on to it")


def _call(impl: Any, **kwargs: Any) -> Any:
    """Call one hook implementation the way pluggy does: with the arguments it names."""
    return impl.function(*[kwargs[name] for name in impl.argnames])


def _entry_point_candidates() -> list[_Candidate]:
    """The `lorafarm` entry points, lorafarm's own first (so that a third-party plugin that
    takes a built-in name is the one skipped)."""
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        found.append(_Candidate(
            name=ep.name, module=ep.value, source=f"entry point {ENTRY_POINT_GROUP}:{ep.name} = "
            f"{ep.value}", distribution=dist_name,
            version=dist.version if dist is not None else None, load=ep.load))
    found.sort(key=lambda c: (c.distribution or "").lower() != OWN_DISTRIBUTION)
    return found

