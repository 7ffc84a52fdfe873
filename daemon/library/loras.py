"""The LoRA library: every file under loras/, known before any job names it.

For each file only the safetensors header is read: layout, rank, alpha, triggers, training
checkpoint, and which family (asked of every family plugin) and lineage it is for. Files that
cannot be loaded safely are quarantined with the reason and never loaded: pickles (`.ckpt`,
`.pt`, `.bin`, ...), truncated files, headers that are not JSON or absurdly long, and keys
no family recognises. A LoRA's identity is its content hash, so a renamed file keeps its
history; a deleted one is marked missing.

The user overrides what the header suggests with a sidecar `NAME.toml` beside the file or a
`[loras.NAME]` table in config.toml (keys: family, lineage, trigger_words). A1111's own
sidecar `NAME.json` is read too: its "activation text" is the LoRA's trigger words (unless
NAME.toml sets trigger_words), its "preferred weight" the strength a job gets that names the
LoRA without one.
"""

from __future__ import annotations

import difflib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from daemon.config import Config
from daemon.contract.family import LoraProbe
from daemon.contract.faults import PLUGIN_ERRORS
from daemon.formats.lora_probe import civitai_hashes, probe_lora_file
from daemon.formats.safetensors_header import SafetensorsError, read_header
from daemon.library.registry import live_hosts, lock_inventory
from daemon.library.sidecars import a1111_sidecar, lora_sidecar_path, read_lora_sidecar
from daemon.store.models import Lora, Store, add_event, utcnow

if TYPE_CHECKING:  # only the scan asks the plugins; reading the index (`lorafarm loras`)
    # must not import them
    from daemon.contract.loader import Plugins

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")
OK, QUARANTINED, MISSING = "ok", "quarantined", "missing"


