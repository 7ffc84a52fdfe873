"""The hot folder: job files dropped into jobs/ become a job row and one row per render.

Lifecycle (one filesystem, atomic renames):

    jobs/NAME.toml --taken--> jobs/.taking-DAEMON/ --accepted--> jobs/processing/
                   --all renders ended--> jobs/done/ | failed/
                   (--invalid--> jobs/rejected/ + NAME.toml.error.txt)

The database row is written first and the file moved second; `reconcile()` at start-up
repairs the gap a crash can leave between the two. Watcher events are only hints (inotify
drops events on overflow, network shares send none): the folder is rescanned at start and
periodically, and a file is taken only once it is complete.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from PIL import Image
from sqlalchemy import select, text
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon.config import Config
from daemon.contract.family import Family, FamilyDefaults
from daemon.contract.faults import FaultLog, describe_fault, fault_key
from daemon.contract.hires import (
    DEFAULT_IMG2IMG_DENOISING,
    check_hires,
    hires_target,
    resolve_upscaler,
)
from daemon.contract.jobfile import (
    JobFileError,
    JobSpec,
    check_job,
    decode_job_bytes,
    line_of_key,
)
from daemon.contract.loader import PROBE_FAULT, Plugins
from daemon.contract.samplers import SamplerError, choose_sampler, samplers_for_kind
from daemon.contract.spec import LoraUse, RenderSpec
from daemon.folders import unique_destination, write_error_file
from daemon.formats.safetensors_header import sha256_file
from daemon.intake.guard import (
    UnreadableEntries,
    check_fault,
    parser_fault,
    unreadable_reason,
    wrong_suffix,
)
from daemon.library.embeddings import OK as EMBEDDING_OK
from daemon.library.embeddings import EmbeddingInfo, EmbeddingLibrary
from daemon.library.loras import LoraInfo, LoraLibrary, LoraLookupError, preferred_weight
from daemon.library.registry import CheckpointInfo, Registry
from daemon.presets import apply_preset
from daemon.queue.lifecycle import fault_point
from daemon.resolver.prompt_files import find_input_file, read_prompt_file
from daemon.resolver.prompt_tags import PromptTagError, extract_lora_tags
from daemon.resolver.sweep import epoch_of, expand_axes, sweep_variants
from daemon.resolver.wildcards import Wildcards, has_dynamic_syntax
from daemon.store.models import (
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_REJECTED,
    RENDER_QUEUED,
    UNFINISHED_JOB_STATES,
    Job,
    Render,
    Store,
    add_event,
    utcnow,
)

log = logging.getLogger(__name__)

_BARE_LORA_TAG = re.compile(r"<lora:([^:<>]+)>", re.IGNORECASE)  # a tag without a weight

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
MAX_JOB_FILE_BYTES = 1024 * 1024  # a job file is a few hundred bytes; 1 MB is not a job
MAX_MEDIA_JOB_BYTES = 512 * 1024 * 1024  # a PNG or MP4 dropped to be rendered again
SUBFOLDERS = ("processing", "done", "failed", "rejected")
CLAIM_FOLDER_PREFIX = ".taking-"  # jobs/.taking-<daemon>/: files a daemon is taking in


@dataclass
class ScanResult:
    accepted: list[int] = field(default_factory=list)  # job ids
    rejected: list[str] = field(default_factory=list)  # file names
    pending: list[str] = field(default_factory=list)  # files not complete yet


@dataclass(frozen=True)
class Submitted:
    """A job taken in over HTTP (`Intake.submit`)."""

    job_id: int
    file_name: str  # the name its file got (made unique among files waiting in jobs/)
    renders: int
    warnings: list[str]
    file_path: str | None  # where its file is now (jobs/processing/...)


class Intake:
    def __init__(self, config: Config, store: Store, registry: Registry,
                 library: LoraLibrary, plugins: Plugins, owner: str = "local") -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.library = library
        self.owner = owner.replace("/", "_")  # names this daemon's claim folder
        self.plugins = plugins
        # Textual-inversion embeddings, indexed in memory (rescanned for every job).
        self.embeddings = EmbeddingLibrary(config, plugins)
        self.jobs_dir = config.paths.jobs
        self.wakeup = threading.Event()  # set by the watcher; the scan loop waits on it
        self._closed: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) at close-write
        self._lock = threading.Lock()  # one scan at a time
        self._stuck: set[Path] = set()  # claimed files that cannot go back (reported once)
        self._observer: Observer | None = None
        self._unreadable = UnreadableEntries(store)  # jobs/ entries reported once
        self._faults = FaultLog()

    # -- folder helpers --------------------------------------------------------------------

    def folder(self, name: str) -> Path:
        return self.jobs_dir / name

    def ensure_folders(self) -> None:
        self.config.paths.loras.mkdir(parents=True, exist_ok=True)
        for name in SUBFOLDERS:
            self.folder(name).mkdir(parents=True, exist_ok=True)

    # -- watching --------------------------------------------------------------------------

    def start_watching(self) -> None:
        handler = _WakeupHandler(self)
        self._observer = Observer()
        self._observer.schedule(handler, str(self.jobs_dir), recursive=False)
        loras = self.config.paths.loras
        if loras.is_dir():
            # LoRAs may sit in subfolders; a change there wakes the scan loop too.
            self._observer.schedule(handler, str(loras), recursive=True)
        self._observer.daemon = True
        self._observer.start()

    def stop_watching(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def note_closed(self, path: Path) -> None:
        try:
            stat = path.stat()
        except OSError:
            return
        self._closed[str(path)] = (stat.st_size, stat.st_mtime_ns)

    # -- scanning --------------------------------------------------------------------------

    def scan(self) -> ScanResult:
        """Take every complete job file in jobs/ (top level only)."""
        result = ScanResult()
        with self._lock:
            self.ensure_folders()
            entries = sorted(self.jobs_dir.iterdir())
            self._unreadable.forget_missing({path.name for path in entries})
            for path in entries:
                name = path.name
                if name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES):
                    continue  # being written by its owner, or not ours
                if name.endswith(".error.txt") or name in SUBFOLDERS and path.is_dir():
                    continue
                self._take_guarded(path, result)
        return result

    def _take_guarded(self, path: Path, result: ScanResult) -> None:
        """Take one entry; nothing about it may stop the scan (or the daemon's start)."""
        name = path.name
        problem = unreadable_reason(path)
        if problem is not None:
            self._unreadable.report(path, problem)
            return
        try:
            self._take(path, result)
        except PermissionError as exc:
            self._unreadable.report(path, "a file lorafarm may not read or move (permission "
                                    f"denied: {exc.filename or name})")
        except OSError as exc:  # vanished mid-way: try again next scan
            log.warning("could not take %s yet: %s", name, exc)
            result.pending.append(name)
        except Exception as exc:  # the database went away, say: the file waits in jobs/
            self._faults.exception(fault_key(exc, "intake", name),
                                   f"could not take {name}: {describe_fault(exc)}; it stays "
                                   "in jobs/ and is tried again at the next scan", exc)
            result.pending.append(name)

    def _complete(self, path: Path, stat: os.stat_result) -> bool:
        closed = self._closed.get(str(path))
        if closed == (stat.st_size, stat.st_mtime_ns):
            return True  # the writer closed it and nothing changed since
        age = time.time() - stat.st_mtime
        return age >= self.config.intake.settle_seconds

    def _take(self, path: Path, result: ScanResult) -> None:
        stat = path.stat()
        if not self._complete(path, stat):
            result.pending.append(path.name)
            return
        if path.is_symlink():
            self._reject(path, b"", JobFileError(
                "job files may not be symbolic links",
                fix="copy the job file into jobs/ instead of linking it"), result)
            return
        limit = (MAX_MEDIA_JOB_BYTES if path.suffix.lower() in self.plugins.binary_parsers
                 else MAX_JOB_FILE_BYTES)
        if stat.st_size > limit:
            self._reject(path, b"", JobFileError(
                f"the file is {stat.st_size} bytes; a job file is at most "
                f"{limit} bytes", fix="is this really a job file? job files are "
                "short TOML or JSON text"), result)
            return
        raw = path.read_bytes()
        content_hash = hashlib.sha256(raw).hexdigest()
        error: JobFileError | None = None
        spec: JobSpec | None = None
        renders: list[RenderSpec] = []
        warnings: list[str] = []
        try:
            spec, renders, warnings = self.parse(path.name, raw)
        except JobFileError as exc:
            if time.time() - stat.st_mtime < self.config.intake.retry_young_seconds:
                result.pending.append(path.name)  # its writer may not be done: retry soon
                return
            error = exc
        # Several daemons may watch one folder: the one whose rename succeeds takes the
        # file, the others find it gone. The name stays; only the folder changes.
        taken = self._take_ownership(path)
        if taken is None:
            return
        fault_point("claim_taken")  # a crash here leaves the file in the claim folder
        try:
            self._settle(path, taken, raw, content_hash, spec, renders, warnings, error,
                         result)
        except Exception:
            # The database went away mid-way, say: the file goes back to jobs/ for the next
            # scan (which also finishes a row written before the failure), instead of waiting
            # in the claim folder for this daemon's next start.
            self._give_back(taken)
            raise

    def _settle(self, path: Path, taken: Path, raw: bytes, content_hash: str,
                spec: JobSpec | None, renders: list[RenderSpec], warnings: list[str],
                error: JobFileError | None, result: ScanResult) -> None:
        """Decide what a taken file becomes: its unfinished twin's file, a finished job's
        returning file, a rejection, or a new job."""
        claims = str(self.jobs_dir / CLAIM_FOLDER_PREFIX)
        with self.store.session() as session:
            twin = session.scalars(select(Job).where(
                Job.content_hash == content_hash, Job.state.in_(UNFINISHED_JOB_STATES))).first()
            twin_info = (twin.id, twin.file_path, twin.file_name) if twin else None
            # Recorded by a daemon that died before moving the file out of its claim folder.
            returning = [(job_id, file_path) for job_id, file_path in session.execute(
                select(Job.id, Job.file_path).where(
                    Job.content_hash == content_hash, Job.file_name == path.name,
                    Job.state.in_((JOB_DONE, JOB_FAILED)),
                    Job.file_path.startswith(claims, autoescape=True)))]
        unfiled = next((job_id for job_id, file_path in returning
                        if not Path(file_path).exists()), None)
        if unfiled is not None:
            # This file is a finished job's own: a daemon died while taking it in, the others
            # rendered the job, and the file came back to jobs/ from the dead daemon's claim
            # folder. File it with its job instead of running it a second time.
            self._file_finished(unfiled, taken)
            return
        if twin_info is not None:
            twin_id, twin_path, twin_name = twin_info
            if twin_name == path.name and (twin_path is None or not Path(twin_path).exists()):
                # The row was written but the daemon stopped before the move: finish it.
                self._move_accepted(twin_id, taken)
                return
            self._reject_duplicate(taken, raw, twin_id, twin_name, result)
            return
        if error is not None:
            self._reject(taken, raw, error, result)
            return
        assert spec is not None  # parsed, since there is no error
        try:
            job_id = self._accept(taken, content_hash, spec, renders, warnings)
        except _QueuedMeanwhile as twin:
            self._reject_duplicate(taken, raw, twin.job_id, twin.file_name, result)
            return
        result.accepted.append(job_id)

    def _reject_duplicate(self, taken: Path, raw: bytes, twin_id: int, twin_name: str,
                          result: ScanResult) -> None:
        self._reject(taken, raw, JobFileError(
            f"the same job content is already queued as job {twin_id} ({twin_name}), "
            "which has not finished", fix="wait for it to finish, or change the file "
            "(e.g. its seed) to queue a new run"), result, duplicate_of=twin_id)

    def _give_back(self, taken: Path) -> None:
        target = self.jobs_dir / taken.name
        try:
            if taken.exists() and not target.exists():
                os.rename(taken, target)
        except OSError:
            log.exception("could not put %s back into %s", taken, self.jobs_dir)

    def _take_ownership(self, path: Path) -> Path | None:
        """Move the file into this daemon's hidden claim folder (an atomic rename within
        jobs/); None when another daemon took it first."""
        claims = self.jobs_dir / f"{CLAIM_FOLDER_PREFIX}{self.owner}"
        claims.mkdir(exist_ok=True)
        taken = claims / path.name
        try:
            os.rename(path, taken)
        except FileNotFoundError:
            return None
        return taken

    def claim_folders(self) -> dict[str, Path]:
        """The claim folders in jobs/, by owner (this daemon's own included)."""
        return {folder.name[len(CLAIM_FOLDER_PREFIX):]: folder
                for folder in self.jobs_dir.glob(f"{CLAIM_FOLDER_PREFIX}*") if folder.is_dir()}

    def return_claims(self, owners: set[str] | None = None, *,
                      everyone: bool = False) -> list[str]:
        """Put files that claim folders still hold back into jobs/ (a daemon stopped between
        taking a file and recording it; the next scan settles them, filing those whose job
        was recorded). `owners`: whose folders (None: this daemon's); `everyone`: all of
        them (a lone daemon holding the state lock at start-up: no one else can be taking
        files in). A file that cannot go back is reported (event and log), once."""
        returned = []
        wanted = {self.owner} if owners is None else owners
        with self._lock:  # not while this daemon's own scan has a file in its claim folder
            for owner, folder in self.claim_folders().items():
                if not everyone and owner not in wanted:
                    continue
                for file in sorted(folder.iterdir()):
                    target = self.jobs_dir / file.name
                    try:
                        if target.exists():
                            raise FileExistsError(f"{target} exists")
                        os.rename(file, target)
                        returned.append(file.name)
                    except OSError as exc:
                        self._report_stuck_claim(file, target, exc)
                if owner != self.owner:
                    with contextlib.suppress(OSError):  # still holds a file: stays
                        folder.rmdir()
        if returned:
            log.info("returned %d job file(s) from claim folders to %s: %s", len(returned),
                     self.jobs_dir, ", ".join(returned))
        return returned

    def stuck_claims(self) -> list[Path]:
        """Files in claim folders that could not be returned to jobs/ (reported)."""
        return [path for path in self._stuck if path.exists()]

    def _report_stuck_claim(self, file: Path, target: Path, exc: OSError) -> None:
        if file in self._stuck:
            return
        self._stuck.add(file)
        what = (f"another file named {file.name} is in jobs/" if target.exists()
                else str(exc.strerror or exc))
        message = (f"cannot return {file} to {self.jobs_dir} ({what}): a daemon died while "
                   "taking it in and it is not queued; move it into jobs/ (under another "
                   "name if the name is taken) to queue it")
        log.error(message)
        with contextlib.suppress(Exception):  # the report must not stop the repair
            with self.store.session() as session:
                add_event(session, "claim_not_returned", message, path=str(file))

    # -- submitted over HTTP ----------------------------------------------------------------

    def submit(self, file_name: str, raw: bytes) -> Submitted:
        """Take a job sent over HTTP (`POST /api/jobs`) through the same checks and the same
        path as a dropped file, and return the queued job; raises JobFileError (nothing is
        written or queued) when a dropped file of these bytes would be rejected.

        The bytes are written into this daemon's claim folder first (no other host can take
        them from there), then settled exactly as a taken file is: the job file ends in
        processing/ and later done/ or failed/, like any other. Should the daemon die between
        the write and the record, start-up (or another host) puts the file back into jobs/,
        where it is taken like a dropped one: nothing answered 201 is lost."""
        name = Path(file_name.replace("\\", "/")).name.strip()
        if not name or name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES) \
                or name.endswith(".error.txt"):
            raise JobFileError(f"{file_name!r} cannot name a job file",
                               fix="name it like a job file, e.g. portrait.toml")
        limit = (MAX_MEDIA_JOB_BYTES if Path(name).suffix.lower() in self.plugins.binary_parsers
                 else MAX_JOB_FILE_BYTES)
        if len(raw) > limit:
            raise JobFileError(f"the job is {len(raw)} bytes; a job file is at most {limit} "
                               "bytes", fix="job files are short TOML or JSON text")
        content_hash = hashlib.sha256(raw).hexdigest()
        with self._lock:  # one at a time with the scan: the registry and library hold still
            spec, renders, warnings = self.parse(name, raw)
            with self.store.session() as session:
                twin = session.execute(select(Job.id, Job.file_name).where(
                    Job.content_hash == content_hash,
                    Job.state.in_(UNFINISHED_JOB_STATES))).first()
            if twin is not None:
                raise JobFileError(
                    f"the same job content is already queued as job {twin.id} "
                    f"({twin.file_name}), which has not finished",
                    fix="wait for it to finish, or change the job (e.g. its seed) to queue "
                        "a new run")
            self.ensure_folders()
            claims = self.jobs_dir / f"{CLAIM_FOLDER_PREFIX}{self.owner}"
            claims.mkdir(exist_ok=True)
            stem, suffix = Path(name).stem, Path(name).suffix
            for number in itertools.count(2):
                if not (claims / name).exists() and not (self.jobs_dir / name).exists():
                    break
                name = f"{stem}-{number}{suffix}"
            taken = claims / name
            temp = claims / f".{name}.{secrets.token_hex(4)}.tmp"
            with open(temp, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, taken)
            result = ScanResult()
            try:
                self._settle(self.jobs_dir / name, taken, raw, content_hash, spec, renders,
                             warnings, None, result)
            except Exception:
                self._give_back(taken)  # jobs/: the next scan takes it, as a dropped file
                raise
        if not result.accepted:
            # Another host queued the same content in the instant since the check above.
            raise JobFileError("the same job content was queued by another host just now; "
                               f"this copy went to {self.folder('rejected')}",
                               fix="wait for that job to finish, or change the job")
        job_id = result.accepted[0]
        with self.store.session() as session:
            job = session.get(Job, job_id)
            file_path = job.file_path if job is not None else None
        return Submitted(job_id=job_id, file_name=name, renders=len(renders),
                         warnings=warnings, file_path=file_path)

    # -- parsing and resolving -------------------------------------------------------------

    def parse(self, file_name: str, raw: bytes) -> tuple[JobSpec, list[RenderSpec], list[str]]:
        """Turn a job file's bytes into checked render specs; raises JobFileError."""
        suffix = Path(file_name).suffix.lower()
        parser = self.plugins.job_parsers.get(suffix)
        if parser is None:
            known = ", ".join(sorted(self.plugins.job_parsers)) or "none"
            raise JobFileError(f"`{suffix or file_name}` is not a job file type lorafarm reads",
                               fix=f"save the job as one of: {known}")
        binary = suffix in self.plugins.binary_parsers
        try:
            text = "" if binary else decode_job_bytes(raw)  # binary: no lines, errors name keys
        except JobFileError as exc:
            raise wrong_suffix(exc, file_name, raw, self.plugins.job_parsers) from exc
        try:
            data = parser(raw if binary else text)
        except JobFileError as exc:
            raise wrong_suffix(exc, file_name, raw, self.plugins.job_parsers) from exc
        except Exception as exc:
            fault = parser_fault(suffix, parser, self.plugins.plugin_of_parser(suffix), exc)
            raise wrong_suffix(fault, file_name, raw, self.plugins.job_parsers) from exc
        if not isinstance(data, dict):
            raise JobFileError(
                f"the {suffix} job parser (plugin "
                f"{self.plugins.plugin_of_parser(suffix)!r}) returned "
                f"{type(data).__name__}, not a table of job keys",
                fix="this is a bug in that plugin; save the job as TOML meanwhile")
        try:
            spec = check_job(data, text, self.config.limits)
            if spec.hires is not None:
                spec = replace(spec, hires=check_hires(spec.hires, text, self.config.limits))
            return (spec, *self.resolve(spec, text))
        except JobFileError:
            raise
        except Exception as exc:
            raise check_fault(exc, self.plugins) from exc

    def resolve(self, spec: JobSpec, text: str) -> tuple[list[RenderSpec], list[str]]:
        """Check the job against the registry and its family; expand it into renders."""
        if spec.checkpoint_hash:
            # A re-render names the model by hash first: the file may have another name here.
            by_hash = self.registry.find_by_hash(spec.checkpoint_hash)
            if by_hash is not None:
                spec = replace(spec, checkpoint=by_hash.name)
        warnings: list[str] = []
        prompt_lines = None
        if spec.prompts_file is not None:
            path = find_input_file(spec.prompts_file, self.config.paths.input_roots,
                                   "prompts_file", text)
            prompt_lines = read_prompt_file(path, self.config.limits, warnings)
        checkpoints: dict[str, tuple[CheckpointInfo, Family, dict[str, object]]] = {}
        axis_names: list[str] = []
        if not spec.sweep and prompt_lines is None:
            variants: list[tuple[JobSpec, dict[str, object]]] = [(spec, {})]
        else:
            lora_names = sorted({info.name for info in self.library.all(anywhere=True)
                                 if info.state == "ok"})
            axes = expand_axes(spec, text, lora_names, prompt_lines)
            axis_names = [axis.name for axis in axes]
            variants = sweep_variants(spec, text, axes, self.config.limits.max_count)
        wildcards = Wildcards(self.config.paths.wildcards)
        self.embeddings.scan()  # an embedding dropped with the job is found
        renders: list[RenderSpec] = []
        for variant, labels in variants:
            if variant.checkpoint not in checkpoints:
                found, its_family = self._checkpoint(variant.checkpoint, text)
                checkpoints[variant.checkpoint] = (found, its_family,
                                                   self.registry.preset(found))
            info, family, preset = checkpoints[variant.checkpoint]
            variant = apply_preset(variant, preset)
            vae = info.components.get("vae")
            if vae is not None:
                # A1111's infotext names the VAE and its hash (sha256, 10 hex).
                vae_record: dict[str, object] = {"vae": vae.name,
                                                 "vae_hash": file_hash(vae)[:10]}
            else:
                vae_record = {}
            for expanded, record in self._wildcard_variants(variant, wildcards, text):
                variant_renders, notes = self._expand(expanded, family, text, info)
                if labels:
                    record = {**record, "sweep": labels, "sweep_axes": axis_names}
                    swept = next((lora for lora in expanded.loras[len(spec.loras):]), None)
                    epoch = epoch_of(swept.name) if swept is not None else None
                    if epoch is not None:
                        record["epoch"] = epoch
                renders += [replace(r, extra={**r.extra, **vae_record, **record})
                            for r in variant_renders]
                warnings += [n for n in notes if n not in warnings]
        return renders, warnings

    def _checkpoint(self, name: str, text: str) -> tuple[CheckpointInfo, Family]:
        """The usable checkpoint a job (or one value of its checkpoint axis) names, and its
        family; raises JobFileError saying what is wrong and how to fix it."""
        info = self.registry.find(name)
        line = line_of_key(text, "checkpoint")
        if info is None or info.state == "missing":
            known = self.registry.known_names()
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close else
                    f"known checkpoints: {', '.join(known) or 'none yet'}")
            raise JobFileError(f"unknown checkpoint {name!r}", key="checkpoint",
                               line=line, fix=f"{hint} Put the model under "
                               f"{self.config.paths.models} (a diffusers folder or a "
                               ".safetensors file); `lorafarm models` lists what is known")
        if info.state != "ok" or info.family is None:
            fix = "fix or replace the model file (see `lorafarm models`)"
            if PROBE_FAULT in (info.reason or ""):  # a plugin's bug, not the model's
                fix = (f"update or remove the plugin named above (`lorafarm plugins`), or set "
                       f'[checkpoints."{name}"] family = "..." in config.toml')
            raise JobFileError(f"checkpoint {name!r} cannot be used: {info.reason}",
                               key="checkpoint", line=line, fix=fix)
        family = self.plugins.families.get(info.family)
        if family is None:
            raise JobFileError(f"checkpoint {name!r} is a {info.family} model but the "
                               f"{info.family} family plugin is not installed", key="checkpoint",
                               line=line, fix="install the family plugin or pick another model")
        problem = family.missing_requirements(info.loaded())
        if problem:
            raise JobFileError(problem, key="checkpoint", line=line,
                               fix="set it in config.toml, then drop the job file again")
        return info, family

    def _wildcard_variants(self, spec: JobSpec, wildcards: Wildcards,
                           text: str) -> list[tuple[JobSpec, dict[str, object]]]:
        """The job once per drawn (or, with `combinatorial`, every) expansion of the
        wildcards in its prompts, with the template to record; the job itself when there
        are none. A random draw is seeded from each render's seed."""
        if not (has_dynamic_syntax(spec.prompt) or has_dynamic_syntax(spec.negative_prompt)):
            return [(spec, {})]
        for key, template in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt)):
            if template:
                wildcards.check(template, key, line_of_key(text, key))
        record: dict[str, object] = {"prompt_template": spec.prompt}
        if spec.negative_prompt is not None and has_dynamic_syntax(spec.negative_prompt):
            record["negative_prompt_template"] = spec.negative_prompt
        limit = self.config.limits.max_count
        if spec.combinatorial:
            prompts = wildcards.combinations(spec.prompt, limit, "prompt",
                                             line_of_key(text, "prompt"))
            if len(prompts) > limit:
                raise JobFileError(f"the prompt's wildcards make more than {limit} combinations",
                                   key="combinatorial", line=line_of_key(text, "combinatorial"),
                                   fix="use fewer choices, or remove combinatorial to draw one "
                                       "prompt per seed (limits.max_count in config.toml)")
            seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
            return [(replace(spec, prompt=prompt, seed=seed, negative_prompt=_draw(
                wildcards, spec.negative_prompt, seed)), record) for prompt in prompts]
        seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
        return [(replace(spec, seed=seed + i, count=1,
                         prompt=wildcards.random(spec.prompt, seed + i, "prompt",
                                                 line_of_key(text, "prompt")),
                         negative_prompt=_draw(wildcards, spec.negative_prompt, seed + i)),
                 record) for i in range(spec.count)]

    def _expand(self, spec: JobSpec, family: Family, text: str,
                checkpoint: CheckpointInfo) -> tuple[list[RenderSpec], list[str]]:
        d = family.defaults_for(checkpoint.variant)
        warnings: list[str] = []
        try:
            choice = choose_sampler(spec.sampler or d.sampler,
                                    None if spec.sampler else d.schedule, family.sampler_kind)
        except SamplerError as exc:
            fitting = ", ".join(samplers_for_kind(family.sampler_kind))
            raise JobFileError(f"{exc} ({family.display_name})", key="sampler",
                               line=line_of_key(text, "sampler"),
                               fix=f"use one of the samplers that fit: {fitting}") from exc
        sampler, schedule = choice.sampler, choice.schedule
        width = spec.width or d.width
        height = spec.height or d.height
        if spec.image is not None and spec.width is None and spec.height is None:
            with Image.open(self.input_image(spec.image, text)) as image:
                fitted = family.size_for_image(checkpoint.variant, *image.size)
            if fitted is not None:
                width, height = fitted
        for key, value in (("width", width), ("height", height)):
            if value % d.size_multiple:
                lower = value - value % d.size_multiple
                raise JobFileError(
                    f"`{key}` = {value} is not a multiple of {d.size_multiple}, which "
                    f"{family.display_name} needs", key=key, line=line_of_key(text, key),
                    fix=f"use {lower} or {lower + d.size_multiple}")
        if d.cfg_fixed is not None and spec.cfg is not None and spec.cfg != d.cfg_fixed:
            alternatives = ["remove cfg"]
            if d.guidance is not None:
                alternatives.append(f"set `guidance` (default {d.guidance:g}) for its distilled "
                                    "guidance")
            if family.supports_true_cfg:
                alternatives.append("set `true_cfg` with a negative prompt for real CFG")
            alternatives.append("or use a base (non-distilled) checkpoint")
            raise JobFileError(
                f"this {family.display_name} checkpoint is distilled to run without CFG "
                f"(cfg {d.cfg_fixed:g}); `cfg` = {spec.cfg:g} would not be applied",
                key="cfg", line=line_of_key(text, "cfg"), fix="; ".join(alternatives))
        if spec.true_cfg is not None and not family.supports_true_cfg:
            raise JobFileError(f"{family.display_name} has no true CFG mode", key="true_cfg",
                               line=line_of_key(text, "true_cfg"),
                               fix="remove true_cfg (use cfg where the family has it)")
        if spec.guidance is not None and d.guidance is None:
            raise JobFileError(f"{family.display_name} has no embedded guidance", key="guidance",
                               line=line_of_key(text, "guidance"),
                               fix="remove guidance; use cfg for classifier-free guidance")
        if (spec.negative_prompt and not family.supports_negative_prompt
                and spec.true_cfg is None):
            fix = ("remove negative_prompt, or set true_cfg = 4.0 for real CFG (twice the "
                   "compute per step)" if family.supports_true_cfg else
                   "remove negative_prompt from the job")
            raise JobFileError(f"{family.display_name} takes no negative prompt",
                               key="negative_prompt",
                               line=line_of_key(text, "negative_prompt"), fix=fix)
        clip_skip = self._clip_skip(spec, family, d, text)
        prompt_text, loras = self._resolve_loras(spec, family, checkpoint, text, warnings)
        prompt, negative, convention_notes = family.apply_conventions(
            prompt_text, spec.negative_prompt, spec.conventions)
        warnings.extend(convention_notes)
        seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
        extra: dict[str, object] = {}
        if d.guidance is not None:
            extra["guidance"] = spec.guidance if spec.guidance is not None else d.guidance
        if spec.true_cfg is not None:
            extra["true_cfg"] = spec.true_cfg
        if checkpoint.quantization:
            # The checkpoint's form ("GGUF Q4_0") changes the pixels: it goes into the history,
            # the batch key and (via Family.infotext_fields) every output's infotext.
            extra["quantization"] = checkpoint.quantization
        extra.update(self._video_settings(spec, family, d, checkpoint.variant, text))
        extra.update(self._refine_settings(spec, family, d, width, height, text, warnings))
        embeddings = self._resolve_embeddings(spec, family, prompt, negative, text)
        if embeddings:
            extra["embeddings"] = embeddings
        warnings.extend(w for w in spec.rerender_warnings if w not in warnings)
        renders = [
            RenderSpec(
                family=family.name, checkpoint=spec.checkpoint, prompt=prompt,
                negative_prompt=negative, seed=seed + i, steps=spec.steps or d.steps,
                cfg=spec.cfg if spec.cfg is not None else d.cfg, sampler=sampler,
                schedule=schedule, width=width, height=height, user_prompt=spec.prompt,
                checkpoint_hash=checkpoint.model_hash, clip_skip=clip_skip, loras=loras,
                extra=dict(extra),
            )
            for i in range(spec.count)
        ]
        return renders, warnings

    @staticmethod
    def _clip_skip(spec: JobSpec, family: Family, d: FamilyDefaults, text: str) -> int | None:
        """The job's `clip_skip` where the family applies it (Family.clip_skip_levels); a
        family without the setting takes only its own default (e.g. Pony's recorded 2)."""
        if spec.clip_skip is None or spec.clip_skip == d.clip_skip:
            return d.clip_skip
        levels = family.clip_skip_levels
        if spec.clip_skip not in levels:
            fix = (f"use clip_skip = {' or '.join(map(str, levels))}" if levels else
                   "remove clip_skip")
            said = (f"takes clip skip {', '.join(map(str, levels))} only" if levels else
                    "has no clip skip setting")
            raise JobFileError(f"`clip_skip` = {spec.clip_skip}: {family.display_name} {said}",
                               key="clip_skip", line=line_of_key(text, "clip_skip"), fix=fix)
        return spec.clip_skip

    def _video_settings(self, spec: JobSpec, family: Family, d: FamilyDefaults,
                        variant: str | None, text: str) -> dict[str, object]:
        """frames, fps, image, guidance_2 and flow_shift: checked against the family and the
        checkpoint's variant defaults `d`."""
        settings: dict[str, object] = {}
        if family.produces != "video":
            for key in ("frames", "fps"):
                if getattr(spec, key) is not None:
                    raise JobFileError(f"`{key}` is for video families; {family.display_name} "
                                       "renders images", key=key, line=line_of_key(text, key),
                                       fix=f"remove {key}")
        else:
            frames = spec.frames if spec.frames is not None else d.frames or 1
            step = d.frame_step
            if (frames - 1) % step:
                lower = frames - (frames - 1) % step
                options = [n for n in (lower, lower + step) if n >= 1]
                raise JobFileError(
                    f"`frames` = {frames}: {family.display_name} needs {step}k+1 frames",
                    key="frames", line=line_of_key(text, "frames"),
                    fix=f"use {' or '.join(str(n) for n in options)}")
            settings["frames"] = frames
            settings["fps"] = spec.fps if spec.fps is not None else d.fps or 16
        for key, default in (("guidance_2", d.guidance_2), ("flow_shift", d.flow_shift)):
            value = getattr(spec, key)
            if value is not None and default is None:
                raise JobFileError(f"{family.display_name} has no `{key}` setting", key=key,
                                   line=line_of_key(text, key), fix=f"remove {key}")
            if default is not None:
                settings[key] = value if value is not None else default
        wants_image = family.image_input(variant)
        if spec.image is None and wants_image == "required":
            raise JobFileError(f"this {family.display_name} checkpoint animates an input image: "
                               "the job needs `image`", key="image",
                               fix='add image = "start.png" (a file in the inputs folder)')
        if spec.image is not None:
            if wants_image == "none":
                raise JobFileError(f"this {family.display_name} checkpoint takes no input image",
                                   key="image", line=line_of_key(text, "image"),
                                   fix="remove image, or use an image-to-video checkpoint")
            path = self.input_image(spec.image, text)
            settings["image"] = spec.image
            # The absolute path is for the worker; `image` and its hash are for the record.
            settings["image_path"] = str(path)
            settings["image_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        return settings

    def _resolve_embeddings(self, spec: JobSpec, family: Family, prompt: str, negative: str,
                            text: str) -> list[dict[str, str]]:
        """The textual-inversion embeddings the prompts name (A1111: an embedding's name as a
        word of either prompt), plus a re-render's `embedding_hashes` found by hash, then by
        name; each checked against the checkpoint's architecture."""
        chosen: dict[str, EmbeddingInfo] = {}
        missing = []
        for name, digest in spec.embedding_hashes.items():
            found = self.embeddings.find_by_hash(digest) or next(
                (info for info in self.embeddings.all()
                 if info.name.lower() == name.lower() and info.state == EMBEDDING_OK), None)
            if found is None:
                missing.append(f"{name} (hash {digest})")
            else:
                chosen[name] = found
        if missing:
            folders = ", ".join(str(p) for p in self.config.paths.embedding_folders)
            raise JobFileError(f"embedding(s) not found by hash or by name: "
                               f"{', '.join(missing)}", key="embedding_hashes",
                               line=line_of_key(text, "embedding_hashes"),
                               fix=f"put the .safetensors file(s) into {folders}")
        taken = {name.lower() for name in chosen}
        hires = spec.hires or {}
        for info in self.embeddings.named_in(prompt, negative, hires.get("prompt", ""),
                                             hires.get("negative_prompt", "")):
            if info.name.lower() not in taken:
                chosen[info.name] = info
        used = []
        for name, info in sorted(chosen.items()):
            where = "negative_prompt" if name.lower() not in prompt.lower() else "prompt"
            if info.state != EMBEDDING_OK:
                raise JobFileError(f"the {where} names embedding {name!r} ({info.path}), which "
                                   f"is {info.state}: {info.reason}", key=where,
                                   line=line_of_key(text, where),
                                   fix="replace the file with an SDXL .safetensors embedding, "
                                       "or remove the word from the prompt")
            if info.architecture != family.architecture:
                owner = self.plugins.families.get(info.family or "")
                made_for = owner.display_name if owner else info.family
                raise JobFileError(f"the {where} names embedding {name!r}, which is for "
                                   f"{made_for} ({info.architecture} text encoders), but "
                                   f"checkpoint {spec.checkpoint!r} is {family.display_name}",
                                   key=where, line=line_of_key(text, where),
                                   fix=(f"use a {family.display_name} embedding, or remove "
                                        "the word from the prompt")
                                   if type(family).probe_embedding is not Family.probe_embedding
                                   else f"{family.display_name} takes no textual-inversion "
                                        "embeddings: remove the word from the prompt, or "
                                        "rename the embedding file if the word is meant")
            used.append({"name": name, "file": info.name, "autov2": info.autov2 or "",
                         "path": str(info.path)})
        return used

    def _refine_settings(self, spec: JobSpec, family: Family, d: FamilyDefaults, width: int,
                         height: int, text: str, warnings: list[str]) -> dict[str, object]:
        """`[hires]` and image-to-image's `denoising_strength`, checked against the family
        (see daemon/contract/hires.py)."""
        settings: dict[str, object] = {}
        img2img = spec.image is not None and family.produces == "image"
        if spec.denoising_strength is not None and not img2img:
            raise JobFileError("`denoising_strength` is for image-to-image: the job gives no "
                               "`image`", key="denoising_strength",
                               line=line_of_key(text, "denoising_strength"),
                               fix='add image = "input.png" (in the inputs folder), or put '
                                   "denoising_strength into [hires] for the hires pass")
        if img2img:
            if not family.supports_img2img:
                raise JobFileError(f"{family.display_name} has no image-to-image here",
                                   key="image", line=line_of_key(text, "image"),
                                   fix="remove image, or use an SDXL-lineage checkpoint")
            settings["denoising_strength"] = (spec.denoising_strength
                                              if spec.denoising_strength is not None
                                              else DEFAULT_IMG2IMG_DENOISING)
        if spec.mask is not None:
            line = line_of_key(text, "mask")
            if not img2img:
                raise JobFileError("`mask` is for inpainting: the job gives no `image`",
                                   key="mask", line=line,
                                   fix='add image = "input.png" beside the mask')
            if not family.supports_inpainting:
                raise JobFileError(f"{family.display_name} has no inpainting here", key="mask",
                                   line=line, fix="remove mask")
            path = self.input_image(spec.mask, text, key="mask")
            settings["mask"] = spec.mask
            settings["mask_path"] = str(path)
            settings["mask_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        if spec.hires is None:
            return settings
        line = line_of_key(text, "hires") or line_of_key(text, "scale")
        if not family.supports_hires:
            raise JobFileError(f"{family.display_name} has no hires fix", key="hires", line=line,
                               fix="remove [hires], or render at the size you want")
        if img2img:
            raise JobFileError("[hires] is for text-to-image; this job gives an `image`",
                               key="hires", line=line,
                               fix="remove [hires], or set the img2img width/height larger")
        if spec.hires.get("sampler"):
            try:
                choose_sampler(spec.hires["sampler"], None, family.sampler_kind)
            except SamplerError as exc:
                raise JobFileError(f"hires.sampler: {exc}", key="hires.sampler", line=line,
                                   fix="use one of: "
                                   + ", ".join(samplers_for_kind(family.sampler_kind))) from exc
        hires, upscaler_model = resolve_upscaler(spec.hires, self.config.postprocess, text,
                                                 warnings)
        target_w, target_h = hires_target(width, height, spec.hires, d.size_multiple)
        limits = self.config.limits
        if not (64 <= target_w <= limits.max_width and 64 <= target_h <= limits.max_height):
            raise JobFileError(f"the hires size {target_w}x{target_h} is out of range (64 to "
                               f"{limits.max_width}x{limits.max_height}, limits in config.toml)",
                               key="hires", line=line, fix="use a smaller scale or size")
        if "scale" in spec.hires and (target_w, target_h) != (
                int(width * spec.hires["scale"]), int(height * spec.hires["scale"])):
            warnings.append(f"hires: {width}x{height} x {spec.hires['scale']:g} renders at "
                            f"{target_w}x{target_h} ({family.display_name} needs multiples "
                            f"of {d.size_multiple})")
        settings["hires"] = dict(hires)
        if upscaler_model is not None:
            settings["hires_upscaler_model"] = str(upscaler_model)
        return settings

    def input_image(self, name: str, text: str, key: str = "image") -> Path:
        """The image a job names (`key`: image, or an inpainting mask), which must lie inside
        a configured inputs folder (no absolute paths, no `..`, no symlink leading out) and
        open as an image."""
        real = find_input_file(name, self.config.paths.input_roots, key, text,
                               example=f'{key} = "start.png"', kind="image")
        try:
            with Image.open(real) as image:
                image.verify()
        except Exception as exc:
            raise JobFileError(f"`{key}` = {name!r} cannot be read as an image ({exc})",
                               key=key, line=line_of_key(text, key),
                               fix="save it again as PNG, JPEG or WEBP") from exc
        return real

    def _resolve_loras(self, spec: JobSpec, family: Family, checkpoint: CheckpointInfo,
                       text: str, warnings: list[str]) -> tuple[str, tuple[LoraUse, ...]]:
        """The job's LoRAs from `[[loras]]` and `<lora:...>` prompt tags, each checked against
        the library, the checkpoint's architecture and its lineage. Returns the prompt without
        tags (plus trigger words when asked) and the LoRAs to apply."""
        try:
            prompt, tagged = extract_lora_tags(spec.prompt)
        except PromptTagError as exc:
            raise JobFileError(str(exc), key="prompt", line=line_of_key(text, "prompt"),
                               fix="write tags as <lora:NAME:WEIGHT>") from exc
        wanted = [(lora.name, lora.strength, lora.text_encoder_strength, "loras")
                  for lora in spec.loras]
        # Named without a strength: the LoRA's own preferred weight (A1111 NAME.json) applies.
        unweighted = {lora.name for lora in spec.loras if not lora.strength_given}
        unweighted |= {match.group(1).strip() for match in _BARE_LORA_TAG.finditer(spec.prompt)}
        experts = {lora.name: lora.expert for lora in spec.loras if lora.expert}
        wanted += [(tag.name, tag.strength, tag.text_encoder_strength, "prompt")
                   for tag in tagged]
        names = [name for name, *_ in wanted]
        for name in names:
            if names.count(name) > 1:
                raise JobFileError(f"LoRA {name!r} is named twice", key="loras",
                                   line=line_of_key(text, "loras"),
                                   fix="name each LoRA once, in [[loras]] or as a prompt tag")
        uses: list[LoraUse] = []
        triggers: list[str] = []
        for name, strength, te_strength, where in wanted:
            key = "loras" if where == "loras" else "prompt"
            line = line_of_key(text, key) or line_of_key(text, "name")
            try:
                by_hash = self.library.find_by_hash(spec.lora_hashes.get(name, ""))
                infos = [by_hash] if by_hash else self.library.resolve_all(name)
            except LoraLookupError as exc:
                raise JobFileError(str(exc), key=key, line=line,
                                   fix="put the .safetensors file under "
                                       f"{self.config.paths.loras}, or fix the name") from exc
            for info in infos:
                self._check_lora_fits(info, family, checkpoint, spec, key, line, warnings)
                preferred = preferred_weight(info.path) if name in unweighted else None
                if preferred is not None:
                    strength, te_strength = preferred, None
                # A HIGH/LOW pair is two files, each for its own expert.
                expert = experts.get(name) if len(infos) == 1 else info.expert
                uses.append(LoraUse(name=info.name, strength=strength,
                                    text_encoder_strength=te_strength, autov2=info.autov2,
                                    autov3=info.autov3, expert=expert or info.expert))
                if spec.trigger_words:
                    triggers += [t for t in info.triggers
                                 if t not in prompt and t not in triggers]
        if triggers:
            prompt = f"{prompt}, {', '.join(triggers)}"
        return prompt, tuple(uses)

    def _check_lora_fits(self, info: LoraInfo, family: Family, checkpoint: CheckpointInfo,
                         spec: JobSpec, key: str, line: int | None,
                         warnings: list[str]) -> None:
        """Refuse a LoRA of another architecture, size or lineage; warn when unsure."""
        if info.architecture != family.architecture:
            raise JobFileError(
                f"LoRA {info.name!r} is for {info.family} ({info.architecture} architecture) "
                f"but checkpoint {checkpoint.name!r} is {family.display_name} "
                f"({family.architecture}); a LoRA only works on the architecture it was "
                "trained for", key=key, line=line,
                fix=f"use a {family.display_name} LoRA, or a {info.family} checkpoint")
        misfit = family.lora_fits(info.variant, checkpoint.variant)
        if misfit:
            raise JobFileError(f"LoRA {info.name!r} does not fit checkpoint {checkpoint.name!r}: "
                               f"{misfit}", key=key, line=line,
                               fix="use a LoRA trained for this model size/variant")
        lora_lineage, model_lineage = info.lineage, checkpoint.lineage
        if lora_lineage and model_lineage and lora_lineage != model_lineage:
            message = (f"LoRA {info.name!r} is {lora_lineage} lineage ({info.lineage_source}) but "
                       f"checkpoint {checkpoint.name!r} is {model_lineage}; {lora_lineage} "
                       f"LoRAs do not carry over to {model_lineage} models")
            if not spec.allow_cross_lineage:
                raise JobFileError(
                    message, key=key, line=line,
                    fix="use a LoRA of the checkpoint's lineage, set allow_cross_lineage = "
                        "true to try anyway, or correct the lineage in a sidecar "
                        f"{info.name}.toml (lineage = \"...\") if the guess is wrong")
            warnings.append(message + " (allowed by allow_cross_lineage)")
        elif not lora_lineage or not model_lineage:
            unknown = [what for what, value in (("LoRA " + repr(info.name), lora_lineage),
                                                ("checkpoint " + repr(checkpoint.name),
                                                 model_lineage)) if not value]
            warnings.append(f"lineage unknown for {' and '.join(unknown)}; cannot check "
                            "that they match (set lineage in a sidecar NAME.toml)")

    # -- accepting and rejecting -----------------------------------------------------------

    def _accept(self, path: Path, content_hash: str, spec: JobSpec,
                renders: list[RenderSpec], warnings: list[str]) -> int:
        with self.store.session() as session:
            if not self.store.is_sqlite:
                # Another host may be taking a copy of this content right now, past the same
                # twin check: one at a time per content, and look again (SQLite has one
                # writer, so the check before this one cannot be overtaken there).
                session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:content))"),
                                {"content": content_hash})
                twin = session.execute(select(Job.id, Job.file_name).where(
                    Job.content_hash == content_hash,
                    Job.state.in_(UNFINISHED_JOB_STATES))).first()
                if twin is not None:
                    raise _QueuedMeanwhile(twin.id, twin.file_name)
            # The file's place now is this daemon's claim folder: if the daemon dies before
            # the move below, whoever ends the job files it from there.
            job = Job(name=path.stem, file_name=path.name, file_path=str(path),
                      content_hash=content_hash, state=JOB_QUEUED, priority=spec.priority,
                      spec_json=spec.to_json(), warnings_json=json.dumps(warnings))
            session.add(job)
            session.flush()
            for index, render in enumerate(renders):
                session.add(Render(job_id=job.id, index=index, seed=render.seed,
                                   state=RENDER_QUEUED, priority=spec.priority,
                                   checkpoint=render.checkpoint, batch_key=render.batch_key(),
                                   spec_json=render.to_json()))
            add_event(session, "job_accepted", f"{path.name}: {len(renders)} render(s)",
                      job_id=job.id, renders=len(renders), warnings=warnings)
            job_id = job.id
        self._move_accepted(job_id, path)
        self.plugins.notify("job_accepted", path.name, {"job_id": job_id})
        return job_id

    def _move_accepted(self, job_id: int, path: Path) -> None:
        target = unique_destination(self.folder("processing"), path.name, job_id)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return  # moved meanwhile (a cancel, or a daemon filing it): its row says where
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is not None:
                job.file_path = str(target)

    def _reject(self, path: Path, raw: bytes, error: JobFileError, result: ScanResult,
                duplicate_of: int | None = None) -> None:
        report = f"{path.name} was not accepted.\n\n{error.report()}\n"
        with self.store.session() as session:
            job = Job(name=path.stem, file_name=path.name,
                      content_hash=hashlib.sha256(raw).hexdigest(), state=JOB_REJECTED,
                      error=error.report(), finished_at=utcnow())
            session.add(job)
            session.flush()
            add_event(session, "job_rejected", f"{path.name}: {error.what}", job_id=job.id,
                      key=error.key, line=error.line, duplicate_of=duplicate_of)
            job_id = job.id
        target = unique_destination(self.folder("rejected"), path.name, job_id)
        os.replace(path, target)
        write_error_file(target, report)
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is not None:
                job.file_path = str(target)
        result.rejected.append(path.name)
        log.warning("rejected %s: %s", path.name, error.what)
        self.plugins.notify("job_rejected", path.name, {"job_id": job_id, "error": error.what})

    # -- finishing and start-up repair -----------------------------------------------------

    def file_finished_job(self, job_id: int) -> None:
        """Move a finished job's file from processing/ to done/ or failed/ (with its error
        report), following the state the database already holds. The daemon's JobEnd
        (daemon/runtime/job_end.py) calls it as it acts on the job's end."""
        self._file_finished(job_id, None)

    def _file_finished(self, job_id: int, current: Path | None) -> bool:
        """File job `job_id`'s file, found at `current` (None: where its row says); True
        when this call moved it. Several daemons may try at once (one ends the job, another
        repairs what a dead one left): the first rename wins and the others find it gone."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state not in (JOB_DONE, JOB_FAILED):
                return False
            if current is None:
                if job.file_path is None:
                    return False
                current = Path(job.file_path)
            folder = "done" if job.state == JOB_DONE else "failed"
            if current.parent == self.folder(folder) or not current.exists():
                return False
            failures = [f"render {r.index} (seed {r.seed}): {r.error}"
                        for r in job.renders if r.state == "failed"]
            file_name = job.file_name
        target = unique_destination(self.folder(folder), file_name, job_id)
        try:
            os.replace(current, target)
        except FileNotFoundError:
            return False  # another daemon filed it, or put it back in jobs/ to be filed there
        if folder == "failed":
            write_error_file(target, f"{file_name} (job {job_id}) failed.\n\n"
                             + "\n".join(failures) + "\n\nHow to fix: read each reason above; "
                             "`lorafarm history --json` has the details. Drop the file into "
                             "jobs/ again to re-run it.\n")
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is not None:
                job.file_path = str(target)
        return True

    def file_stranded_jobs(self, older_than: float) -> tuple[list[int], int]:
        """File the files of jobs that ended more than `older_than` seconds ago but whose
        file is still in processing/ or a claim folder: the daemon that ended the job died
        before it moved the file (a living one, or a cancel, moves it at once). Returns the
        jobs filed, and how many such files are younger than that (maybe still moving)."""
        cutoff = utcnow() - timedelta(seconds=older_than)
        processing = self.folder("processing")
        with self.store.session() as session:
            rows = list(session.execute(select(Job.id, Job.file_path, Job.finished_at).where(
                Job.state.in_((JOB_DONE, JOB_FAILED)),
                Job.file_path.startswith(str(processing) + os.sep, autoescape=True)
                | Job.file_path.startswith(str(self.jobs_dir / CLAIM_FOLDER_PREFIX),
                                           autoescape=True))))
        filed, waiting = [], 0
        for job_id, file_path, finished_at in rows:
            current = Path(file_path)
            left_here = current.parent == processing or (
                current.parent.parent == self.jobs_dir
                and current.parent.name.startswith(CLAIM_FOLDER_PREFIX))
            if not left_here or not current.exists():
                continue  # another folder (LIKE ignores case on SQLite), or on its way
            if finished_at is not None and finished_at > cutoff:
                waiting += 1
            elif self._file_finished(job_id, None):
                filed.append(job_id)
        return filed, waiting

    def reconcile(self) -> None:
        """Repair what a crash can leave between a database write and a file move."""
        self.return_claims()
        with self.store.session() as session:
            jobs = [(j.id, j.state, j.closed_at is not None, j.file_path, j.file_name,
                     j.content_hash)
                    for j in session.scalars(select(Job).where(
                        Job.state.in_((JOB_QUEUED, "running", JOB_DONE, JOB_FAILED))))]
        for job_id, state, closed, file_path, file_name, content_hash in jobs:
            if file_path is None or not Path(file_path).exists():
                # Moved to processing/ by a daemon that died before recording where.
                file_path = self._adopt_processing_file(job_id, file_name, content_hash)
            if state in (JOB_DONE, JOB_FAILED):
                # An end not acted on yet is the daemon's JobEnd's to act on (it files the
                # file with the rest); here, the file of an end acted on before a crash.
                if closed:
                    self.file_finished_job(job_id)
            elif file_path is None or not Path(file_path).exists():
                dropped = self.jobs_dir / file_name
                if dropped.exists():
                    self._move_accepted(job_id, dropped)

    def _adopt_processing_file(self, job_id: int, file_name: str,
                               content_hash: str) -> str | None:
        """The job's file in processing/ (under the name the move gives it), recorded as its
        place, when its content is the job's and no other job's row names it; else None."""
        stem, suffix = Path(file_name).stem, Path(file_name).suffix
        for candidate in (self.folder("processing") / file_name,
                          self.folder("processing") / f"{stem}.job{job_id}{suffix}"):
            try:
                if hashlib.sha256(candidate.read_bytes()).hexdigest() != content_hash:
                    continue
            except OSError:
                continue
            with self.store.session() as session:
                if session.scalars(select(Job.id).where(
                        Job.file_path == str(candidate), Job.id != job_id)).first() is not None:
                    continue
                job = session.get(Job, job_id)
                if job is None:
                    return None
                job.file_path = str(candidate)
            return str(candidate)
        return None


class _QueuedMeanwhile(Exception):
    """Another host queued the same content between our twin check and our insert."""

    def __init__(self, job_id: int, file_name: str) -> None:
        super().__init__(job_id, file_name)
        self.job_id, self.file_name = job_id, file_name


class _WakeupHandler(FileSystemEventHandler):
    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == "closed":
            self.intake.note_closed(Path(str(event.src_path)))
        self.intake.wakeup.set()


@functools.lru_cache(maxsize=64)
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_hash(path: Path) -> str:
    """sha256 of a file, computed once per version of it (a VAE is hashed at intake)."""
    stat = path.stat()
    return _file_hash(path, stat.st_size, stat.st_mtime_ns)


def _draw(wildcards: Wildcards, template: str | None, seed: int) -> str | None:
    if template is None or not has_dynamic_syntax(template):
        return template
    return wildcards.random(template, seed, "negative_prompt")


