"""A simulated GPU: a family plugin for tests and benchmarks (not installed for users) whose
render sleeps for a set time per step and returns a tiny image, so that many daemons on one
machine cost next to no CPU while they "render". Everything around it is the real code:
intake, claims, leases, heartbeats, the checkpoint and LoRA inventory, output files, history.

Load it through config.toml (the repository root on PYTHONPATH):

    plugins = ["bench.sim_gpu"]

`write_sim_checkpoint` writes a marker checkpoint (a tiny .safetensors whose metadata says
`lorafarm_sim_gpu`, and how long one step takes); `write_sim_lora` a LoRA for it (diffusers
key layout, `lorafarm_sim_lora` in its metadata). The LoRA really patches the simulated
pipeline's one linear layer through PEFT, so the library, LoRA sets, adapter switches and
the history's patched-module counts are the real ones. LORAFARM_SIM_STEP_SECONDS overrides
every checkpoint's step time.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from daemon.plugin_api import (
    CheckpointProbe,
    CheckpointSource,
    DemoAssets,
    Family,
    FamilyDefaults,
    LoadedCheckpoint,
    LoraFacts,
    LoraProbe,
    LoraUse,
    Progress,
    RenderSpec,
    SafetensorsHeader,
    hookimpl,
    read_header,
)
from families.shared.tiny_files import save_safetensors_atomically

CHECKPOINT_MARKER = "lorafarm_sim_gpu"
LORA_MARKER = "lorafarm_sim_lora"
STEP_SECONDS_KEY = "step_seconds"
DEFAULT_STEP_SECONDS = 0.05
WIDTH = 4  # the simulated layer's size: a LoRA of rank r holds 2 * r * WIDTH numbers
LORA_DOWN = "transformer.sim_proj.lora_A.weight"
LORA_UP = "transformer.sim_proj.lora_B.weight"


class SimPipeline:
    """Just enough of a diffusers pipeline for the worker: `components` holding a torch
    module (its one Linear is where LoRAs go), the PEFT adapter verbs, `.to()`."""

    def __init__(self, step_seconds: float) -> None:
        self.step_seconds = step_seconds
        self.transformer = torch.nn.Sequential(OrderedDict(
            sim_proj=torch.nn.Linear(WIDTH, WIDTH, bias=False)))
        self.transformer.requires_grad_(False)
        self.active_adapters: list[str] = []
        self.lora_enabled = True

    @property
    def components(self) -> dict[str, Any]:
        return {"transformer": self.transformer}

    def to(self, *_args: Any, **_kwargs: Any) -> SimPipeline:
        return self

    def _lora_layers(self) -> list[Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]

    def enable_lora(self) -> None:
        self.lora_enabled = True

    def disable_lora(self) -> None:
        self.lora_enabled = False

    def set_adapters(self, names: list[str], adapter_weights: Any = None) -> None:
        for layer in self._lora_layers():
            layer.set_adapter(names)
        self.active_adapters = list(names)

    def delete_adapters(self, names: list[str]) -> None:
        for layer in self._lora_layers():
            for name in names:
                if name in layer.lora_A:
                    layer.delete_adapter(name)


class SimGpuFamily(Family):
    name = "sim_gpu"
    architecture = "sim"
    display_name = "Simulated GPU (tests and benchmarks)"
    defaults = FamilyDefaults(width=64, height=64, steps=20, cfg=5.0, sampler="Euler",
                              schedule=None)

    def probe_checkpoint(self, source: CheckpointSource) -> CheckpointProbe | None:
        if source.header is None or source.header.metadata.get(CHECKPOINT_MARKER) != "1":
            return None
        return CheckpointProbe(self.name, 1.0, f"{CHECKPOINT_MARKER} marker in its metadata",
                               lineage="sim")

    def probe_lora(self, header: SafetensorsHeader, facts: LoraFacts) -> LoraProbe | None:
        if header.metadata.get(LORA_MARKER) != "1":
            return None
        return LoraProbe(self.name, self.architecture, 1.0,
                         f"{LORA_MARKER} marker in its metadata", lineage="sim",
                         lineage_source="sim marker")

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> SimPipeline:
        override = os.environ.get("LORAFARM_SIM_STEP_SECONDS")
        if override:
            return SimPipeline(float(override))
        metadata = read_header(checkpoint.path).metadata
        return SimPipeline(float(metadata.get(STEP_SECONDS_KEY, DEFAULT_STEP_SECONDS)))

    def load_lora(self, pipe: Any, path: Path, adapter_name: str, lora: LoraUse) -> None:
        """PEFT's own injection into the one linear layer, with the file's weights."""
        from peft import LoraConfig, inject_adapter_in_model
        from safetensors.torch import load_file

        weights = load_file(str(path))
        down, up = weights[LORA_DOWN], weights[LORA_UP]
        inject_adapter_in_model(LoraConfig(r=down.shape[0], lora_alpha=down.shape[0],
                                           target_modules=["sim_proj"]),
                                pipe.transformer, adapter_name=adapter_name)
        layer = pipe.transformer.sim_proj
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(down)
            layer.lora_B[adapter_name].weight.copy_(up)

    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: torch.device,
                     progress: Progress | None = None) -> list[Image.Image]:
        for step in range(max(1, specs[0].steps)):
            time.sleep(pipe.step_seconds)  # the GPU's time: no CPU spent
            if progress is not None:
                progress.callback(pipe, step, None, {})
        return [Image.new("RGB", (spec.width, spec.height),
                          ((spec.seed * 37) % 256, (spec.seed * 91) % 256,
                           min(255, 60 * len(spec.loras))))
                for spec in specs]

    def batch_cost(self, spec: RenderSpec) -> int:
        return 1  # nothing is held on a device

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        write_sim_checkpoint(models_dir / "sim-a.safetensors")
        return DemoAssets(jobs={"sim.toml": 'checkpoint = "sim-a"\nprompt = "a test"\n'
                                            "steps = 4\n"})


def write_sim_checkpoint(path: Path, step_seconds: float = DEFAULT_STEP_SECONDS) -> Path:
    """A marker checkpoint the simulated GPU renders (a few hundred bytes)."""
    save_safetensors_atomically({"sim.weight": torch.zeros(WIDTH, WIDTH)}, path,
                                {CHECKPOINT_MARKER: "1", STEP_SECONDS_KEY: str(step_seconds)})
    return path


def write_sim_lora(path: Path, rank: int = 2, seed: int = 0) -> Path:
    """A LoRA for simulated checkpoints (diffusers layout, one module)."""
    generator = torch.Generator().manual_seed(seed)
    save_safetensors_atomically({
        LORA_DOWN: torch.randn(rank, WIDTH, generator=generator),
        LORA_UP: torch.randn(WIDTH, rank, generator=generator),
    }, path, {LORA_MARKER: "1"})
    return path


@hookimpl
def register_families(register: Any) -> None:
    register(SimGpuFamily())
