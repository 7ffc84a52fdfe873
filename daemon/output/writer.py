"""Encoding and writing outputs off the render thread, so the GPU never waits for PNG or MP4
encoding.

The worker hands each finished image or clip to this writer and claims its next batch at
once. A render stays `running` until its file is complete and renamed in; only then is it
recorded done. A crash in between leaves it running, and the next start renders it again.
A full disk is not the render's fault: the render goes back to the queue (the attempt is
counted, so a disk that stays full ends it failed after the cap) and nothing else is harmed.
Every item taken is settled: anything else that raises while writing ends that render failed
with the reason (an unsettled render would stay `running` forever, its lease kept fresh by
the heartbeat), and a plugin's metadata or post-processing that raises costs only its extra.
"""

from __future__ import annotations

import errno
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from daemon.config import PostprocessStep
from daemon.contract.family import Family, RenderedVideo
from daemon.contract.faults import (
    PLUGIN_ERRORS,
    describe_fault,
    fault_frame,
    fault_key,
    owner_files,
)
from daemon.contract.loader import Plugins
from daemon.contract.results import PostProcessResult
from daemon.folders import TEMP_PREFIX, output_path
from daemon.output.files import write_mp4, write_png
from daemon.output.postprocess import record_result
from daemon.queue.lifecycle import mark_done, mark_failed, put_back
from daemon.queue.scheduler import ClaimedRender
from daemon.store.models import Store, add_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingOutput:
    claimed: ClaimedRender
    result: Any  # PIL image or RenderedVideo
    family: Family
    model_hash: str | None
    seconds: float  # this render's share of the pipeline call
    lora_report: dict[str, dict[str, int]]