class LoraLookupError(LookupError):
    """A job names a LoRA that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class LoraInfo:
    name: str
    path: Path
    state: str
    reason: str | None
    layout: str | None
    family: str | None
    architecture: str | None
    lineage: str | None
    lineage_source: str | None
    variant: str | None
    expert: str | None
    rank: int | None
    alpha: float | None
    triggers: list[str]
    base_model: str | None
    base_model_hash: str | None
    sha256: str | None
    autov2: str | None
    autov3: str | None

    def as_dict(self) -> dict[str, object]:
        data = dict(self.__dict__)
        data["path"] = str(self.path)
        return data


@dataclass(frozen=True)
class _Recognition:
    state: str
    reason: str | None
    layout: str | None = None
    family: str | None = None
    architecture: str | None = None
    lineage: str | None = None
    lineage_source: str | None = None
    variant: str | None = None
    expert: str | None = None
    rank: int | None = None
    alpha: float | None = None
    triggers: tuple[str, ...] = ()
    base_model: str | None = None
    base_model_hash: str | None = None
    data_offset: int | None = None


class LoraLibrary:
    def __init__(self, config: Config, store: Store, plugins: Plugins,
                 host: str = "local") -> None:
        self.config = config
        self.store = store
        self.plugins = plugins
        self.root = config.paths.loras
        self.host = host  # the daemon whose loras/ folder this index describes
        # The main thread (waiting to be idle) and the intake loop both scan: one at a time,
        # or both insert a new file's row.
        self._scan_lock = threading.Lock()

    # -- scanning --------------------------------------------------------------------------

    def scan(self) -> list[LoraInfo]:
        """Bring the library in line with the folder; returns every known LoRA."""
        with self._scan_lock, self.store.session() as session:
            lock_inventory(self.store, session, "loras", self.host)
            files = self._candidate_files()
            rows = {row.path: row for row in session.scalars(
                select(Lora).where(Lora.host == self.host))}
            seen: set[str] = set()
            for path in files:
                key = str(path)
                seen.add(key)
                try:
                    stat = path.stat()
                    sidecar_mtime = sum(side.stat().st_mtime_ns for side in (
                        lora_sidecar_path(path), path.with_suffix(".json")) if side.exists())
                except OSError:
                    continue
                row = rows.get(key)
                # mtime of the sidecar is folded in: editing the sidecar re-recognises.
                mtime = stat.st_mtime_ns + sidecar_mtime
                unchanged = (row is not None and row.size_bytes == stat.st_size
                             and row.mtime_ns == mtime and row.state != MISSING)
                if unchanged:
                    continue
                found = self._recognise(path)
                digest = autov2 = autov3 = None
                if found.data_offset is not None:
                    digest, autov2, autov3 = civitai_hashes(path, found.data_offset)
                if row is None and digest is not None:
                    # Same content under a new name or folder: the same LoRA, moved.
                    moved = [r for r in rows.values() if r.sha256 == digest
                             and r.path not in seen and not Path(r.path).exists()]
                    if moved:
                        row = moved[0]
                        add_event(session, "lora_moved", f"{row.path} -> {path}")
                        rows.pop(row.path, None)
                if row is None:
                    row = Lora(path=key, host=self.host)
                    session.add(row)
                row.path, row.name = key, path.stem
                row.size_bytes, row.mtime_ns = stat.st_size, mtime
                row.sha256, row.autov2, row.autov3 = digest, autov2, autov3
                row.state, row.reason, row.layout = found.state, found.reason, found.layout
                row.family, row.architecture = found.family, found.architecture
                row.lineage, row.lineage_source = found.lineage, found.lineage_source
                row.variant, row.rank, row.alpha = found.variant, found.rank, found.alpha
                row.expert = found.expert
                row.triggers_json = json.dumps(list(found.triggers))
                row.base_model, row.base_model_hash = found.base_model, found.base_model_hash
                row.updated_at = utcnow()
                rows[key] = row
                add_event(session, "lora_indexed", f"{path.name}: {found.state}",
                          family=found.family, lineage=found.lineage, reason=found.reason)
            for key, row in rows.items():
                if key not in seen and row.state != MISSING and not Path(key).exists():
                    row.state, row.reason = MISSING, "the file is gone from loras/"
                    row.updated_at = utcnow()
                    add_event(session, "lora_missing", f"{row.name}: file is gone")
        return self.all()

    def _candidate_files(self) -> list[Path]:
        settle = self.config.intake.settle_seconds
        now = time.time()
        files = []
        # loras/ plus the LoRA folders of configured ComfyUI / A1111 trees (read in place).
        for root in self.config.paths.lora_folders:
            if root.is_dir():
                files += self._candidates_under(root, settle, now)
        return files

    def _candidates_under(self, root: Path, settle: float, now: float) -> list[Path]:
        files = []
        for path in sorted(root.rglob("*")):
            name = path.name
            if (not path.is_file() or name.startswith(".") or name.endswith(TEMP_SUFFIXES)
                    or any(part.startswith(".") for part in path.relative_to(root).parts)):
                continue
            suffix = path.suffix.lower()
            if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
                continue  # sidecars, previews, notes
            try:
                if now - path.stat().st_mtime < settle:
                    continue  # still being copied in: next scan
            except OSError:
                continue
            files.append(path)
        return files

    def _recognise(self, path: Path) -> _Recognition:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            return _Recognition(QUARANTINED, f"{path.suffix} files are Python pickles, which can "
                                "run code when loaded; lorafarm never loads them. Use the "
                                ".safetensors version of this LoRA")
        try:
            override = self._override(path)
        except ValueError as exc:
            return _Recognition(QUARANTINED, str(exc))
        try:
            header = read_header(path)
        except SafetensorsError as exc:
            return _Recognition(QUARANTINED, str(exc))
        facts = probe_lora_file(header)
        base = dict(layout=facts.layout, rank=facts.rank, alpha=facts.alpha,
                    triggers=tuple(override.get("trigger_words")
                                   or _activation_triggers(path) or facts.triggers),
                    base_model=facts.base_model, base_model_hash=facts.base_model_hash,
                    data_offset=header.data_offset)
        if facts.layout in ("lycoris-loha", "lycoris-lokr"):
            return _Recognition(QUARANTINED, f"LyCORIS ({facts.layout}) files are not supported "
                                "by the diffusers loader lorafarm uses; use a plain LoRA",
                                **base)
        probes: list[LoraProbe] = []
        probe_faults: list[str] = []
        for family in self.plugins.families.values():
            try:
                probe = family.probe_lora(header, facts)
            except PLUGIN_ERRORS as exc:  # one plugin's bug must not hide the others' answers
                probe_faults.append(self.plugins.probe_fault(family, path, exc))
                continue
            if probe is not None:
                probes.append(probe)
        family_name = override.get("family")
        if family_name:
            if family_name not in self.plugins.families:
                return _Recognition(QUARANTINED, f"family {family_name!r} set for this LoRA "
                                    "is not installed (installed: "
                                    f"{', '.join(sorted(self.plugins.families))})", **base)
            family = self.plugins.families[family_name]
            own = [p for p in probes if p.family == family_name]
            probe = own[0] if own else LoraProbe(family_name, family.architecture, 1.0,
                                                  "family set by the user")
        elif not probes and probe_faults:
            return _Recognition(QUARANTINED, "; ".join(probe_faults), **base)
        elif not probes:
            return _Recognition(QUARANTINED, f"no installed family recognises its keys (layout "
                                f"{facts.layout}); if it is for a known model, name the family "
                                f"in {lora_sidecar_path(path).name}: family = \"...\"", **base)
        else:
            probes.sort(key=lambda p: p.score, reverse=True)
            probe = probes[0]
            tied = [p.family for p in probes if p.score == probe.score
                    and p.architecture != probe.architecture]
            if tied:
                return _Recognition(QUARANTINED, "families tie for this LoRA ("
                                    f"{', '.join([probe.family, *tied])}); name one in "
                                    f"{lora_sidecar_path(path).name}", **base)
        lineage, source = probe.lineage, probe.lineage_source
        if override.get("lineage"):
            lineage, source = override["lineage"], override["lineage_from"]
        expert = override.get("expert") or probe.expert
        variant = override.get("variant") or probe.variant
        if expert is not None and expert not in ("high", "low", "both"):
            return _Recognition(QUARANTINED, f"expert {expert!r} must be high, low or both",
                                **base)
        return _Recognition(OK, probe.reason, family=probe.family, architecture=probe.architecture,
                            lineage=lineage, lineage_source=source, variant=variant,
                            expert=expert, **base)

    def _override(self, path: Path) -> dict[str, object]:
        """Sidecar NAME.toml beside the file, then config.toml [loras.NAME] on top."""
        values: dict[str, object] = {}
        sidecar = read_lora_sidecar(path)  # checked there: see daemon/library/sidecars.py
        if sidecar is not None:
            values.update(sidecar.values())
            if sidecar.lineage is not None:
                values["lineage_from"] = f"sidecar {sidecar.path.name}"
        override = self.config.loras.get(path.stem)
        if override is not None:
            for key in ("family", "lineage"):
                if getattr(override, key):
                    values[key] = getattr(override, key)
            if override.lineage:
                values["lineage_from"] = "config.toml [loras]"
        return values

    # -- queries ---------------------------------------------------------------------------

    def all(self, *, anywhere: bool = False) -> list[LoraInfo]:
        """This host's LoRAs; with `anywhere`, also those of the farm's other live hosts
        (intake accepts a job whose LoRA some host has; only that host renders it)."""
        hosts = [self.host]
        if anywhere:
            with self.store.session() as session:
                hosts += live_hosts(session, self.config)
        infos = indexed_loras(self.store, hosts)
        if anywhere:  # the same file on several hosts is one LoRA
            unique: dict[tuple[str, str | None], LoraInfo] = {}
            for info in infos:
                unique.setdefault((info.name, info.sha256 or str(info.path)), info)
            infos = list(unique.values())
        return infos

    def available_autov2(self) -> set[str]:
        """Content keys of the LoRAs this host can load (the claim checks them)."""
        return {info.autov2 for info in self.all() if info.state == OK and info.autov2}

    def pairs(self) -> dict[str, dict[str, LoraInfo]]:
        """HIGH/LOW pairs (Wan 2.2 experts): two files in one folder whose names differ only
        by the expert word, as the family's `lora_pair_name` rule says; name -> expert ->
        file. One pair is one LoRA to the user."""
        groups: dict[tuple[str, str], dict[str, LoraInfo]] = {}
        for info in self.all(anywhere=True):
            family = self.plugins.families.get(info.family or "")
            rule = getattr(family, "lora_pair_name", None)
            if info.state != OK or rule is None:
                continue
            paired = rule(info.name)
            if paired is not None:
                shared, expert = paired
                groups.setdefault((str(info.path.parent), shared), {})[expert] = info
        return {shared: members for (_, shared), members in groups.items()
                if set(members) == {"high", "low"}}

    def resolve_all(self, name: str) -> list[LoraInfo]:
        """The file(s) a job's LoRA name stands for: one file, or both files of a HIGH/LOW
        pair when `name` is the pair's shared name."""
        if not any(info.name == name for info in self.all(anywhere=True)):
            pair = self.pairs().get(name)
            if pair is not None:
                return [pair["high"], pair["low"]]
        return [self.resolve(name)]

    def find_by_hash(self, key: str) -> LoraInfo | None:
        """A usable LoRA whose AutoV3 (12 hex) or AutoV2 (10 hex) is `key`."""
        key = key.lower().strip()
        if len(key) < 10:
            return None
        for info in self.all(anywhere=True):
            if info.state == OK and key in (info.autov3, info.autov2):
                return info
        return None

    def resolve(self, name: str) -> LoraInfo:
        """The usable LoRA a job names, or LoraLookupError saying why not."""
        known = [info for info in self.all(anywhere=True)
                 if info.state != MISSING or info.name == name]
        matches = [info for info in known if info.name == name]
        if not matches:
            names = sorted({info.name for info in known if info.state == OK})
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                    else "`lorafarm loras` lists the library")
            raise LoraLookupError(f"LoRA {name!r} is not in the library ({self.root}); {hint}")
        usable = [info for info in matches if info.state == OK]
        if len(usable) > 1:
            places = ", ".join(str(info.path.relative_to(self.root))
                               if info.path.is_relative_to(self.root) else str(info.path)
                               for info in usable)
            raise LoraLookupError(f"LoRA name {name!r} is ambiguous: {places}; rename one file")
        if not usable:
            info = matches[0]
            raise LoraLookupError(f"LoRA {name!r} is {info.state}: {info.reason}")
        return usable[0]

    def path_for(self, autov2: str | None, name: str) -> Path | None:
        """Where a LoRA's file is now: by content first (it may have been renamed)."""
        for info in self.all():
            if info.state == OK and autov2 and info.autov2 == autov2:
                return info.path
        for info in self.all():
            if info.state == OK and info.name == name:
                return info.path
        return None


