"""Encoding and writing outputs off the render thread, so the GPU never waits for PNG or MP4
encoding.

The worker hands each finished image or clip to this writer and claims its next batch at
once. A render stays `running` until its file is complete and renamed in; only then is it
recorded done. A crash in between leaves it running, and the next start renders it again.
A full disk is not the render's fault: the render goes back to the queue (the attempt is
counted, so a disk that stays full ends it failed after the cap) and nothing else is harmed.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from daemon.config import PostprocessStep
from daemon.family import Family, RenderedVideo
from daemon.lifecycle import mark_done, mark_failed, put_back
from daemon.outputs import output_path, write_mp4, write_png
from daemon.plugins import Plugins
from daemon.postprocess import PostProcessResult, record_result
from daemon.scheduler import ClaimedRender
from daemon.store import Store, add_event

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
    """One background thread writing outputs in order; `on_job_finished(job_id)` is called
    (on the writer thread) when a render's completion ends its job."""

    def __init__(self, outputs: Any, store: Store, plugins: Plugins,
                 on_job_finished: Callable[[int], None], max_attempts: int,
                 postprocess: tuple[PostprocessStep, ...] = ()) -> None:
        self.outputs = outputs
        self.postprocess = postprocess  # config.toml [[postprocess]], for the post_process hook
        self.max_attempts = max_attempts
        self.store = store
        self.plugins = plugins
        self.on_job_finished = on_job_finished
        self._queue: queue.Queue[PendingOutput | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="output-writer", daemon=True)
        self._thread.start()

    def submit(self, item: PendingOutput) -> None:
        self._queue.put(item)

    def drain(self) -> None:
        """Wait until everything handed over so far is written and recorded."""
        self._queue.join()

    def close(self) -> None:
        self.drain()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.write(item)
            except Exception:  # never let one output kill the writer
                log.exception("writing an output failed unexpectedly")
            finally:
                self._queue.task_done()

    def write(self, item: PendingOutput) -> None:
        claimed = item.claimed
        spec = claimed.spec
        if item.model_hash and spec.checkpoint_hash != item.model_hash:
            spec = replace(spec, checkpoint_hash=item.model_hash)
        video = isinstance(item.result, RenderedVideo)
        path = output_path(self.outputs, claimed.job_id, claimed.job_name, claimed.index,
                           spec.seed, ".mp4" if video else ".png")
        processed = PostProcessResult()
        try:
            text = self.plugins.output_metadata(spec, item.family)
            if isinstance(item.result, RenderedVideo):
                # The poster first: the video is what makes the render count as done.
                write_png(item.result.frames[0], path.with_suffix(".png"), spec, text)
                write_mp4(item.result.frames, item.result.fps, path, spec, text)
            else:
                processed = self._post_process(claimed, spec, item.result, path)
                image = item.result if processed.image is None else processed.image
                write_png(image, path, spec, text)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("disk full writing %s; the render goes back to the queue", path)
                for job_id in put_back(self.store, [claimed.render_id],
                                       f"disk full while writing {path.name}",
                                       count_attempt=True, max_attempts=self.max_attempts,
                                       worker=claimed.worker):
                    self.on_job_finished(job_id)
                return
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
        if job is not None:
            self.on_job_finished(job)

    def _post_process(self, claimed: ClaimedRender, spec: Any, image: Any,
                      path: Path) -> PostProcessResult:
        # Runs on this thread, not the worker's: an upscaler or tagger never holds up the
        # next pipeline call. A broken post-processor costs its extras, never the render.
        try:
            return self.plugins.post_process(spec, image, path, self.postprocess)
        except Exception as exc:
            log.exception("post-processing %s failed; writing the image as rendered", path.name)
            with self.store.session() as session:
                add_event(session, "postprocess_failed", f"{path.name}: {exc}",
                          job_id=claimed.job_id, render_id=claimed.render_id)
            return PostProcessResult()
