"""Applying a LoRA set to a loaded diffusers pipeline, and proving it took.

The base model stays loaded. Each LoRA file is loaded once per pipeline as a PEFT adapter
named after its content hash, then switched on and off with `set_adapters` (milliseconds),
never by reloading the checkpoint. After loading, the modules the adapter actually patched
are counted per component: `load_lora_weights` can load nothing without raising (an
unknown layout), the most common LoRA complaint in every UI's tracker, and lorafarm fails
such a render loudly instead.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from daemon.contract.family import Family, RenderError
from daemon.contract.spec import LoraUse
from daemon.formats.lora_probe import module_names
from daemon.formats.safetensors_header import read_header

log = logging.getLogger(__name__)

MAX_ADAPTERS_PER_PIPELINE = 16  # least recently used adapters beyond this are deleted


@dataclass
class AdapterState:
    """What is loaded into one pipeline: adapter name -> patched modules per component."""

    loaded: OrderedDict[str, dict[str, int]] = field(default_factory=OrderedDict)
    active: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] | None = None
    loads: int = 0
    switches: int = 0
    load_seconds: float = 0.0


def adapter_name(lora: LoraUse) -> str:
    """PEFT adapter names must be identifiers; the content hash keeps two files of one name
    (or one file renamed) apart."""
    key = lora.autov3 or re.sub(r"\W", "_", lora.name)
    # One file used for another Wan expert is placed differently: a separate adapter.
    return f"lf_{key}_{lora.expert or 'auto'}"


def count_patched_modules(pipe: Any, adapter: str) -> dict[str, int]:
    """Per pipeline component, the number of modules that hold `adapter`'s LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    counts: dict[str, int] = {}
    for component, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        count = 0
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                lora_a = getattr(layer, "lora_A", None)
                if lora_a is not None and adapter in lora_a:
                    count += 1
        if count:
            counts[component] = count
    return counts


def apply_loras(pipe: Any, family: Family, loras: tuple[LoraUse, ...],
                files: dict[str, Path], state: AdapterState) -> dict[str, dict[str, int]]:
    """Make exactly `loras` active on `pipe` with their strengths; returns, per LoRA name,
    the modules it patched per component. `files` maps LoRA names to their files."""
    if not loras:
        if state.active:
            pipe.disable_lora()
            state.active = ()
            state.switches += 1
        return {}
    for lora in loras:
        name = adapter_name(lora)
        if name in state.loaded:
            state.loaded.move_to_end(name)
            continue
        path = files.get(lora.name)
        if path is None or not path.exists():
            raise RenderError(f"LoRA {lora.name!r} is no longer in the library (file deleted or "
                              "replaced after the job was accepted); put it back or re-submit")
        started = time.perf_counter()
        try:
            family.load_lora(pipe, path, name, lora)
        except RenderError:
            _delete(pipe, name)  # the family's own message says it best
            raise
        except (ValueError, KeyError, RuntimeError) as exc:
            # PEFT raises when no target module exists at all, and a shape mismatch (a LoRA
            # for another model size) raises here too; both mean this LoRA cannot patch this
            # checkpoint.
            _delete(pipe, name)
            raise RenderError(
                f"LoRA {lora.name!r} ({path.name}) patched no module of this checkpoint: "
                f"diffusers could not load it ({type(exc).__name__}: {str(exc).strip()[:300]}). "
                "Is it for another model? Nothing was rendered with it") from exc
        # PEFT leaves the new layers trainable; autograd bookkeeping would make torch pick
        # other CPU kernels and strength 0 would no longer equal the base bit for bit.
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        report = count_patched_modules(pipe, name)
        # A file whose keys match only in part loads without a word from diffusers: keep
        # the file's own module count beside what was patched, so the history shows it.
        in_file = len(module_names(read_header(path).keys()))
        state.load_seconds += time.perf_counter() - started
        state.loads += 1
        if not report:
            _delete(pipe, name)
            raise RenderError(
                f"LoRA {lora.name!r} ({path.name}) patched no module of this checkpoint: its "
                "keys match nothing diffusers knows for this model (wrong layout, or a LoRA "
                "for another model). Nothing was rendered with it")
        patched = sum(report.values())
        if patched < in_file:
            log.warning("LoRA %s: only %d of the %d modules in %s matched this checkpoint",
                        lora.name, patched, in_file, path.name)
        report["modules_in_file"] = in_file
        state.loaded[name] = report
        log.info("LoRA %s loaded: %s", lora.name, report)
        while len(state.loaded) > MAX_ADAPTERS_PER_PIPELINE:
            old, _ = state.loaded.popitem(last=False)
            _delete(pipe, old)
    names = [adapter_name(lora) for lora in loras]
    weights = []
    for lora, name in zip(loras, names, strict=True):
        patched = {k for k in state.loaded[name] if k != "modules_in_file"}
        # Only components this adapter patched: diffusers warns about the others.
        weights.append({component: value for component, value in
                        family.lora_strengths(lora).items() if component in patched})
    wanted = tuple((name, tuple(sorted(w.items()))) for name, w in zip(names, weights,
                                                                        strict=True))
    if wanted != state.active:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)
        state.active = wanted
        state.switches += 1
    return {lora.name: dict(state.loaded[name]) for lora, name in zip(loras, names, strict=True)}


def _delete(pipe: Any, name: str) -> None:
    try:
        pipe.delete_adapters([name])
    except (ValueError, KeyError):  # partially loaded: nothing to delete in some components
        log.debug("adapter %s was not fully present", name)
