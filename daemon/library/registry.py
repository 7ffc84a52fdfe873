"""The model registry: what checkpoints exist under models/, which family each belongs to,
and their A1111 model hashes.

A checkpoint is a diffusers folder (holding model_index.json), a single `.safetensors`
file, or a quantized `.gguf` transformer (with a base folder for the rest, and for Wan 2.2
A14B a second GGUF file for the low-noise expert: `transformer_2` in its sidecar or in
config.toml's [checkpoints.NAME]; text encoders and VAE may be files of their own too:
`text_encoder`, `text_encoder_2`, `vae`, see families/shared/components.py). Its family
comes from asking every family plugin about the header (no weights are loaded); config.toml
`[checkpoints.NAME] family = ...` overrides the answer. Hashing a 7 GB
file takes tens of seconds, so hashes are computed on a background thread and cached in the
database by (path, size, mtime); the render loop never waits for one except, at worst, when
writing the first output of a checkpoint whose hash is still being computed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from daemon.config import COMPONENT_KEYS, CheckpointOverride, Config
from daemon.contract.family import CheckpointProbe, CheckpointSource, LoadedCheckpoint
from daemon.contract.faults import PLUGIN_ERRORS
from daemon.formats.gguf_header import TEXT_ARCHITECTURES, GgufError, read_gguf_header
from daemon.formats.quantization import checkpoint_quantization
from daemon.formats.safetensors_header import SafetensorsError, read_header, sha256_file
from daemon.library.sidecars import read_checkpoint_sidecar
from daemon.presets import PRESET_KEYS
from daemon.store.models import Checkpoint, FileHash, Host, Store, add_event, lease_now, utcnow

if TYPE_CHECKING:  # only the scan asks the plugins; reading the index (`lorafarm models`)
    # must not import them
    from daemon.contract.loader import Plugins

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# In a diffusers folder, the file whose hash stands for the model (A1111 hashes one file).
DENOISER_WEIGHTS = ("unet", "transformer")


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    path: Path
    kind: str
    family: str | None
    lineage: str | None
    variant: str | None
    state: str  # ok | unrecognised | missing
    reason: str | None
    config_path: Path | None
    model_hash: str | None
    quantization: str | None = None  # "GGUF Q8_0", "FP8 e4m3fn"; None: stored as released
    transformer_2: Path | None = None  # a GGUF pair's low-noise expert (sidecar transformer_2)
    # Component files its overrides name (text_encoder, text_encoder_2, vae), found on disk,
    # and the UI trees' folders a family may pair the others from (see LoadedCheckpoint).
    components: dict[str, Path] = field(default_factory=dict)
    component_folders: dict[str, tuple[Path, ...]] = field(default_factory=dict)

    def loaded(self) -> LoadedCheckpoint:
        return LoadedCheckpoint(name=self.name, path=self.path, kind=self.kind,
                                config_path=self.config_path, lineage=self.lineage,
                                variant=self.variant, quantization=self.quantization,
                                transformer_2=self.transformer_2,
                                components=dict(self.components),
                                component_folders=dict(self.component_folders))


class Registry:
    def __init__(self, config: Config, store: Store, plugins: Plugins,
                 host: str = "local") -> None:
        self.config = config
        self.store = store
        self.plugins = plugins
        self.host = host  # the daemon whose models/ folder this index describes
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hasher")
        self._hash_jobs: dict[str, Future[str]] = {}
        self._lock = threading.Lock()
        # One scan at a time in this process, as lock_inventory makes it across processes.
        self._scan_lock = threading.Lock()
        # The last scan's view of this host's checkpoints (see `known`).
        self._last_scan: dict[str, CheckpointInfo] = {}

    # -- scanning --------------------------------------------------------------------------

    def scan(self) -> list[CheckpointInfo]:
        """Index models/: recognise new or changed checkpoints, mark vanished ones missing."""
        with self._scan_lock:
            with self.store.session() as session:
                lock_inventory(self.store, session, "checkpoints", self.host)
                self._index(session, self._checkpoint_files())
            infos = self.all()
            self._last_scan = {info.name: info for info in infos}
        for info in infos:
            if info.state == "ok" and info.model_hash is None:
                self._schedule_hash(info)
        return infos

    def _checkpoint_files(self) -> dict[str, tuple[Path, str]]:
        """Checkpoint name -> (path, kind) of every checkpoint in the model folders."""
        found: dict[str, tuple[Path, str]] = {}
        # models/ first (its names win), then existing ComfyUI / A1111 trees, read in place.
        for models in self.config.paths.checkpoint_folders:
            if not models.is_dir():
                continue
            for entry in sorted(models.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir() and (entry / "model_index.json").is_file():
                    found.setdefault(entry.name, (entry, "folder"))
                elif entry.is_file() and entry.suffix == ".safetensors":
                    found.setdefault(entry.stem, (entry, "single_file"))
                elif entry.is_file() and entry.suffix.lower() == ".gguf":
                    found.setdefault(entry.stem, (entry, "gguf"))
                elif entry.is_file() and entry.suffix.lower() in PICKLE_SUFFIXES:
                    found.setdefault(entry.stem, (entry, "pickle"))
        # The second expert of a GGUF pair is part of the checkpoint that names it, not a
        # checkpoint of its own (a job naming it alone would render with one expert).
        for partner in _second_experts(found, self.config):
            found.pop(partner, None)
        return found

    def _index(self, session: Session, found: dict[str, tuple[Path, str]]) -> None:
        """Bring this host's checkpoint rows in line with the files found."""
        rows = {row.name: row for row in session.scalars(
            select(Checkpoint).where(Checkpoint.host == self.host))}
        for name, (path, kind) in found.items():
            stat = path.stat()
            mtime = int(stat.st_mtime_ns)
            size = stat.st_size if kind != "folder" else 0
            row = rows.get(name)
            # Headers are cheap to read, so recognition runs every scan (a config.toml
            # override may have changed); the expensive hash survives an unchanged file.
            unchanged = (row is not None and row.path == str(path) and row.mtime_ns == mtime
                         and row.size_bytes == size)
            info = self._refuse_foreign_components(name, path,
                                                   self._recognise(name, path, kind))
            if row is None:
                row = Checkpoint(name=name, host=self.host)
                session.add(row)
            before = (row.family, row.lineage, row.state, row.reason, row.config_path,
                      row.quantization, row.transformer_2)
            row.path, row.kind, row.size_bytes, row.mtime_ns = str(path), kind, size, mtime
            row.family, row.lineage, row.variant = info.family, info.lineage, info.variant
            row.state, row.reason = info.state, info.reason
            row.recognised_by = info.recognised_by
            row.config_path = str(info.config_path) if info.config_path else None
            row.quantization = info.quantization
            row.transformer_2 = str(info.transformer_2) if info.transformer_2 else None
            if not unchanged:
                row.sha256 = row.model_hash = None
            row.components_json = json.dumps(self._component_sources(row))
            after = (row.family, row.lineage, row.state, row.reason, row.config_path,
                     row.quantization, row.transformer_2)
            if not unchanged or after != before:
                row.updated_at = utcnow()
                add_event(session, "checkpoint_indexed", f"{name}: {info.state}",
                          family=info.family, reason=info.reason)
        for name, row in rows.items():
            if name not in found and row.state != "missing":
                row.state, row.reason = "missing", f"{row.path} is gone"
                add_event(session, "checkpoint_missing", f"{name}: file is gone")

    def _component_sources(self, row: Checkpoint) -> dict[str, str]:
        """The files a recognised checkpoint's parts load from instead of its config folder
        (its family's `component_sources`: named, or paired from the UI trees), recorded
        with the row so that `lorafarm models` lists them without loading the plugins."""
        family = self.plugins.families.get(row.family or "")
        if row.state != "ok" or family is None:
            return {}
        info = self._row_info(row)
        if info.state != "ok":
            return {}
        try:
            parts = family.component_sources(info.loaded())
        except PLUGIN_ERRORS:  # a plugin's bug: the listing shows no parts, the scan goes on
            log.exception("%s: %s.component_sources failed", row.name, family.name)
            return {}
        return {key: str(path) for key, path in sorted(parts.items())}

    @dataclass(frozen=True)
    class _Recognition:
        family: str | None
        lineage: str | None
        variant: str | None
        state: str
        reason: str | None
        recognised_by: str | None
        config_path: Path | None
        quantization: str | None = None  # the label, e.g. "GGUF Q8_0" (ok checkpoints only)
        transformer_2: Path | None = None  # a GGUF pair's second expert (ok checkpoints only)

    def _override(self, name: str, path: Path) -> tuple[CheckpointOverride | None, Path | None]:
        """A sidecar NAME.toml beside the checkpoint, with config.toml's
        [checkpoints.NAME] on top (the central file wins); and the second expert file of a
        GGUF pair (`transformer_2`), which the sidecar or config.toml names (config.toml
        wins; a bare file name there is looked up beside the checkpoint)."""
        sidecar = read_checkpoint_sidecar(name, path)  # see daemon/library/sidecars.py
        values = sidecar.values() if sidecar is not None else {}
        transformer_2 = values.pop("transformer_2", None)
        central = self.config.checkpoints.get(name)
        if central is not None:
            values.update({k: v for k, v in central.__dict__.items() if v is not None})
            central_second = values.pop("transformer_2", None)
            if central_second is not None:
                transformer_2 = _beside(path, Path(str(central_second)))
        for key, kind in COMPONENT_KEYS.items():
            if values.get(key) is not None:
                values[key] = self._component_file(name, key, Path(str(values[key])), kind)
        override = CheckpointOverride(**values) if values else None  # type: ignore[arg-type]
        return override, Path(str(transformer_2)) if transformer_2 else None

    def _component_file(self, name: str, key: str, value: Path, kind: str) -> Path:
        """The file a component key names: a path as given, a bare file name from the UI
        trees' folders of that kind. Raises ValueError saying what, where and how to fix."""
        where = (f"{key} = {str(value)!r} for {name} ([checkpoints.{name}] in config.toml or "
                 f"the sidecar {name}.toml)")
        if value.is_absolute():
            if value.is_file():
                return value
            raise ValueError(f"{where}: {value} is not a file; fix the path (a relative path "
                             "counts from the file that sets it) or remove the key")
        folders = self.config.paths.component_folders[kind]
        for folder in folders:
            if (folder / value.name).is_file():
                return folder / value.name
        if not folders:
            raise ValueError(f"{where}: a bare file name is looked up in the models/{kind} "
                             "folder of the ComfyUI trees in paths.comfyui, and none is "
                             "configured; add the tree to paths.comfyui or give the file's path")
        raise ValueError(f"{where}: no such file in {', '.join(str(f) for f in folders)}; put "
                         "it there, or give the file's path")

    def _row_info(self, row: Checkpoint) -> CheckpointInfo:
        """A row with the component files its overrides name (read now: they are not
        stored) and the folders its family may pair others from."""
        info = _info(row)
        components: dict[str, Path] = {}
        if info.state == "ok":
            try:
                override, _ = self._override(info.name, info.path)
            except ValueError as exc:
                # A named file gone (or a sidecar broken) since the last scan: unusable now,
                # not quietly built from other files until the next scan says so.
                return replace(info, state="unrecognised", reason=str(exc),
                               component_folders=self.config.paths.component_folders)
            components = {key: getattr(override, key) for key in COMPONENT_KEYS
                          if override is not None and getattr(override, key) is not None}
        return replace(info, components=components,
                       component_folders=self.config.paths.component_folders)

    def _refuse_foreign_components(self, name: str, path: Path,
                                   info: Registry._Recognition) -> Registry._Recognition:
        """A component key (`text_encoder`, `text_encoder_2`, `vae`) set for a checkpoint
        whose family does not assemble pipelines from such files would be ignored without a
        word; the checkpoint is refused instead, saying which keys to remove."""
        family = self.plugins.families.get(info.family or "")
        if info.state != "ok" or family is None:
            return info
        try:
            override, _ = self._override(name, path)
        except ValueError:
            return info
        named = [key for key in COMPONENT_KEYS
                 if override is not None and getattr(override, key) is not None]
        foreign = [key for key in named if key not in family.component_files]
        if not foreign:
            return info
        takes = (f"it takes only {', '.join(family.component_files)}"
                 if family.component_files else
                 "it loads its text encoders and VAE from the checkpoint or its config folder")
        return replace(info, state="unrecognised", recognised_by=None, reason=(
            f"{', '.join(foreign)} set for {name} ([checkpoints.{name}] in config.toml or the "
            f"sidecar {name}.toml), but the {family.display_name} family does not assemble "
            f"its pipeline from component files ({takes}): remove the key"))

    def _recognise(self, name: str, path: Path, kind: str) -> Registry._Recognition:
        try:
            override, transformer_2 = self._override(name, path)
        except ValueError as exc:
            return self._Recognition(None, None, None, "unrecognised", str(exc), None, None)
        config_path = override.config if override else None
        if kind == "pickle":
            return self._Recognition(None, None, None, "unrecognised",
                                     f"{path.suffix} files are pickles and are never loaded "
                                     "(they can run code); convert it to .safetensors",
                                     None, None)
        if transformer_2 is not None and kind != "gguf":
            return self._Recognition(
                None, None, None, "unrecognised",
                f"{_second_expert_origin(name, self.config)} sets transformer_2, which pairs "
                f"two GGUF expert files (Wan 2.2 A14B); {name} is a {kind.replace('_', ' ')}, "
                "not a .gguf file: remove transformer_2", None, config_path)
        try:
            if kind == "folder":
                source = CheckpointSource.for_folder(name, path)
            elif kind == "gguf":
                source = CheckpointSource(name=name, path=path, kind=kind,
                                          gguf=read_gguf_header(path), config_path=config_path,
                                          transformer_2=transformer_2)
                if transformer_2 is not None:
                    _check_second_expert(path, transformer_2,
                                         _second_expert_origin(name, self.config))
            else:
                source = CheckpointSource(name=name, path=path, kind=kind,
                                          header=read_header(path), config_path=config_path)
        except (SafetensorsError, GgufError, OSError, ValueError) as exc:
            return self._Recognition(None, None, None, "unrecognised", str(exc), None, None)
        probes: list[CheckpointProbe] = []
        probe_faults: list[str] = []
        for family in self.plugins.families.values():
            try:
                probe = family.probe_checkpoint(source)
            except PLUGIN_ERRORS as exc:  # a plugin bug must not hide the other families' answers
                probe_faults.append(self.plugins.probe_fault(family, path, exc))
                probe = None
                del exc
            if probe is not None:
                probes.append(probe)
        found = checkpoint_quantization(path, kind)
        quantization = found.label if found else None
        second = transformer_2 if kind == "gguf" else None
        if override and override.family:
            if override.family not in self.plugins.families:
                return self._Recognition(
                    None, None, None, "unrecognised",
                    f"config.toml sets family {override.family!r} for {name}, but no such family "
                    f"is installed (installed: {', '.join(sorted(self.plugins.families))})",
                    None, config_path)
            matching = [p for p in probes if p.family == override.family]
            lineage = override.lineage or (matching[0].lineage if matching else None)
            variant = override.variant or (matching[0].variant if matching else None)
            return self._Recognition(override.family, lineage, variant, "ok",
                                     "family set in config.toml", "config", config_path,
                                     quantization, second)
        if not probes and source.gguf is not None:
            readers = sorted(f.display_name for f in self.plugins.families.values()
                             if f.reads_gguf)
            return self._Recognition(None, None, None, "unrecognised",
                                     _unknown_gguf_reason(source, readers), None, config_path)
        if not probes and probe_faults:
            return self._Recognition(None, None, None, "unrecognised",
                                     "; ".join(probe_faults), None, config_path)
        if not probes:
            return self._Recognition(
                None, None, None, "unrecognised",
                "no installed family recognises this checkpoint's keys; if it is a known model, "
                f'set [checkpoints.{name}] family = "..." in config.toml', None, config_path)
        probes.sort(key=lambda p: p.score, reverse=True)
        best = probes[0]
        if len(probes) > 1 and probes[1].score == best.score and probes[1].family != best.family:
            tied = ", ".join(p.family for p in probes if p.score == best.score)
            return self._Recognition(
                None, None, None, "unrecognised",
                f"families tie for this checkpoint ({tied}); choose one with "
                f'[checkpoints.{name}] family = "..." in config.toml', None, config_path)
        lineage = override.lineage if override and override.lineage else best.lineage
        variant = override.variant if override and override.variant else best.variant
        reason = best.reason
        if found is not None:
            # Shown by `lorafarm models`: the label the renders record, and the type mix.
            reason += f"; {found.label} ({found.detail})"
        return self._Recognition(best.family, lineage, variant, "ok", reason,
                                 "header", config_path, quantization, second)

    # -- queries ---------------------------------------------------------------------------

    def all(self) -> list[CheckpointInfo]:
        with self.store.session() as session:
            return [self._row_info(row) for row in session.scalars(
                select(Checkpoint).where(Checkpoint.host == self.host)
                .order_by(Checkpoint.name))]

    def known(self, name: str) -> CheckpointInfo | None:
        """This host's checkpoint as of the last scan, without a database read: for code
        that runs inside another transaction (the claim's batch sizing)."""
        return self._last_scan.get(name)

    def get(self, name: str) -> CheckpointInfo | None:
        """This host's checkpoint of that name."""
        with self.store.session() as session:
            row = session.scalars(select(Checkpoint).where(Checkpoint.host == self.host,
                                                           Checkpoint.name == name)).first()
            return self._row_info(row) if row else None

    def find(self, name: str) -> CheckpointInfo | None:
        """For intake: this host's checkpoint, else a usable one of another live host of the
        farm (the job will be rendered there)."""
        own = self.get(name)
        if own is not None and own.state != "missing":
            return own
        with self.store.session() as session:
            row = session.scalars(
                select(Checkpoint).where(Checkpoint.name == name, Checkpoint.state == "ok",
                                         Checkpoint.host.in_(live_hosts(session,
                                                                        self.config)))).first()
            return self._row_info(row) if row else own

    def find_by_hash(self, model_hash: str) -> CheckpointInfo | None:
        """A usable checkpoint (here, else on a live host) whose A1111 hash (10 hex) or
        sha256 starts with `model_hash`."""
        model_hash = model_hash.lower().strip()
        if len(model_hash) < 8:
            return None
        with self.store.session() as session:
            hosts = [self.host, *live_hosts(session, self.config)]
            rows = session.scalars(select(Checkpoint).where(
                Checkpoint.state == "ok", Checkpoint.host.in_(hosts),
                Checkpoint.sha256.startswith(model_hash[:10]))).all()
            rows = sorted(rows, key=lambda row: row.host != self.host)
            return self._row_info(rows[0]) if rows else None

    def preset(self, info: CheckpointInfo) -> dict[str, Any]:
        """The defaults the checkpoint brings for jobs (steps, cfg, sampler, negative_prompt,
        width, height): its sidecar's, with config.toml's [checkpoints.NAME] on top."""
        try:
            override, _ = self._override(info.name, info.path)
        except ValueError:
            return {}  # a broken sidecar makes the checkpoint unusable; the scan says why
        if override is None:
            return {}
        return {key: getattr(override, key) for key in PRESET_KEYS
                if getattr(override, key) is not None}

    def known_names(self) -> list[str]:
        """Usable checkpoint names on any live host (for did-you-mean)."""
        with self.store.session() as session:
            hosts = [self.host, *live_hosts(session, self.config)]
            return sorted(set(session.scalars(select(Checkpoint.name).where(
                Checkpoint.state == "ok", Checkpoint.host.in_(hosts)))))

    # -- hashing ---------------------------------------------------------------------------

    def hashed_file(self, info: CheckpointInfo) -> Path:
        """The file whose sha256 is the model hash: the single file, or a folder's denoiser."""
        if info.kind != "folder":
            return info.path
        for component in DENOISER_WEIGHTS:
            folder = info.path / component
            if folder.is_dir():
                weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.json"))
                if weights:
                    return weights[0]
        return info.path / "model_index.json"

    def _schedule_hash(self, info: CheckpointInfo) -> Future[str]:
        with self._lock:
            job = self._hash_jobs.get(info.name)
            # Asked again after a job ended: it failed, or the file changed since (a finished
            # job's digest may be the old file's), so hash again (cheap if it was recorded).
            if job is None or job.done():
                job = self._hasher.submit(self._compute_hash, info)
                self._hash_jobs[info.name] = job
            return job

    def model_hash(self, name: str, *, wait: bool = True) -> str | None:
        """The A1111 model hash (sha256 of the file, 10 hex); None while unknown."""
        info = self.get(name)
        if info is None or info.state != "ok":
            return None
        if info.model_hash:
            return info.model_hash
        job = self._schedule_hash(info)
        if not wait:
            return None
        return job.result()

    def _compute_hash(self, info: CheckpointInfo) -> str:
        path = self.hashed_file(info)
        while True:
            stat = path.stat()
            with self.store.session() as session:
                cached = session.get(FileHash, str(path))
                fresh = cached is not None and (cached.size_bytes, cached.mtime_ns) == _stamp(stat)
                digest = cached.sha256 if fresh else None
            if digest is None:
                digest = sha256_file(path)
                with self.store.session() as session:
                    _record_file_hash(self.store, session, path, stat, digest)
            with self.store.session() as session:
                # The digest is of the file as it was when hashing began: if it was replaced
                # at the same path meanwhile (a new download), it belongs to no file there
                # now and the new one is hashed instead.
                if _stamp(path.stat()) != _stamp(stat):
                    log.info("%s changed while it was hashed; hashing it again", path)
                    continue
                row = session.scalars(select(Checkpoint).where(
                    Checkpoint.host == self.host, Checkpoint.name == info.name)).first()
                if row is not None and row.path == str(info.path):
                    row.sha256, row.model_hash = digest, digest[:10]
            return digest[:10]

    def close(self) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)