class OutputWriter:
    """Outputs handed over by the workers, written in order by one thread. The daemon runs
    that thread: it calls `write_next` in a loop, acts on the jobs each write ended (the
    one owner of a job's end, daemon/runtime/job_end.py), then calls `item_settled`; this
    layer never calls up into the daemon."""

    def __init__(self, outputs: Any, store: Store, plugins: Plugins, max_attempts: int,
                 postprocess: tuple[PostprocessStep, ...] = ()) -> None:
        self.outputs = outputs
        self.postprocess = postprocess  # config.toml [[postprocess]], for the post_process hook
        self.max_attempts = max_attempts
        self.store = store
        self.plugins = plugins
        self._queue: queue.Queue[PendingOutput | None] = queue.Queue()

    def submit(self, item: PendingOutput) -> None:
        self._queue.put(item)

    def drain(self) -> None:
        """Wait until everything handed over so far is written and recorded, and the ends
        of jobs it caused acted on."""
        self._queue.join()

    def close(self) -> None:
        """Drain, then end the loop that calls `write_next`."""
        self.drain()
        self._queue.put(None)

    def write_next(self) -> list[int] | None:
        """Wait for the next output and write it, containing whatever that raises: the ids
        of the jobs its recording ended (the caller acts on them, then calls
        `item_settled`), or None once closed."""
        item = self._queue.get()
        if item is None:
            self._queue.task_done()
            return None
        try:
            try:
                return self.write(item)
            except PLUGIN_ERRORS as exc:  # never let one output kill the writer
                return self._settle_broken(item, exc)
        except PLUGIN_ERRORS:
            log.exception("the output writer could not settle a render")
            return []

    def item_settled(self) -> None:
        """The output `write_next` returned is settled, its jobs' ends acted on."""
        self._queue.task_done()

    def _settle_broken(self, item: PendingOutput, exc: BaseException) -> list[int]:
        """A render whose writing raised ends failed with the reason (an unchanged render
        would stay `running`, its lease kept fresh by the heartbeat, forever); when even that
        cannot be recorded it goes back to the queue, the attempt counted."""
        claimed = item.claimed
        owner = item.family if _raised_in(exc, item.family) else None
        whose = (f"family {item.family.name} (plugin "
                 f"{self.plugins.plugin_of_family(item.family.name)!r}) " if owner else "")
        reason = f"writing the output failed: {whose}{describe_fault(exc, owner)}"
        self.plugins.faults.exception(fault_key(exc, "writer"), reason, exc)
        try:
            job = mark_failed(self.store, claimed.render_id, reason, worker=claimed.worker)
        except Exception:
            log.exception("could not record render %d failed; it goes back to the queue",
                          claimed.render_id)
            return list(put_back(self.store, [claimed.render_id], reason, count_attempt=True,
                                 max_attempts=self.max_attempts, worker=claimed.worker))
        return [] if job is None else [job]

    def write(self, item: PendingOutput) -> list[int]:
        """Write and record one output; the ids of the jobs that recording ended."""
        claimed = item.claimed
        spec = claimed.spec
        if item.model_hash and spec.checkpoint_hash != item.model_hash:
            spec = replace(spec, checkpoint_hash=item.model_hash)
        video = isinstance(item.result, RenderedVideo)
        path = output_path(self.outputs, claimed.job_id, claimed.job_name, claimed.index,
                           spec.seed, ".mp4" if video else ".png")
        processed = PostProcessResult()
        try:
            try:
                text = self.plugins.output_metadata(
                    spec, item.family, on_fault=self._extra_skipped(claimed, "metadata_failed"))
                if isinstance(item.result, RenderedVideo):
                    # The poster first: the video is what makes the render count as done.
                    write_png(item.result.frames[0], path.with_suffix(".png"), spec, text)
                    write_mp4(item.result.frames, item.result.fps, path, spec, text)
                else:
                    processed = self._post_process(claimed, spec, item.result, path)
                    image = item.result if processed.image is None else processed.image
                    write_png(image, path, spec, text)
            except BaseException:
                # A half-written file must not wait for the next start to be cleaned up.
                for written in (path, path.with_suffix(".png")):
                    written.with_name(TEMP_PREFIX + written.name).unlink(missing_ok=True)
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("disk full writing %s; the render goes back to the queue", path)
                return list(put_back(self.store, [claimed.render_id],
                                     f"disk full while writing {path.name}",
                                     count_attempt=True, max_attempts=self.max_attempts,
                                     worker=claimed.worker))
            job = mark_failed(self.store, claimed.render_id,
                              f"could not write {path}: {exc.strerror or exc}",
                              worker=claimed.worker)
        else:
            if processed.scores or processed.tags or processed.gate:
                # Before mark_done: a reseed's new render keeps the job open.
                record_result(self.store, claimed.render_id, processed, worker=claimed.worker)
            frames = (len(item.result.frames), item.result.fps) if video else None
            job = mark_done(self.store, claimed.render_id, str(path), item.seconds,
                            lora_report=item.lora_report, video=frames, worker=claimed.worker)
        return [] if job is None else [job]

    def _post_process(self, claimed: ClaimedRender, spec: Any, image: Any,
                      path: Path) -> PostProcessResult:
        # Runs on this thread, not the worker's: an upscaler or tagger never holds up the
        # next pipeline call. A broken post-processor costs its extras, never the render.
        return self.plugins.post_process(
            spec, image, path, self.postprocess,
            on_fault=self._extra_skipped(claimed, "postprocess_failed", path.name))

    def _extra_skipped(self, claimed: ClaimedRender, kind: str,
                       prefix: str = "") -> Callable[[str, str], None]:
        """Records, as an event of `kind`, that a plugin's extra (metadata entries, a
        post-processing result) was left out of this render's output."""
        def record(plugin: str, reason: str) -> None:
            with self.store.session() as session:
                add_event(session, kind, f"{prefix}: {reason}" if prefix else reason,
                          job_id=claimed.job_id, render_id=claimed.render_id, plugin=plugin)
        return record


def _raised_in(exc: BaseException, family: Family) -> bool:
    """Whether `exc` came through the family's own code (its RenderedVideo, say)."""
    frame = fault_frame(exc, family)
    own = owner_files(family)[:1]
    return bool(frame and own and str(Path(frame.filename).resolve()) == own[0])
