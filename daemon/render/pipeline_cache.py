"""The loaded pipelines of one worker, kept within its memory budgets in two tiers.

A pipeline that was loaded once is worth keeping: a load from disk costs seconds to minutes,
a move between CPU RAM and the GPU a fraction of that. So a worker keeps:

* the **device tier**: pipelines whose weights sit on the worker's device, ready to render.
  What they hold there between renders (`idle_bytes`), the weights the rendering one holds
  while it runs (`resident_bytes`, by its offload mode) and the batch about to run must fit
  `worker.vram_budget_gb`. Room is made *before* a pipeline arrives, by a load or a move
  back from RAM, so the device never holds more than the budget;
* the **RAM tier** (accelerators only): pipelines moved off the device to CPU RAM to make
  room, brought back by a move instead of a load; together within `worker.ram_budget_gb`
  (0: no RAM tier, a pipeline pushed off the device is dropped).

Both tiers together hold at most `worker.pipelines_in_memory` pipelines. The least recently
used goes first, down a tier or out. On the CPU the device *is* RAM: there is one tier, and
`vram_budget_gb` bounds it.

Sizes are measured on the loaded pipeline (the bytes of every parameter and buffer of its
modules: quantized weights count at their packed size), not guessed from files, and measured
again when LoRA layers are added or the memory savers change its placement. A pipeline under
an offload mode lives in CPU RAM between renders: it holds nothing on the device then, and
is never moved or dropped to make room there.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from daemon.contract.pipeline_facts import PipelineFacts, pipeline_facts
from daemon.render.lora_patching import AdapterState

log = logging.getLogger(__name__)

DEVICE_TIER, RAM_TIER = "device", "ram"
CPU = torch.device("cpu")


@dataclass
class CachedPipeline:
    pipe: Any
    identity: tuple[str, int]  # (path, mtime) when loaded: a replaced file means reload
    weights_bytes: int = 0  # every parameter and buffer of the pipeline's modules
    resident_bytes: int = 0  # of those, what is on the device while it renders
    idle_bytes: int = 0  # of those, what stays on the device between renders
    offload: str = "none"  # the offload mode it runs under (then it lives in CPU RAM)
    tier: str = DEVICE_TIER
    adapters: AdapterState = field(default_factory=AdapterState)
    memory_savers: list[str] = field(default_factory=list)

    @property
    def facts(self) -> PipelineFacts:
        """What the daemon and its family learnt about this pipeline (its offload mode,
        its scheduler settings as loaded, the family's extras): kept beside the diffusers
        object, not patched onto it (daemon/contract/pipeline_facts.py)."""
        return pipeline_facts(self.pipe)


def pipeline_bytes(pipe: Any) -> dict[str, int]:
    """Bytes of each torch module of a diffusers pipeline (parameters and buffers; a tensor
    shared by two modules counts once)."""
    seen: set[int] = set()
    sizes: dict[str, int] = {}
    components = getattr(pipe, "components", {}) or {}
    for name, module in components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        total = 0
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "meta":
                continue
            key = tensor.data_ptr()
            if key in seen and key != 0:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        sizes[name] = total
    return sizes


def measure(entry: CachedPipeline, offload: str) -> CachedPipeline:
    """Fill in an entry's sizes from its pipeline as it is now (LoRA layers included)."""
    sizes = pipeline_bytes(entry.pipe)
    entry.weights_bytes = sum(sizes.values())
    entry.resident_bytes = resident_bytes(sizes, offload)
    # Offload hooks move every module back to CPU RAM after the call.
    entry.idle_bytes = entry.resident_bytes if offload == "none" else 0
    entry.offload = offload
    return entry


def resident_bytes(sizes: dict[str, int], offload: str) -> int:
    """Of a pipeline's module sizes, what its offload mode leaves on the device: all of it
    (none), the largest module while it runs (model), about one block (group, sequential:
    counted as 0 beside the activations). The same rule as `Family.weights_cost`, which
    estimates it from file headers before a load."""
    if offload == "model":
        return max(sizes.values(), default=0)
    if offload in ("group", "sequential"):
        return 0
    return sum(sizes.values())


def move_pipeline(pipe: Any, device: torch.device) -> None:
    """Move a pipeline's weights (and its LoRA layers) between the device and CPU RAM. A
    pipeline under an offload mode manages its own placement and stays as it is."""
    if pipeline_facts(pipe).offload != "none":
        return
    pipe.to(device)


class PipelineCache:
    """See the module docstring. Not thread-safe: the worker holds its lock around calls."""

    def __init__(self, device: torch.device, *, max_pipelines: int, vram_budget_bytes: int = 0,
                 ram_budget_bytes: int = 0,
                 move: Callable[[Any, torch.device], None] = move_pipeline,
                 name: str = "w0") -> None:
        self.device = device
        self.max_pipelines = max_pipelines
        self.vram_budget = vram_budget_bytes
        self.ram_budget = ram_budget_bytes
        self._move = move
        self.name = name
        self._entries: OrderedDict[str, CachedPipeline] = OrderedDict()
        # The names, least recently used first, replaced whole on every change: other threads
        # (the heartbeat) read it without the worker's lock, which a multi-GB move holds.
        self.snapshot: tuple[str, ...] = ()
        self.promotions = self.demotions = self.evictions = 0

    @property
    def moves(self) -> int:
        """Pipelines moved between the device and the RAM tier so far, either way."""
        return self.promotions + self.demotions

    @property
    def has_ram_tier(self) -> bool:
        return self.device.type != "cpu" and self.ram_budget > 0

    def names(self) -> list[str]:
        return list(self.snapshot)

    def _changed(self) -> None:
        self.snapshot = tuple(self._entries)

    def on_device(self) -> list[str]:
        return [name for name, entry in self._entries.items() if entry.tier == DEVICE_TIER]

    def tier_of(self, name: str) -> str | None:
        entry = self._entries.get(name)
        return entry.tier if entry else None

    def resident(self, name: str) -> int | None:
        """The device bytes a cached pipeline's weights take while it renders, or None."""
        entry = self._entries.get(name)
        return entry.resident_bytes if entry else None

    def get(self, name: str, identity: tuple[Any, ...], reserve: int = 0
            ) -> CachedPipeline | None:
        """The cached pipeline, made most recently used and on the device with room beside
        it for `reserve` bytes of batch; None when it is not cached or its files changed
        since it was loaded (then it is dropped)."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry.identity != identity:
            log.info("%s: %s changed on disk; loading it again", self.name, name)
            self._drop(name)
            return None
        self._entries.move_to_end(name)
        self._changed()
        self.make_room(keep=name, reserve=reserve)  # before it comes back, not after
        if entry.tier == RAM_TIER:
            self._move(entry.pipe, self.device)
            entry.tier = DEVICE_TIER
            self.promotions += 1
            log.info("%s: %s back on %s from RAM", self.name, name, self.device)
        return entry

    def add(self, name: str, entry: CachedPipeline) -> None:
        """A freshly loaded pipeline, on the device and most recently used (room was made
        for it with `make_room(incoming=...)` before the load)."""
        entry.tier = DEVICE_TIER
        self._entries[name] = entry
        self._entries.move_to_end(name)
        self._changed()
        log.info("%s: %s holds %.1f MB (%.1f MB on %s while it renders)", self.name, name,
                 entry.weights_bytes / 2**20, entry.resident_bytes / 2**20, self.device)

    def make_room(self, keep: str, reserve: int = 0, incoming: int = 0) -> None:
        """Fit the budgets with `keep` rendering on the device and `reserve` bytes (the
        batch about to run) to spare: the least recently used others go down to RAM, or out.
        `keep` need not be cached yet: `incoming` is then its expected device bytes (the
        header estimate of a pipeline about to load)."""
        entry = self._entries.get(keep)
        count = len(self._entries) + (0 if entry is not None else 1)
        while count > self.max_pipelines:
            victim = next((n for n in self._entries if n != keep), None)
            if victim is None:
                break
            self._drop(victim)
            count -= 1
        if self.vram_budget > 0:
            keep_bytes = entry.resident_bytes if entry is not None else incoming
            while self._device_bytes(but=keep) + keep_bytes + reserve > self.vram_budget:
                # Only pipelines that hold device memory between renders can give it back.
                victim = next((n for n, e in self._entries.items() if n != keep
                               and e.tier == DEVICE_TIER and e.idle_bytes > 0), None)
                if victim is None:
                    break  # only `keep` left: the batch limit already sized the batch for it
                self._demote(victim)
        if self.has_ram_tier:
            while self._ram_bytes() > self.ram_budget:
                victim = next((n for n, e in self._entries.items()
                               if n != keep and e.tier == RAM_TIER), None)
                if victim is None:
                    break
                self._drop(victim)

    def clear(self) -> None:
        self._entries.clear()
        self._changed()

    # -- internals -----------------------------------------------------------------------

    def _device_bytes(self, but: str) -> int:
        return sum(e.idle_bytes for n, e in self._entries.items()
                   if e.tier == DEVICE_TIER and n != but)

    def _ram_bytes(self) -> int:
        """What the RAM tier holds: pipelines moved there, and offloaded pipelines, which
        live in CPU RAM between renders wherever their tier says they are."""
        return sum(e.weights_bytes for e in self._entries.values()
                   if e.tier == RAM_TIER or e.offload != "none")

    def _demote(self, name: str) -> None:
        entry = self._entries[name]
        if not self.has_ram_tier or entry.weights_bytes > self.ram_budget:
            self._drop(name)
            return
        self._move(entry.pipe, CPU)
        entry.tier = RAM_TIER
        self.demotions += 1
        log.info("%s: %s moved to RAM to make room on %s", self.name, name, self.device)

    def _drop(self, name: str) -> None:
        self._entries.pop(name)
        self._changed()
        self.evictions += 1
        log.info("%s: unloading %s to make room", self.name, name)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