def indexed_checkpoints(store: Store, host: str) -> list[tuple[CheckpointInfo, dict[str, str]]]:
    """`host`'s checkpoints as its last scan recorded them, each with the files its parts
    load from (see `Registry._component_sources`), read from the database alone: no plugin,
    no header, no file is read. Empty when a checkpoint was last scanned by a lorafarm that
    did not record its parts (the caller scans instead)."""
    with store.session() as session:
        rows = session.scalars(select(Checkpoint).where(Checkpoint.host == host)
                               .order_by(Checkpoint.name)).all()
        if any(row.components_json is None for row in rows):
            return []
        return [(_info(row), json.loads(row.components_json or "{}")) for row in rows]


def lock_inventory(store: Store, session: Session, inventory: str, host: str) -> None:
    """Take turns with any other scan of this host's `inventory` ("checkpoints", "loras")
    until `session` ends: two daemons on one machine under one inventory name, or `lorafarm
    models` beside the daemon, would otherwise both insert a new file's row. PostgreSQL runs
    their transactions side by side; SQLite's writers take turns already."""
    if not store.is_sqlite:
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                        {"key": f"lorafarm {inventory} of {host}"})


def _stamp(stat: os.stat_result) -> tuple[int, int]:
    """(size, mtime) of a file: what a cached or recorded hash is valid for."""
    return stat.st_size, stat.st_mtime_ns


