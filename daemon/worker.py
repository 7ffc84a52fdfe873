"""The worker: keeps pipelines loaded, renders a claimed batch in one pipeline call, writes
the outputs and records the results.

One worker serves one device. Pipelines stay loaded between batches (a least-recently-used
cache of `worker.pipelines_in_memory` checkpoints), so a queue that alternates checkpoints
does not reload from disk every time.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from daemon.config import Config
from daemon.family import Family, RenderedVideo, RenderError
from daemon.lifecycle import mark_done, mark_failed
from daemon.lora_library import LoraLibrary
from daemon.lora_patching import AdapterState, apply_loras
from daemon.outputs import output_path, write_mp4, write_png
from daemon.plugins import Plugins
from daemon.registry import Registry
from daemon.scheduler import ClaimedRender
from daemon.store import Store

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # fp16 on CUDA is what every SDXL user runs; CPUs compute fp16 slowly or not at all.
        return torch.float16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if setting not in dtypes:
        raise ValueError(f"worker.dtype must be auto or one of {', '.join(dtypes)}")
    return dtypes[setting]


@dataclass
class _Loaded:
    pipe: Any
    identity: tuple[str, int]  # (path, mtime) when loaded: a replaced file means reload
    adapters: AdapterState = field(default_factory=AdapterState)


@dataclass(frozen=True)
class BatchOutcome:
    done: list[int]
    failed: list[int]
    finished_jobs: list[int]
    seconds_in_pipeline: float


class Worker:
    def __init__(self, config: Config, store: Store, registry: Registry, library: LoraLibrary,
                 plugins: Plugins) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.library = library
        self.plugins = plugins
        self.device = resolve_device(config.worker.device)
        self.dtype = resolve_dtype(config.worker.dtype, self.device)
        self._pipelines: OrderedDict[str, _Loaded] = OrderedDict()
        self.pipeline_loads = 0

    def pipeline_for(self, checkpoint: str, family: Family) -> _Loaded:
        info = self.registry.get(checkpoint)
        if info is None or info.state != "ok":
            reason = info.reason if info else "it is not in the registry any more"
            raise RenderError(f"checkpoint {checkpoint!r} is not usable: {reason}")
        identity = (str(info.path), info.path.stat().st_mtime_ns)
        cached = self._pipelines.get(checkpoint)
        if cached is not None and cached.identity == identity:
            self._pipelines.move_to_end(checkpoint)
            return cached
        while len(self._pipelines) >= self.config.worker.pipelines_in_memory:
            evicted, _ = self._pipelines.popitem(last=False)
            log.info("unloading %s to make room", evicted)
        started = time.perf_counter()
        pipe = family.load_pipeline(info.loaded(), self.device, self.dtype)
        self.pipeline_loads += 1
        log.info("loaded %s (%s) in %.2fs", checkpoint, family.name,
                 time.perf_counter() - started)
        loaded = _Loaded(pipe=pipe, identity=identity)
        self._pipelines[checkpoint] = loaded
        return loaded

    def render(self, batch: list[ClaimedRender]) -> BatchOutcome:
        """Render a claimed batch; every render ends done or failed (or is put back by the
        caller when the batch is aborted with KeyboardInterrupt)."""
        first = batch[0].spec
        family = self.plugins.families.get(first.family)
        done: list[int] = []
        failed: list[int] = []
        finished: list[int] = []
        seconds = 0.0
        try:
            if family is None:
                raise RenderError(f"the {first.family} family plugin is not installed any more")
            loaded = self.pipeline_for(first.checkpoint, family)
            files = {lora.name: self.library.path_for(lora.autov2, lora.name)
                     for lora in first.loras}
            lora_report = apply_loras(loaded.pipe, family, first.loras,
                                      {k: v for k, v in files.items() if v is not None},
                                      loaded.adapters)
            started = time.perf_counter()
            images = family.render_batch(loaded.pipe, [c.spec for c in batch], self.device)
            seconds = time.perf_counter() - started
            if len(images) != len(batch):
                raise RenderError(f"the pipeline returned {len(images)} images for "
                                  f"{len(batch)} renders")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            reason = _reason(exc)
            log.error("batch of %d failed: %s", len(batch), reason)
            for claimed in batch:
                job = mark_failed(self.store, claimed.render_id, reason)
                failed.append(claimed.render_id)
                if job is not None:
                    finished.append(job)
            return BatchOutcome(done, failed, finished, seconds)
        model_hash = self.registry.model_hash(first.checkpoint, wait=True)
        per_render = seconds / len(batch)
        for claimed, image in zip(batch, images, strict=True):
            spec = claimed.spec
            if model_hash and spec.checkpoint_hash != model_hash:
                spec = replace(spec, checkpoint_hash=model_hash)
            video = isinstance(image, RenderedVideo)
            path = output_path(self.config.paths.outputs, claimed.job_id, claimed.job_name,
                               claimed.index, spec.seed, ".mp4" if video else ".png")
            try:
                text = self.plugins.output_metadata(spec, family)
                if isinstance(image, RenderedVideo):
                    # The poster first: the video is what makes the render count as done.
                    write_png(image.frames[0], path.with_suffix(".png"), spec, text)
                    write_mp4(image.frames, image.fps, path, spec, text)
                else:
                    write_png(image, path, spec, text)
            except OSError as exc:
                job = mark_failed(self.store, claimed.render_id,
                                  f"could not write {path}: {exc.strerror}")
                failed.append(claimed.render_id)
            else:
                job = mark_done(self.store, claimed.render_id, str(path), per_render,
                                lora_report=lora_report,
                                video=(len(image.frames), image.fps) if video else None)
                done.append(claimed.render_id)
            if job is not None:
                finished.append(job)
        return BatchOutcome(done, failed, finished, seconds)


def _reason(exc: Exception) -> str:
    if isinstance(exc, RenderError):
        return str(exc)
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"
