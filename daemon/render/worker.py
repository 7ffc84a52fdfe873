"""A worker: one per device. It keeps pipelines loaded, renders a claimed batch in one
pipeline call, and hands the results to the output writer.

Pipelines stay loaded between batches, within the worker's memory budgets, on the device or
moved to CPU RAM (daemon/render/pipeline_cache.py), and the next batch's checkpoint files are read
from disk in the background while the current batch renders. Only the disk read overlaps:
diffusers and transformers build models under a process-wide "empty weights" (meta device)
patch of torch, so constructing a pipeline on another thread would corrupt the render
running meanwhile. Reading the files into the page cache is the slow part for a large
checkpoint on a real disk, and it is safe. Out of memory is handled the way a
person would: split the batch and retry the halves; at batch 1 turn on the family's memory
savers and retry once; then fail the render with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from PIL.Image import Image as PILImage

from daemon.config import Config
from daemon.contract.family import BatchAborted, Family, Progress, RenderedVideo, RenderError
from daemon.contract.faults import PLUGIN_ERRORS, describe_fault, fault_key
from daemon.contract.loader import Plugins
from daemon.library.loras import LoraLibrary
from daemon.library.registry import CheckpointInfo, Registry
from daemon.output.writer import OutputWriter, PendingOutput
from daemon.queue.lifecycle import mark_failed, put_back
from daemon.queue.scheduler import BatchFigures, ClaimedRender, record_batch, record_progress
from daemon.render.lora_patching import apply_loras
from daemon.render.pipeline_cache import CachedPipeline, PipelineCache, measure
from daemon.store.models import Store

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


class LoadGate:
    """Model construction must not overlap any render in this process: diffusers,
    transformers and PEFT build modules under a process-wide patch of torch that puts new
    tensors on the meta device, and a render on another thread meanwhile fails ("Tensor on
    device cpu is not on the expected device meta"). Renders on several devices may run
    together (shared); a load waits for them and runs alone (exclusive)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._renders = 0
        self._loading = False
        self._loads_waiting = 0

    @contextmanager
    def rendering(self) -> Iterator[None]:
        with self._cond:
            # Waiting loads go first, or a busy second worker would starve them.
            self._cond.wait_for(lambda: not self._loading and not self._loads_waiting)
            self._renders += 1
        try:
            yield
        finally:
            with self._cond:
                self._renders -= 1
                self._cond.notify_all()

    @contextmanager
    def loading(self) -> Iterator[None]:
        with self._cond:
            self._loads_waiting += 1
            self._cond.wait_for(lambda: not self._loading and self._renders == 0)
            self._loads_waiting -= 1
            self._loading = True
        try:
            yield
        finally:
            with self._cond:
                self._loading = False
                self._cond.notify_all()


LOAD_GATE = LoadGate()


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


class Worker:
    def __init__(self, config: Config, store: Store, registry: Registry, library: LoraLibrary,
                 plugins: Plugins, writer: OutputWriter, *, name: str = "w0",
                 device: str | None = None) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.library = library
        self.plugins = plugins
        self.writer = writer
        self.name = name
        self.device = resolve_device(device or config.worker.device)
        self.memory = config.memory_for(device or config.worker.device)
        self.dtype = resolve_dtype(config.worker.dtype, self.device)
        gib = 2**30
        self.vram_budget = int(self.memory.vram_budget_gb * gib)
        self._cache = PipelineCache(self.device, max_pipelines=config.worker.pipelines_in_memory,
                                    vram_budget_bytes=self.vram_budget,
                                    ram_budget_bytes=int(self.memory.ram_budget_gb * gib),
                                    name=name)
        self._lock = threading.Lock()
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-load")
        self._prefetching: dict[str, Future[int]] = {}
        self.pipeline_loads = 0
        self.active_batch_key: str | None = None
        self.abort = threading.Event()

    # -- pipelines -------------------------------------------------------------------------

    @property
    def loaded_checkpoints(self) -> list[str]:
        """Checkpoints this worker has loaded, on the device or in its RAM tier. Lock-free:
        the heartbeat asks while a pipeline may be moving between tiers under the lock."""
        return list(self._cache.snapshot)

    @property
    def offload(self) -> str:
        """The offload mode in effect: offload modes exist on CUDA only."""
        return self.memory.offload if self.device.type == "cuda" else "none"

    def resident_bytes(self, checkpoint: str) -> int | None:
        """Device bytes the checkpoint's loaded weights take while it renders (measured),
        or None when this worker has not loaded it."""
        with self._lock:
            return self._cache.resident(checkpoint)

    def _identity(self, info: CheckpointInfo) -> tuple[Any, ...]:
        """What the loaded pipeline was built from: replacing any of its files (the second
        expert of a GGUF pair, named component files) or pointing it at another config
        folder or component file reloads it."""
        files = [info.path, *([info.transformer_2] if info.transformer_2 else []),
                 *(path for _, path in sorted(info.components.items()))]
        stamps = []
        for path in files:
            try:
                stamps.append((str(path), path.stat().st_mtime_ns))
            except OSError:
                stamps.append((str(path), None))  # gone: the load will say so
        return (*stamps, str(info.config_path))

    def _load(self, info: CheckpointInfo, family: Family) -> CachedPipeline:
        started = time.perf_counter()
        offload = self.memory.offload
        # With an offload mode the pipeline is built in CPU RAM and the offload hooks move
        # each part to the GPU when it runs.
        where = (torch.device("cpu") if offload != "none" and self.device.type == "cuda"
                 else self.device)
        with LOAD_GATE.loading():
            pipe = family.load_pipeline(info.loaded(), where, self.dtype)
            family.apply_offload(pipe, offload, self.device)
        log.info("%s: loaded %s (%s) in %.2fs", self.name, info.name, family.name,
                 time.perf_counter() - started)
        return measure(CachedPipeline(pipe=pipe, identity=self._identity(info)), self.offload)

    def pipeline_for(self, checkpoint: str, family: Family, figures: BatchFigures,
                     reserve: int = 0) -> CachedPipeline:
        """The loaded pipeline for `checkpoint` on the device, from the cache or loaded now,
        with room made for `reserve` bytes of batch beside it."""
        info = self.registry.get(checkpoint)
        if info is None or info.state != "ok":
            reason = info.reason if info else "it is not in the registry any more"
            raise RenderError(f"checkpoint {checkpoint!r} is not usable: {reason}")
        identity = self._identity(info)
        with self._lock:
            moves = self._cache.moves
            cached = self._cache.get(checkpoint, identity, reserve)
            figures.tier_moves += self._cache.moves - moves
            if cached is not None:
                return cached
            pending = self._prefetching.pop(checkpoint, None)
            # Room first: the pipeline about to load, as its files' headers size it.
            incoming = (family.weights_cost(info.loaded(), self.dtype, self.offload)
                        if self.vram_budget else 0)
            moves = self._cache.moves
            self._cache.make_room(keep=checkpoint, reserve=reserve, incoming=incoming)
            figures.tier_moves += self._cache.moves - moves
        if pending is not None:
            pending.result()  # let the background read finish rather than read twice
        loaded = self._load(info, family)
        figures.pipeline_loads += 1
        self.pipeline_loads += 1
        with self._lock:
            moves = self._cache.moves
            self._cache.add(checkpoint, loaded)
            self._cache.make_room(keep=checkpoint, reserve=reserve)
            figures.tier_moves += self._cache.moves - moves
        return loaded

    def prefetch(self, checkpoint: str | None) -> None:
        """Start reading `checkpoint`'s files from disk while the current batch renders."""
        if checkpoint is None:
            return
        with self._lock:
            if checkpoint in self._cache.names() or checkpoint in self._prefetching:
                return
        info = self.registry.get(checkpoint)
        if info is None or info.state != "ok":
            return
        with self._lock:
            self._prefetching[checkpoint] = self._prefetcher.submit(read_into_page_cache,
                                                                    info.path)

    # -- rendering -------------------------------------------------------------------------

    def render(self, batch: list[ClaimedRender], since: float | None = None) -> list[int]:
        """Render a claimed batch. Every render ends done or failed, or goes back to the queue
        when the batch is aborted; outputs are written by the output writer. `since` is when
        this worker's wall clock for the batch started (perf_counter). Returns the ids of the
        jobs that renders failing here ended (the caller acts on those ends; the writer
        reports the ends its recordings cause)."""
        started = since if since is not None else time.perf_counter()
        figures = BatchFigures()
        outcome = "done"
        self._ended: list[int] = []
        try:
            self._render(batch, figures, savers=False)
        except BatchAborted:
            put_back(self.store, [c.render_id for c in batch],
                     "aborted by a second stop signal; queued again", worker=batch[0].worker)
            outcome = "aborted"
        finally:
            record_batch(self.store, batch[0].batch_id, figures,
                         time.perf_counter() - started, outcome)
        return self._ended

    def _render(self, batch: list[ClaimedRender], figures: BatchFigures, savers: bool) -> None:
        first = batch[0].spec
        family = self.plugins.families.get(first.family)
        stage = "loading the pipeline"  # what the family was doing, for the reason
        try:
            if family is None:
                raise RenderError(f"the {first.family} family plugin is not installed any more")
            reserve = family.batch_cost(first) * len(batch) if self.vram_budget else 0
            loaded = self.pipeline_for(first.checkpoint, family, figures, reserve)
            files = {lora.name: self.library.path_for(lora.autov2, lora.name)
                     for lora in first.loras}
            before = (loaded.adapters.loads, loaded.adapters.switches)
            stage = "applying LoRAs"
            # Loading a LoRA builds PEFT layers (a load); switching adapters does not, but it
            # is cheap enough to take the same gate.
            with LOAD_GATE.loading():
                lora_report = apply_loras(loaded.pipe, family, first.loras,
                                          {k: v for k, v in files.items() if v is not None},
                                          loaded.adapters)
            figures.lora_loads += loaded.adapters.loads - before[0]
            figures.lora_switches += loaded.adapters.switches - before[1]
            if loaded.adapters.loads != before[0]:
                measure(loaded, loaded.offload)  # new LoRA layers hold memory too
            if savers and not loaded.memory_savers:
                loaded.memory_savers = family.enable_memory_savers(loaded.pipe, self.device)
                log.warning("%s: memory savers on for %s: %s", self.name, first.checkpoint,
                            ", ".join(loaded.memory_savers) or "none available")
                # The savers may have turned CPU offload on (facts.offload "model").
                measure(loaded, loaded.facts.offload if loaded.facts.offload != "none"
                        else loaded.offload)
            stage = "rendering"
            progress = Progress(first.steps, self._progress_writer(batch), self.abort.is_set)
            # Step 0 of N, recorded before the pipeline call: if the process dies from here
            # on, the render was caught rendering, not loading (lifecycle.recover_interrupted
            # counts only such deaths against it).
            record_progress(self.store, [c.render_id for c in batch], 0, first.steps,
                            self.name)
            with LOAD_GATE.rendering():
                call_started = time.perf_counter()
                results = family.render_batch(loaded.pipe, [c.spec for c in batch],
                                              self.device, progress)
                seconds = time.perf_counter() - call_started
            figures.pipeline_seconds += seconds
            check_results(family, results, len(batch))
        except BatchAborted:
            raise
        except PLUGIN_ERRORS as exc:  # a family calling sys.exit() too
            if not is_out_of_memory(exc):
                self._fail(batch, render_fault(exc, family, stage, self.plugins))
                return
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:
            # Retried outside the except block: the live exception's traceback would keep the
            # failed call's tensors (latents, activations) alive through the retries.
            self._retry_out_of_memory(batch, figures, savers)
            return
        self.active_batch_key = batch[0].batch_key
        model_hash = self.registry.model_hash(first.checkpoint, wait=True)
        for claimed, result in zip(batch, results, strict=True):
            self.writer.submit(PendingOutput(claimed=claimed, result=result, family=family,
                                             model_hash=model_hash,
                                             seconds=seconds / len(batch),
                                             lora_report=lora_report))

    def _retry_out_of_memory(self, batch: list[ClaimedRender], figures: BatchFigures,
                             savers: bool) -> None:
        """Split the batch and retry the halves; at batch 1 retry once with the family's
        memory savers on; then fail the render with the reason."""
        self._free_memory()
        if len(batch) > 1:
            half = len(batch) // 2
            log.warning("%s: out of memory at batch %d; retrying as %d + %d",
                        self.name, len(batch), half, len(batch) - half)
            self._render(batch[:half], figures, savers)
            self._render(batch[half:], figures, savers)
            return
        if not savers:
            self._render(batch, figures, savers=True)
            return
        self._fail(batch, "out of GPU memory even at batch 1 with the memory savers on "
                   "(VAE tiling, CPU offload); lower width, height or frames")

    def _fail(self, batch: list[ClaimedRender], reason: str) -> None:
        log.error("%s: batch of %d failed: %s", self.name, len(batch), reason)
        for claimed in batch:
            job = mark_failed(self.store, claimed.render_id, reason, worker=claimed.worker)
            if job is not None:
                self._ended.append(job)

    def _progress_writer(self, batch: list[ClaimedRender]) -> Any:
        ids = [c.render_id for c in batch]
        last = [0.0]

        def on_step(step: int, total: int) -> None:
            now = time.monotonic()
            # One small write per half second at most: the heartbeat and the live display
            # need no more, and tiny models finish a step every few milliseconds.
            if now - last[0] >= 0.5 or step == total:
                last[0] = now
                record_progress(self.store, ids, step, total, self.name)
        return on_step

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._cache.clear()


def read_into_page_cache(path: Any, chunk: int = 16 * 2**20) -> int:
    """Read a checkpoint's weight files once so that loading them next finds them in the OS
    page cache; returns the bytes read."""
    from pathlib import Path

    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob("*.safetensors"))
    total = 0
    for file in files:
        try:
            with file.open("rb") as handle:
                while block := handle.read(chunk):
                    total += len(block)
        except OSError:
            continue  # it may be replaced meanwhile; the real load will say what is wrong
    return total