def _record_file_hash(store: Store, session: Session, path: Path, stat: os.stat_result,
                      digest: str) -> None:
    """Cache a file's sha256 for its (size, mtime). Hosts sharing models/ hash the same
    file at once, so this is an upsert: the last to finish writes (both digests agree,
    or the stat they are recorded with differs)."""
    insert = sqlite_insert if store.is_sqlite else postgresql_insert
    values = dict(path=str(path), size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns,
                  sha256=digest, computed_at=utcnow())
    statement = insert(FileHash).values(**values)
    session.execute(statement.on_conflict_do_update(
        index_elements=[FileHash.path],
        set_={key: statement.excluded[key] for key in values if key != "path"}))


def live_hosts(session: Any, config: Config) -> list[str]:
    """Hosts of the farm that heartbeat within the lease time."""
    cutoff = lease_now(session) - dt.timedelta(seconds=config.lease_seconds)
    return list(session.scalars(select(Host.name).where(Host.heartbeat_at >= cutoff,
                                                        Host.state == "running")))


def _info(row: Checkpoint) -> CheckpointInfo:
    path = Path(row.path)
    # Both recorded by the scan of the host that has the file, so a checkpoint of another host
    # of the farm carries them too.
    quantization = row.quantization
    transformer_2 = Path(row.transformer_2) if row.transformer_2 else None
    return CheckpointInfo(name=row.name, path=path, kind=row.kind, family=row.family,
                          lineage=row.lineage, variant=row.variant, state=row.state,
                          reason=row.reason,
                          config_path=Path(row.config_path) if row.config_path else None,
                          model_hash=row.model_hash, quantization=quantization,
                          transformer_2=transformer_2)


