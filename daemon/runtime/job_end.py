"""The end of a job, acted on in one place.

A job ends in many places, each of which only changes the database: the output writer
records its last render done or failed, a worker fails a batch, a broken batch goes back to
the queue at its attempt cap, start-up or the heartbeat gives up on a render a dead process
left running (daemon/queue/lifecycle.py), a user cancels it from the page or from the CLI in
another process (daemon/queue/control.py), a host of a farm ends it and dies. `JobEnd` acts
on every one of those ends, in this order:

1. `write_sweep_grid` (daemon/output/grid.py): the labelled grid of a sweep with done renders;
2. `Intake.file_finished_job` (daemon/intake/hot_folder.py): the job file from processing/ to
   done/, or to failed/ with its report (a cancel has moved it already: nothing to do);
3. `job_finished` to the plugins' `on_event`. The [[webhooks]] send the `job_finished` event
   row, written with the end by `_settle_job`, or for a cancel by `claim_job_end`.

Once per end, whoever gets there: `claim_job_end` sets the job's `closed_at` under the job
row's lock, and only the caller that set it acts; a second call, this daemon's own or
another host's, does nothing. The claim comes before the work, so a daemon killed in
between loses that job's grid and plugin event (never sends them twice); its file is still
filed, by `Intake.reconcile` at the next start or `Intake.file_stranded_jobs` on a farm.

How an end reaches it: `ended(job_id)` at once, when this process ended the job (the daemon's
writer and worker loops, with the job ids `OutputWriter.write_next` and `Worker.render`
return; the page's cancel; start-up recovery), and
`sweep()` for ends nobody here saw (the CLI's cancel, a dead host's, a daemon killed before
it acted): at start-up, on every heartbeat, and before `run --until-idle` leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from daemon.contract.loader import Plugins
from daemon.output.grid import write_sweep_grid
from daemon.queue.lifecycle import claim_job_end, unclosed_jobs
from daemon.store.models import Store

log = logging.getLogger(__name__)


class JobEnd:
    """Acts on the end of jobs of one daemon. `file_job(job_id)` files a job's file: the
    daemon's `Intake.file_finished_job` (a test passes its own)."""

    def __init__(self, store: Store, outputs: Path, file_job: Callable[[int], object],
                 plugins: Plugins) -> None:
        self.store = store
        self.outputs = outputs
        self.file_job = file_job
        self.plugins = plugins

    def ended(self, job_id: int) -> bool:
        """Act on job `job_id`'s end, unless it has not ended or its end has been acted on;
        True when this call acted. Never raises: an end not claimed here is found by the
        next `sweep`, and a grid or file that fails is logged (the renders are done)."""
        try:
            if not claim_job_end(self.store, job_id):
                return False
        except Exception:
            log.exception("could not claim the end of job %d; the next sweep tries again",
                          job_id)
            return False
        try:
            write_sweep_grid(self.store, self.outputs, job_id)
        except Exception:  # a grid is a convenience; the renders themselves are done
            log.exception("could not write the sweep grid of job %d", job_id)
        try:
            self.file_job(job_id)
        except Exception:
            log.exception("could not file the job file of job %d; it is filed at the next "
                          "start", job_id)
        self.plugins.notify("job_finished", str(job_id), {"job_id": job_id})
        return True

    def sweep(self, older_than: float) -> int:
        """Act on the jobs that ended more than `older_than` seconds ago with their end not
        acted on. Returns how many ended more recently: left to the process that ended them
        (a cancel moves its file just after its commit), for a later sweep if it does not."""
        ready, waiting = unclosed_jobs(self.store, older_than)
        for job_id in ready:
            self.ended(job_id)
        return waiting
