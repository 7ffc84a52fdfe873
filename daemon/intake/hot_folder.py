"""The hot folder: job files dropped into jobs/ become a job row and one row per render.

Lifecycle (one filesystem, atomic renames):

    jobs/NAME.toml --taken--> jobs/.taking-DAEMON/ --accepted--> jobs/processing/
                   --all renders ended--> jobs/done/ | failed/
                   (--invalid--> jobs/rejected/ + NAME.toml.error.txt)

The database row is written first and the file moved second; `reconcile()` at start-up
repairs the gap a crash can leave between the two. Watcher events are only hints (inotify
drops events on overflow, network shares send none): the folder is rescanned at start and
periodically, and a file is taken only once it is complete.

What a job file says is checked and expanded into renders by `JobResolver`
(daemon/resolver/resolver.py, `self.resolver`), which writes nothing; this module decides
what the file and its rows become.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, text
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon.config import Config
from daemon.contract.faults import PLUGIN_ERRORS, FaultLog, describe_fault, fault_key
from daemon.contract.jobfile import JobFileError, JobSpec
from daemon.contract.loader import Plugins
from daemon.contract.spec import RenderSpec
from daemon.folders import unique_destination, write_error_file
from daemon.intake.guard import UnreadableEntries, unreadable_reason
from daemon.library.embeddings import EmbeddingLibrary
from daemon.library.loras import LoraLibrary
from daemon.library.registry import Registry
from daemon.queue.lifecycle import fault_point
from daemon.resolver.resolver import JobResolver
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
        self.owner = owner.replace("/", "_")  # names this daemon's claim folder
        self.plugins = plugins
        # Checks and expands each job (the pure half of intake); textual-inversion embeddings
        # are indexed in memory there, rescanned for every job.
        self.resolver = JobResolver(config, registry, library,
                                    EmbeddingLibrary(config, plugins), plugins)
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
        except PLUGIN_ERRORS as exc:  # the database went away, say: the file waits in jobs/
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
            spec, renders, warnings = self.resolver.parse(path.name, raw)
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
            spec, renders, warnings = self.resolver.parse(name, raw)
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

