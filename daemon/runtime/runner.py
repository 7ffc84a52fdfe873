"""The daemon's main loop: start-up repair, the intake thread, and claim -> render -> record.

Signals: the first SIGINT/SIGTERM lets the current batch finish and then exits cleanly; a
second one aborts the batch (its renders go back to the queue without using an attempt).
Only one daemon may own a state folder at a time (an exclusive lock on state/daemon.lock):
SQLite wants a single writer, and two daemons would render everything twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

from sqlalchemy import select

from daemon.config import Config
from daemon.contract.family import Family
from daemon.contract.faults import PLUGIN_ERRORS, FaultLog, describe_fault, fault_key
from daemon.contract.loader import Plugins
from daemon.contract.spec import RenderSpec
from daemon.intake.hot_folder import CLAIM_FOLDER_PREFIX, Intake, Submitted
from daemon.library.loras import LoraLibrary
from daemon.library.registry import Registry, live_hosts
from daemon.output.files import remove_leftover_temporaries
from daemon.output.report import DrainWatch
from daemon.output.writer import OutputWriter
from daemon.queue.control import is_paused
from daemon.queue.hosts import (
    forget_dead_hosts,
    forget_dead_inventories,
    heartbeat,
    register_host,
    stop_host,
)
from daemon.queue.lifecycle import put_back, recover_interrupted, stale_outputs
from daemon.queue.scheduler import (
    ClaimedRender,
    Inventory,
    claim_batch,
    next_head,
    peek_next_checkpoint,
)
from daemon.render.worker import Worker
from daemon.runtime.console import quiet_libraries
from daemon.runtime.job_end import JobEnd
from daemon.store.models import RENDER_QUEUED, RENDER_RUNNING, Host, Render, Store, add_event
from daemon.store.state_lock import DaemonLockedError, StateLock
from daemon.web.server import WebHandle, WebStartError, create_app, serve_in_thread
from daemon.web.webhooks import Webhooks

log = logging.getLogger(__name__)

# How long a job may have ended with its end not acted on (JobEnd) before this daemon acts
# on it, and, when leaving with --until-idle, before it files a file another daemon left (the
# heartbeat waits lease_seconds for that): the process that ended it is likely at it.
STRANDED_GRACE_SECONDS = 5.0
STARTUP_WAIT_SECONDS = 60.0  # a job posted while the daemon scans its models waits this long


__all__ = ["Daemon", "DaemonLockedError"]


class Daemon:
    """One lorafarm daemon. `name` identifies it among the hosts of a farm sharing one
    PostgreSQL database (default: `default_name`, the same across restarts on one state
    folder); its inventory of models and LoRAs is kept under `name` when given, else under
    the host name, so that a restart finds its index (and hashes) again."""

    def __init__(self, config: Config, plugins: Plugins | None = None,
                 name: str | None = None) -> None:
        # Nothing may ever be downloaded at run time: make the hub client refuse.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        quiet_libraries()
        self.config = config
        self.plugins = plugins or Plugins(config.plugins)
        config.ensure_folders()
        self.store = Store.for_url(config.database_url, pool_size=config.database_pool_size)
        self.farm = not self.store.is_sqlite  # several daemons may share this database
        self.name = name or default_name(config)
        self.inventory_host = name or socket.gethostname()
        self.registry = Registry(config, self.store, self.plugins, host=self.inventory_host)
        self.library = LoraLibrary(config, self.store, self.plugins, host=self.inventory_host)
        self.intake = Intake(config, self.store, self.registry, self.library, self.plugins,
                             owner=self.name)
        # Every end of a job, wherever it happens, is acted on here (sweep grid, job file,
        # `job_finished`): at once for ends in this process, by `sweep` for the others.
        self.job_end = JobEnd(self.store, config.paths.outputs, self.intake.file_finished_job,
                              self.plugins)
        self.writer = OutputWriter(config.paths.outputs, self.store, self.plugins,
                                   config.worker.max_attempts, postprocess=config.postprocess)
        self._writer_thread = threading.Thread(target=self._write_outputs,
                                               name="output-writer", daemon=True)
        self._writer_thread.start()
        # Header-read weight sizes of checkpoints no worker has loaded yet (`_batch_limit`).
        self._weight_estimates: dict[tuple[str, str, str, str], int] = {}
        self._cost_faults = FaultLog()  # a family's broken estimate is logged once
        self.workers = [
            Worker(config, self.store, self.registry, self.library, self.plugins, self.writer,
                   name=f"{self.name}/w{i}", device=device)
            for i, device in enumerate(config.worker_devices)
        ]
        self._stop = threading.Event()
        self._work = threading.Event()
        self._aborted = False
        self._signals = 0
        self._state_lock = StateLock(config.paths.state)
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.web: WebHandle | None = None
        self._started = threading.Event()  # start-up scans done: jobs may come over HTTP
        self.drain_watch = DrainWatch(config, self.store)
        self.webhooks = Webhooks(config, self.store, self._page_url, host=self.name)

    @property
    def worker(self) -> Worker:
        return self.workers[0]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._acquire_lock()
        self.store.migrate()
        self.webhooks.start()
        if self.config.web.enabled:
            try:
                self.web = serve_in_thread(self.config, create_app(
                    self.config, lambda: Store.for_url(self.config.database_url,
                                                   pool_size=self.config.database_pool_size),
                    plugins=self.plugins, submit=self._submit, job_ended=self.job_end.ended))
                log.info("status page: %s", self.web.url)
            except WebStartError as exc:
                log.error("%s; rendering goes on without the page", exc)
        if self.farm:
            # Others may be rendering: take back only our own earlier renders and those
            # whose lease expired.
            requeued, ended = recover_interrupted(
                self.store, self.config.worker.max_attempts, holder_prefix=f"{self.name}/",
                lease_seconds=self.config.lease_seconds)
        else:
            requeued, ended = recover_interrupted(self.store, self.config.worker.max_attempts)
        register_host(self.store, self.name, [str(w.device) for w in self.workers])
        forget_dead_hosts(self.store, self.config)
        self._check_postprocess_models()
        forget_dead_inventories(self.store, self.config, keep=self.inventory_host,
                                lone=not self.farm)
        if requeued:
            log.info("re-queued %d render(s) interrupted by the last shutdown", len(requeued))
        remove_leftover_temporaries(self.config.paths.outputs)
        for path in stale_outputs(self.store, self.config.paths.outputs):
            log.info("removing %s: its render was not recorded done and runs again", path)
            path.unlink(missing_ok=True)
        self.intake.ensure_folders()
        if not self.farm:
            # Holding the state lock, this daemon is the only one there is: every claim
            # folder is a dead daemon's (an earlier life under another name included), and
            # its files go back to jobs/ before intake begins.
            self.intake.return_claims(everyone=True)
        self.intake.reconcile()
        for job_id in ended:
            self.job_end.ended(job_id)
        # Ends nobody acted on: this daemon killed before it did, a cancel from the CLI while
        # it was stopped. On a farm, one that ended a moment ago is its own host's to act on.
        self.job_end.sweep(older_than=STRANDED_GRACE_SECONDS if self.farm else 0)
        if not self.farm:
            # Jobs that ended with their file left in processing/: no other daemon can be
            # moving it, so no grace to wait.
            self.intake.file_stranded_jobs(older_than=0)
        self.registry.scan()
        self.library.scan()
        self.intake.scan()
        with self.store.session() as session:
            add_event(session, "daemon_started", f"pid {os.getpid()}", pid=os.getpid(),
                      devices=[str(w.device) for w in self.workers])
        self._started.set()

    def _submit(self, file_name: str, raw: bytes) -> Submitted:
        """A job posted to the page: checked once the registry and library have been
        scanned at start-up (before, every checkpoint would look unknown)."""
        if not self._started.wait(timeout=STARTUP_WAIT_SECONDS):
            raise RuntimeError("the daemon is still starting (scanning models); send the job "
                               "again in a minute")
        try:
            return self.intake.submit(file_name, raw)
        finally:
            self._work.set()  # a waiting worker claims it now, not at its next poll

    def _page_url(self) -> str | None:
        return self.web.url if self.web is not None else None

    def stop(self) -> None:
        self._stop.set()
        self._work.set()
        self.intake.wakeup.set()

    def abort(self) -> None:
        """Stop now: running batches are interrupted at their next step and re-queued."""
        self._aborted = True
        for worker in self.workers:
            worker.abort.set()
        self.stop()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop()
        self.intake.stop_watching()
        for thread in self._threads:
            thread.join(timeout=600)
        self.writer.close()
        self._writer_thread.join(timeout=30)
        for worker in self.workers:
            worker.close()
        self.registry.close()
        self.webhooks.close()  # after the writer: its last events are committed
        if self.web is not None:
            self.web.stop()
            self.web = None
        stop_host(self.store, self.name)
        with self.store.session() as session:
            add_event(session, "daemon_stopped", f"pid {os.getpid()}")
        self.store.dispose()
        self._release_lock()

    def run(self, *, until_idle: bool = False, install_signals: bool = False) -> int:
        """Run until stopped (or, with until_idle, until nothing is left to do).
        Returns the process exit code."""
        if install_signals:
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)
        self.start()
        self.intake.start_watching()
        self._threads = [threading.Thread(target=self._intake_loop, name="intake", daemon=True),
                         threading.Thread(target=self._heartbeat_loop, name="heartbeat",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._worker_loop, args=(worker,),
                                           name=f"worker-{worker.name}", daemon=True)
                          for worker in self.workers]
        for thread in self._threads:
            thread.start()
        try:
            while not self._stop.is_set():
                self.drain_watch.check()
                if until_idle and self._idle():
                    break
                self._stop.wait(timeout=0.25)
        except KeyboardInterrupt:
            self.abort()
        finally:
            self.close()
        return 130 if self._aborted else 0

    # -- loops -----------------------------------------------------------------------------

    def _worker_loop(self, worker: Worker) -> None:
        busy_since: float | None = None
        while not self._stop.is_set():
            if self._paused():
                busy_since = None
                self._work.wait(timeout=1.0)
                continue
            # Wall time counts from the end of the previous batch while work keeps coming:
            # claims, loads and hand-offs between pipeline calls are part of it.
            cycle_start = busy_since if busy_since is not None else time.perf_counter()
            try:
                # The head first (a read), then its batch sized by the family's memory
                # estimate outside any transaction, then the claim of that many.
                head = next_head(
                    self.store, loaded=worker.loaded_checkpoints,
                    active_key=worker.active_batch_key,
                    max_wait_seconds=self.config.worker.max_wait_seconds,
                    inventory=self._inventory() if self.farm else None)
                batch = [] if head is None else claim_batch(
                    self.store, head, self._batch_limit(worker, head.spec),
                    worker=worker.name, device=str(worker.device))
            except PLUGIN_ERRORS:
                log.exception("%s: claiming failed; retrying", worker.name)
                self._stop.wait(timeout=1.0)
                continue
            if head is not None and not batch:
                continue  # another worker took that batch meanwhile: look again
            if not batch:
                busy_since = None
                self._work.wait(timeout=0.5)
                self._work.clear()
                continue
            try:
                worker.prefetch(peek_next_checkpoint(
                    self.store, [*worker.loaded_checkpoints, batch[0].spec.checkpoint]))
                ended = worker.render(batch, since=cycle_start)
            except PLUGIN_ERRORS:
                # Rendering errors end renders failed inside render(); what gets here is the
                # bookkeeping failing (the database went away, a deadlock victim). The batch
                # goes back to the queue (the attempt counts) and this worker goes on: a dead
                # worker thread would hold its renders, their leases kept fresh, forever.
                log.exception("%s: a batch broke off; its renders go back to the queue",
                              worker.name)
                self._put_back_broken(batch)
                self._stop.wait(timeout=1.0)
            else:
                self._act_on_ends(ended)
            busy_since = time.perf_counter()
            if worker.abort.is_set():
                break

    def _write_outputs(self) -> None:
        """The output writer's thread: each output written in order, then the ends of jobs
        its recording caused acted on, before the next."""
        while (ended := self.writer.write_next()) is not None:
            try:
                self._act_on_ends(ended)
            finally:
                self.writer.item_settled()

    def _act_on_ends(self, job_ids: list[int]) -> None:
        """Hand ended jobs to their owner. Nothing escapes: the writer's and the workers'
        threads must outlive any grid, filing or plugin failure (an end not acted on here is
        found again by the heartbeat's sweep)."""
        for job_id in job_ids:
            try:
                self.job_end.ended(job_id)
            except PLUGIN_ERRORS:
                log.exception("acting on the end of job %d failed; the next sweep retries",
                              job_id)

    def _put_back_broken(self, batch: list[ClaimedRender]) -> None:
        try:
            self.writer.drain()  # what was rendered is recorded first
            for job_id in put_back(self.store, [c.render_id for c in batch],
                                   "its batch broke off (see the daemon log); queued again",
                                   count_attempt=True,
                                   max_attempts=self.config.worker.max_attempts,
                                   worker=batch[0].worker):
                self._act_on_ends([job_id])
        except PLUGIN_ERRORS:
            log.exception("could not put the broken batch back; its renders stay running "
                          "until this daemon restarts")

    def _inventory(self) -> Inventory:
        """What this host can render: a host is given only work whose files it has."""
        checkpoints = frozenset(c.name for c in self.registry.all() if c.state == "ok")
        return Inventory(checkpoints=checkpoints, loras=frozenset(self.library.available_autov2()))

    def _heartbeat_loop(self) -> None:
        """Keep this daemon's leases and host row fresh, and hand the renders of daemons
        that stopped heartbeating back to the queue (the attempt cap still holds)."""
        interval = max(0.5, min(10.0, self.config.lease_seconds / 4))
        while not self._stop.wait(timeout=interval):
            try:
                loaded = {w.name: w.loaded_checkpoints for w in self.workers}
                heartbeat(self.store, self.name, loaded)
                _, ended = recover_interrupted(self.store, self.config.worker.max_attempts,
                                               lease_seconds=self.config.lease_seconds)
                self._act_on_ends(ended)
                # Ends in other processes: a cancel from the CLI, a host that died.
                self.job_end.sweep(older_than=STRANDED_GRACE_SECONDS)
                if self.farm:
                    self._return_claims_of_lost_hosts()
                    self.intake.file_stranded_jobs(older_than=self.config.lease_seconds)
                    forget_dead_hosts(self.store, self.config)
            except PLUGIN_ERRORS:
                log.exception("heartbeat failed; will retry")

    def _return_claims_of_lost_hosts(self) -> None:
        """A host that died between taking a job file into its claim folder and recording
        it leaves the file there; put it back in jobs/ for the living to take. A host with a
        row is lost once its heartbeat is older than the lease (or it stopped); an owner
        with no row (it died before registering, or its row aged out) once its folder has
        not changed for `lease_seconds`."""
        with self.store.session() as session:
            alive = {name.replace("/", "_") for name in live_hosts(session, self.config)}
            known = {name.replace("/", "_") for name in session.scalars(select(Host.name))}
        lost = set()
        for owner, folder in self.intake.claim_folders().items():
            if owner == self.intake.owner or owner in alive:
                continue
            if owner not in known:
                try:
                    idle_for = time.time() - folder.stat().st_mtime
                except OSError:
                    continue  # returned meanwhile
                if idle_for < self.config.lease_seconds:
                    continue
            lost.add(owner)
        if lost and self.intake.return_claims(lost):
            self.intake.wakeup.set()

    def _check_postprocess_models(self) -> None:
        """Say at start, once, when a [[postprocess]] model file is not there: the night's
        images are then written without that step (each one's event says so too), and a
        user reading the log at bedtime can still fix it."""
        for step in self.config.postprocess:
            if step.model.is_file():
                continue
            message = (f"post-processing model {step.model} ({step.kind}) does not exist; "
                       "images are written without this step until it does: fix "
                       "[[postprocess]] model in config.toml or put the file there")
            log.error(message)
            with self.store.session() as session:
                add_event(session, "postprocess_model_missing", message)

    def _batch_limit(self, worker: Worker, spec: RenderSpec) -> int:
        """How many renders like `spec` fit `worker`'s memory budget in one call: the budget,
        less the checkpoint's weights on the device (measured once loaded, else estimated
        from its files' headers for the worker's dtype and offload mode), over the family's
        per-render cost."""
        family = self.plugins.families.get(spec.family)
        if worker.vram_budget <= 0 or family is None:
            return self.config.worker.max_batch
        try:
            return self._fitting_batch(worker, family, spec)
        except PLUGIN_ERRORS as exc:
            # A bug in a family's estimates must not stall the queue (every claim would fail
            # and the renders wait for good). A batch of one
            # goes ahead; rendering then says what the family does wrong, if anything.
            self._cost_faults.exception(
                fault_key(exc, "batch_limit", family.name),
                f"family {family.name}'s memory estimate raised: {describe_fault(exc)}; "
                "its renders run one at a time (a bug in that plugin)", exc)
            return 1

    def _fitting_batch(self, worker: Worker, family: Family, spec: RenderSpec) -> int:
        weights = worker.resident_bytes(spec.checkpoint)
        if weights is None:
            # Runs before every claim: the header reads once per checkpoint and setting.
            info = self.registry.known(spec.checkpoint)
            key = (spec.checkpoint, str(worker.dtype), worker.offload,
                   str(info.path) if info else "")
            if key not in self._weight_estimates:
                self._weight_estimates[key] = (
                    family.weights_cost(info.loaded(), worker.dtype, worker.offload)
                    if info is not None else 0)
            weights = self._weight_estimates[key]
        free = worker.vram_budget - weights
        return max(1, int(free // max(1, family.batch_cost(spec))))

    def _paused(self) -> bool:
        return is_paused(self.store)

    def _idle(self) -> bool:
        self.library.scan()
        result = self.intake.scan()
        if result.accepted or result.pending:
            self._work.set()
            return False
        with self.store.session() as session:
            busy = session.scalars(select(Render.id).where(
                Render.state.in_((RENDER_QUEUED, RENDER_RUNNING))).limit(1)).first()
        if busy is None and not self.farm and self.intake.return_claims(everyone=True):
            self.intake.wakeup.set()  # a claim folder held files: they are work
            return False
        if busy is None and self.farm:
            # A file in another host's claim folder is work too: that host records it in a
            # moment, or its lease runs out and the file comes back to jobs/ for us. A file
            # that cannot come back has been reported; it is not waited for.
            stuck = set(self.intake.stuck_claims())
            if any(path not in stuck
                   for path in self.config.paths.jobs.glob(f"{CLAIM_FOLDER_PREFIX}*/*")):
                return False
            # Before leaving, file what a dead host left: a job it ended but did not move
            # (after a grace, as a living host or a cancel moves its file at once).
            _, waiting = self.intake.file_stranded_jobs(older_than=STRANDED_GRACE_SECONDS)
            if waiting:
                return False
        if busy is None and self.job_end.sweep(older_than=STRANDED_GRACE_SECONDS):
            return False  # a job ended elsewhere a moment ago: its end is acted on first
        return busy is None

    def _intake_loop(self) -> None:
        last_registry_scan = time.monotonic()
        while not self._stop.is_set():
            self.intake.wakeup.wait(timeout=self.config.intake.rescan_seconds)
            self.intake.wakeup.clear()
            if self._stop.is_set():
                break
            # A file still settling needs another look soon even if no event comes.
            time.sleep(min(0.2, self.config.intake.settle_seconds))
            try:
                if time.monotonic() - last_registry_scan > self.config.intake.rescan_seconds:
                    self.registry.scan()
                    last_registry_scan = time.monotonic()
                # LoRAs first: a job dropped with its LoRA should find it in the library.
                self.library.scan()
                result = self.intake.scan()
            except PLUGIN_ERRORS:
                log.exception("intake scan failed; will retry")
                continue
            if result.accepted:
                self._work.set()
            if result.pending:
                self.intake.wakeup.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.warning("%s: finishing the current batch, then stopping (again to abort)",
                        signal.Signals(signum).name)
            self.stop()
        else:
            log.warning("%s again: aborting the running batch", signal.Signals(signum).name)
            self.abort()

    # -- single-owner lock -----------------------------------------------------------------

    def _acquire_lock(self) -> None:
        self._state_lock.acquire()

    def _release_lock(self) -> None:
        self._state_lock.release()


def default_name(config: Config) -> str:
    """A daemon's name without `--name`: the host name and a short hash of the state
    folder's path. A restart on the same state folder is the same daemon (its earlier
    renders and claim folder are its own), and a second daemon on the same host with its own
    state folder is another."""
    state = str(Path(config.paths.state).resolve())
    return f"{socket.gethostname()}-{hashlib.sha256(state.encode()).hexdigest()[:8]}"
