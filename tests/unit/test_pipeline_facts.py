"""Per-pipeline facts (offload mode, scheduler settings as loaded, a family's extras) are kept
beside the diffusers pipeline, not patched onto it, and reached from the cache's record."""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler

import daemon.plugin_api as api
from daemon.contract import pipeline_facts as facts_module
from daemon.render.pipeline_cache import CachedPipeline, move_pipeline
from families.sdxl.sdxl import SDXLFamily

CUDA = torch.device("cuda")  # a device object only: nothing below touches a GPU


class FakePipe:
    """What the offload and move code calls on a pipeline, recorded."""

    def __init__(self) -> None:
        self.scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1)
        self.calls: list[str] = []
        self.vae = None

    def enable_model_cpu_offload(self, device: torch.device) -> None:
        self.calls.append("model_cpu_offload")

    def to(self, device: torch.device) -> None:
        self.calls.append(f"to {device}")


def _lorafarm_attributes(pipe: Any) -> list[str]:
    return [name for name in vars(pipe) if "lorafarm" in name]


def test_facts_are_one_object_per_pipeline_and_go_with_it() -> None:
    first, second = FakePipe(), FakePipe()
    assert api.pipeline_facts(first) is api.pipeline_facts(first)
    assert api.pipeline_facts(first) is not api.pipeline_facts(second)
    api.pipeline_facts(first).extras["test.note"] = "kept"
    assert api.pipeline_facts(first).extras == {"test.note": "kept"}
    assert api.pipeline_facts(second).extras == {}
    entries = len(facts_module._FACTS)
    del first
    gc.collect()
    assert len(facts_module._FACTS) == entries - 1
    assert _lorafarm_attributes(second) == []


def test_the_scheduler_config_is_recorded_once_and_not_on_the_pipeline() -> None:
    pipe = FakePipe()
    loaded = api.remember_scheduler_config(pipe)
    assert loaded["beta_schedule"] == "scaled_linear"
    spec = api.RenderSpec(family="x", checkpoint="c", prompt="p", negative_prompt="", seed=1,
                          steps=4, cfg=5.0, sampler="DPM++ 2M", schedule="Karras", width=64,
                          height=64)
    api.sampling_arguments(pipe, [spec], None)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    # Later calls answer what was recorded, not the batch's sampler now on the pipeline.
    assert api.remember_scheduler_config(pipe) == loaded
    assert pipe.scheduler.config.use_karras_sigmas
    assert not api.remember_scheduler_config(pipe).get("use_karras_sigmas")
    assert _lorafarm_attributes(pipe) == []
    # A family correcting the loaded settings records its own; callers get copies.
    api.remember_scheduler_config(pipe, {**loaded, "steps_offset": 0})
    copy = api.remember_scheduler_config(pipe)
    copy["steps_offset"] = 9
    assert api.pipeline_facts(pipe).scheduler_config["steps_offset"] == 0


def test_a_pipeline_that_carries_the_old_attribute_is_read_once() -> None:
    """Plugins and tests written before the facts table set `pipe.lorafarm_scheduler_config`
    themselves; what they set is what the samplers are built on."""
    pipe = FakePipe()
    pipe.lorafarm_scheduler_config = {**dict(pipe.scheduler.config), "steps_offset": 0}
    assert api.remember_scheduler_config(pipe)["steps_offset"] == 0


def test_an_object_without_weak_references_still_gets_its_facts() -> None:
    pipe = SimpleNamespace(scheduler=FakePipe().scheduler)
    assert api.remember_scheduler_config(pipe)["beta_schedule"] == "scaled_linear"
    assert api.pipeline_facts(pipe) is api.pipeline_facts(pipe)


def test_the_offload_mode_lives_in_the_facts_and_the_cache_record_reads_it() -> None:
    family = SDXLFamily()
    pipe = FakePipe()
    assert family.apply_offload(pipe, "model", CUDA) == ["model_offload"]
    assert pipe.calls == ["model_cpu_offload"]
    entry = CachedPipeline(pipe=pipe, identity=("p", 1))
    assert entry.facts is api.pipeline_facts(pipe)
    assert entry.facts.offload == "model" and _lorafarm_attributes(pipe) == []
    # An offloaded pipeline manages its own placement: the cache does not move it.
    move_pipeline(pipe, torch.device("cpu"))
    assert not any(call.startswith("to ") for call in pipe.calls)

    # The memory savers turn CPU offload on once, and say so in the facts.
    plain = FakePipe()
    assert "model_cpu_offload" in family.enable_memory_savers(plain, CUDA)
    assert api.pipeline_facts(plain).offload == "model"
    assert "model_cpu_offload" not in family.enable_memory_savers(plain, CUDA)
    # On the CPU nothing is offloaded, and a plain pipeline moves.
    cpu_pipe = FakePipe()
    assert family.apply_offload(cpu_pipe, "group", torch.device("cpu")) == []
    assert api.pipeline_facts(cpu_pipe).offload == "none"
    move_pipeline(cpu_pipe, torch.device("cpu"))
    assert cpu_pipe.calls == ["to cpu"]
