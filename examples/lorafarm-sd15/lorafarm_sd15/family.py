"""Stable Diffusion 1.5 for lorafarm: diffusers folders and original-layout single files,
kohya and diffusers SD 1.x LoRAs, A1111 weighting and clip skip through the plugin API.

This module is the whole family; `lorafarm_sd15.tiny` builds its demo checkpoints apart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from daemon.plugin_api import (
    CLIP_SKIP_LEVELS,
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
    encode_clip_prompts,
    hookimpl,
    read_json_object,
    sampling_arguments,
)

# CLIP ViT-L/14's width: SD 1.x's text encoder and the context every cross-attention reads.
# SD 2.x (OpenCLIP-H) is 1024, SDXL 2048 (two encoders side by side).
SD1_CONTEXT_WIDTH = 768
_CROSS_ATTENTION_K = re.compile(r"attn2[._]to_k")
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")  # a second text encoder


class StableDiffusion15Family(Family):
    name = "sd15"
    architecture = "sd1"
    display_name = "Stable Diffusion 1.5"
    defaults = FamilyDefaults(width=512, height=512, steps=25, cfg=7.0, sampler="DPM++ 2M",
                              schedule="Karras")
    prompt_weighting = "a1111"  # encode_clip_prompts in render_batch
    clip_skip_levels = CLIP_SKIP_LEVELS  # a job's `clip_skip` = 1 or 2

    def probe_checkpoint(self, source: CheckpointSource) -> CheckpointProbe | None:
        if source.kind == "folder":
            if (source.model_index or {}).get("_class_name") != "StableDiffusionPipeline":
                return None
            text_encoder = read_json_object(source.path / "text_encoder" / "config.json")
            if (text_encoder or {}).get("hidden_size") != SD1_CONTEXT_WIDTH:
                return None  # SD 2.x shares the pipeline class
            why = "model_index.json: StableDiffusionPipeline with a 768-wide CLIP text encoder"
        elif source.kind == "single_file" and source.header is not None:
            keys = source.header.tensors
            if not (any(k.startswith("cond_stage_model.transformer.") for k in keys)
                    and any(k.startswith("model.diffusion_model.") for k in keys)):
                return None  # SD 2.x stores `cond_stage_model.model.`, SDXL `conditioner.`
            why = "original layout with a CLIP ViT-L cond_stage_model (SD 1.x)"
        else:
            return None
        return CheckpointProbe(family=self.name, score=0.9, reason=why)

    def probe_lora(self, header: SafetensorsHeader, facts: LoraFacts) -> LoraProbe | None:
        """An SD 1.x LoRA: its cross-attention keys read a 768-wide context, and it has no
        second text encoder (SDXL's te1/te2)."""
        if any(key.startswith(_SDXL_PREFIXES) for key in facts.module_keys):
            return None
        widths = {info.shape[-1] for key, info in header.tensors.items()
                  if _CROSS_ATTENTION_K.search(key) and key.endswith(_DOWN_SUFFIXES)
                  and info.shape}
        if widths != {SD1_CONTEXT_WIDTH}:
            return None
        return LoraProbe(family=self.name, architecture=self.architecture, score=0.9,
                         reason="SD 1.x: cross-attention on a 768-wide CLIP ViT-L context")

    def lora_strengths(self, lora: LoraUse) -> dict[str, float]:
        te = lora.strength if lora.text_encoder_strength is None else lora.text_encoder_strength
        return {"unet": lora.strength, "text_encoder": te}

    def missing_requirements(self, checkpoint: LoadedCheckpoint) -> str | None:
        config = checkpoint.config_folder
        if checkpoint.weights_file is not None and config is None:
            return (f"single-file checkpoint {checkpoint.name!r} needs a local diffusers config "
                    f'folder: set [checkpoints.{checkpoint.name}] config = "path/to/sd15-config" '
                    "in config.toml, pointing at a diffusers SD 1.5 folder (weights not needed)")
        if config is not None and not (config / "model_index.json").is_file():
            return f"the config folder {config} for {checkpoint.name!r} has no model_index.json"
        return None

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: Any, dtype: Any) -> Any:
        from diffusers import StableDiffusionPipeline

        self.require_loadable(checkpoint)
        # No safety checker: lorafarm renders what the job asks for, like A1111.
        options = {"dtype": dtype, "local_files_only": True, "safety_checker": None,
                   "requires_safety_checker": False}
        if checkpoint.folder is not None:
            pipe = StableDiffusionPipeline.from_pretrained(
                checkpoint.folder, use_safetensors=True, **options)
        else:
            pipe = StableDiffusionPipeline.from_single_file(
                str(checkpoint.weights_file), config=str(checkpoint.config_folder), **options)
        pipe.set_progress_bar_config(disable=True)
        return pipe if device.type == "cpu" else pipe.to(device)

    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: Any,
                     progress: Progress | None = None) -> list[Any]:
        first = specs[0]  # the batch shares steps, sampler, size, cfg and clip skip
        result = pipe(**encode_clip_prompts(pipe, specs, clip_skip=first.clip_skip),
                      guidance_scale=first.cfg, width=first.width, height=first.height,
                      output_type="pil", **sampling_arguments(pipe, specs, progress))
        return list(result.images)

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        from lorafarm_sd15 import tiny

        pipe = tiny.build_tiny_sd15_pipeline(seed=0)
        pipe.save_pretrained(models_dir / "tiny-sd15", safe_serialization=True)
        tiny.save_config_folder(pipe, configs_dir / "tiny-sd15")
        tiny.save_single_file(tiny.build_tiny_sd15_pipeline(seed=1),
                              models_dir / "tiny-sd15-single.safetensors")
        job = ('checkpoint = "{name}"\nprompt = "a (watercolor:1.3) fox in a [misty] forest"\n'
               "seed = {seed}\ncount = 2\nsteps = 4\ncfg = 7.0\nclip_skip = 2\n"
               'sampler = "DPM++ 2M Karras"\nwidth = 64\nheight = 64\n')
        return DemoAssets(
            checkpoint_overrides={"tiny-sd15-single": {"config": "configs/tiny-sd15"}},
            jobs={"sd15-folder.toml": job.format(name="tiny-sd15", seed=3000),
                  "sd15-single-file.toml": job.format(name="tiny-sd15-single", seed=4000)})


@hookimpl
def register_families(register: Any) -> None:
    register(StableDiffusion15Family())
