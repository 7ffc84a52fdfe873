"""What lorafarm learns about a loaded pipeline, kept beside the pipeline instead of on it.

A diffusers pipeline is diffusers' object. Facts patched onto it as attributes
(`pipe.lorafarm_offload = "model"`) are invisible in its type, read back with
`getattr(pipe, ..., default)` guesses, and could one day meet a diffusers attribute of the
same name. So the facts the daemon and the families keep per pipeline live here, in a table
keyed weakly by the pipeline: nothing is added to the pipeline, and an entry goes with its
pipeline (when the pipeline cache drops it and the last reference is gone).

    facts = pipeline_facts(pipe)
    facts.offload                      # the offload mode it runs under
    facts.scheduler_config             # the checkpoint's scheduler settings as loaded
    facts.extras["wan22.image_view"]   # what a family keeps for itself, by its own key

The pipeline cache's record of a loaded pipeline (render/pipeline_cache.CachedPipeline)
reaches the same object as `entry.facts`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

# A pipeline of the days when the scheduler config was kept on it (plugins written for
# lorafarm before this module may still set it); read once, never written.
LEGACY_SCHEDULER_ATTRIBUTE = "lorafarm_scheduler_config"
# For the rare object that cannot be weakly referenced or hashed (a test double such as a
# SimpleNamespace), the facts are kept on it under this one name instead.
_FALLBACK_ATTRIBUTE = "_lorafarm_pipeline_facts"


@dataclass
class PipelineFacts:
    """Per-pipeline facts; see the module docstring."""

    # The scheduler settings the checkpoint was trained with, which every batch's sampler is
    # built from (`remember_scheduler_config`); None until recorded.
    scheduler_config: dict[str, Any] | None = None
    # The offload mode the pipeline runs under (Family.apply_offload, or "model" once the
    # memory savers turned CPU offload on): none, model, group or sequential.
    offload: str = "none"
    # For a pipeline assembled from several files (a ComfyUI or A1111 tree, a GGUF
    # transformer beside its encoders): the file each component came from, by name.
    components: dict[str, str] = field(default_factory=dict)
    # A family's own facts about the pipeline, under keys it chooses (prefixed with the
    # family's name, e.g. "sdxl.embeddings"), so that families never collide.
    extras: dict[str, Any] = field(default_factory=dict)


_FACTS: weakref.WeakKeyDictionary[Any, PipelineFacts] = weakref.WeakKeyDictionary()


def pipeline_facts(pipe: Any) -> PipelineFacts:
    """The facts kept for `pipe`, created empty on first use."""
    try:
        facts = _FACTS.get(pipe)
        if facts is None:
            facts = _FACTS[pipe] = PipelineFacts()
        return facts
    except TypeError:  # not weakly referenceable, or not hashable
        facts = getattr(pipe, _FALLBACK_ATTRIBUTE, None)
        if facts is None:
            facts = PipelineFacts()
            setattr(pipe, _FALLBACK_ATTRIBUTE, facts)
        return facts


def remember_scheduler_config(pipe: Any, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scheduler settings the checkpoint was trained with, which every batch's sampler is
    built from; returns them (a copy).

    The first call records `pipe.scheduler.config` (or `config`, for a family that corrects
    the loaded settings, e.g. a base folder of another variant); later calls return what was
    recorded, since by then `pipe.scheduler` is the previous batch's sampler. Calling it at
    the end of `load_pipeline` is good practice; `job_scheduler` calls it anyway.
    """
    facts = pipeline_facts(pipe)
    if config is not None:
        facts.scheduler_config = dict(config)
    elif facts.scheduler_config is None:
        legacy = getattr(pipe, LEGACY_SCHEDULER_ATTRIBUTE, None)
        facts.scheduler_config = dict(legacy if legacy is not None else pipe.scheduler.config)
    return dict(facts.scheduler_config)