def indexed_loras(store: Store, hosts: list[str]) -> list[LoraInfo]:
    """The LoRAs of `hosts` as their last scans recorded them, by name, from the database
    alone (no plugin, no file is read: what `lorafarm loras` lists)."""
    with store.session() as session:
        rows = session.scalars(select(Lora).where(Lora.host.in_(hosts))
                               .order_by(Lora.name, Lora.path))
        return [_info(row) for row in rows]


def preferred_weight(path: Path) -> float | None:
    """The strength A1111 users set for a LoRA in its NAME.json; None when unset (0)."""
    weight = a1111_sidecar(path).get("preferred weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight == 0:
        return None
    return float(weight)


def _activation_triggers(path: Path) -> tuple[str, ...]:
    text = a1111_sidecar(path).get("activation text")
    return (text.strip(),) if isinstance(text, str) and text.strip() else ()


def _info(row: Lora) -> LoraInfo:
    return LoraInfo(name=row.name, path=Path(row.path), state=row.state, reason=row.reason,
                    layout=row.layout, family=row.family, architecture=row.architecture,
                    lineage=row.lineage, lineage_source=row.lineage_source, variant=row.variant,
                    expert=row.expert,
                    rank=row.rank, alpha=row.alpha, triggers=row.triggers,
                    base_model=row.base_model,
                    base_model_hash=row.base_model_hash, sha256=row.sha256, autov2=row.autov2,
                    autov3=row.autov3)