def _second_experts(found: dict[str, tuple[Path, str]], config: Config) -> set[str]:
    """Names of GGUF files that another GGUF names as its `transformer_2` (in its sidecar or
    config.toml's [checkpoints.NAME])."""
    partners: set[Path] = set()
    for name, (path, kind) in found.items():
        if kind != "gguf":
            continue
        central = config.checkpoints.get(name)
        second: object = central.transformer_2 if central is not None else None
        if second is None:
            try:
                sidecar = read_checkpoint_sidecar(name, path)
            except ValueError:
                continue  # the checkpoint itself reports the broken sidecar
            second = sidecar.transformer_2 if sidecar is not None else None
        if second is not None:
            partner = _beside(path, Path(str(second))).resolve()
            if partner != path.resolve():
                partners.add(partner)
    return {name for name, (path, _) in found.items() if path.resolve() in partners}


def _beside(checkpoint: Path, second: Path) -> Path:
    """config.toml's `transformer_2`: a bare file name is the checkpoint's neighbour (config.py
    keeps it relative); a path was resolved against config.toml's folder already."""
    return second if second.is_absolute() else (checkpoint.parent / second).resolve()


def _second_expert_origin(name: str, config: Config) -> str:
    """Where a checkpoint's `transformer_2` was set, for messages."""
    central = config.checkpoints.get(name)
    if central is not None and central.transformer_2 is not None:
        return f"config.toml [checkpoints.{name}]"
    return f"sidecar {name}.toml"