def check_results(family: Family, results: Any, renders: int) -> None:
    """What render_batch returned must be one PIL image or RenderedVideo per render: anything
    else would break the output writer far from its cause."""
    name = family.name
    if not isinstance(results, (list, tuple)):
        raise RenderError(f"family {name} returned {type(results).__name__} from render_batch; "
                          f"it must return a list with one PIL image or RenderedVideo per render "
                          f"({renders} here): a bug in that family's plugin")
    if len(results) != renders:
        raise RenderError(f"family {name} returned {len(results)} outputs for {renders} "
                          "renders: a bug in that family's plugin")
    for index, result in enumerate(results):
        if not isinstance(result, (PILImage, RenderedVideo)):
            raise RenderError(f"family {name} returned {type(result).__name__} for render "
                              f"{index} of the batch; render_batch must return one PIL image or "
                              "RenderedVideo per render: a bug in that family's plugin")


def render_fault(exc: BaseException, family: Family | None, stage: str, plugins: Plugins) -> str:
    """The reason a render failed: RenderError messages as they are; anything else names the
    family, what it was doing and the line in the family's own code that raised. The
    traceback is logged once per distinct fault."""
    if isinstance(exc, RenderError):
        return str(exc)
    if family is None:
        return describe_fault(exc)
    plugin = plugins.plugin_of_family(family.name)
    reason = (f"family {family.name} (plugin {plugin!r}) raised while {stage}: "
              f"{describe_fault(exc, family)}")
    plugins.faults.exception(fault_key(exc, "render", family.name, stage), reason, exc)
    return reason