def _check_second_expert(path: Path, second: Path, origin: str) -> None:
    """The `transformer_2` a checkpoint names must be a readable GGUF file other than the
    checkpoint itself; raises ValueError (GgufError) with the reason."""
    if not second.is_file():
        raise ValueError(f"{origin} names transformer_2 = {second.name!r}, which does not exist "
                         f"in {second.parent}; put the low-noise expert's file there or fix the "
                         "name")
    if second.suffix.lower() != ".gguf":
        raise ValueError(f"{origin}: transformer_2 = {second.name!r} must be a .gguf file like "
                         "the checkpoint itself")
    if second.resolve() == path.resolve():
        raise ValueError(f"{origin}: transformer_2 = {second.name!r} is the checkpoint itself; "
                         "name the low-noise expert's file")
    read_gguf_header(second)


def _unknown_gguf_reason(source: CheckpointSource, readers: list[str]) -> str:
    assert source.gguf is not None
    architecture = source.gguf.architecture
    tensors = len(source.gguf.tensors)
    if architecture in TEXT_ARCHITECTURES:
        return (f"GGUF general.architecture = {architecture!r}: a language-model file (a text "
                "encoder or chat model), not a diffusion transformer; lorafarm takes text "
                "encoders from the checkpoint's base folder (config)")
    stated = f"general.architecture = {architecture!r}" if architecture else \
        "no general.architecture"
    return (f"no installed family recognises this GGUF file's {tensors} tensors ({stated}); "
            f"GGUF transformers load for {', '.join(readers) or 'no installed family'}")
