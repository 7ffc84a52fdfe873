"""lorafarm's public plugin API: everything a family or plugin imports, from one place.

A plugin imports from here and from nowhere else in `daemon`; the built-in families and
plugins do the same (tests/unit/test_plugin_api.py checks it), so they are working examples.
docs/writing-a-family.md walks through writing a family with it.

What is here:

* the hook marker `hookimpl` (the hooks themselves are listed in `daemon.contract.hookspecs`);
* the family contract: `Family` and the plain data it exchanges with the core
  (`CheckpointSource` -> `CheckpointProbe`, `LoraFacts` -> `LoraProbe`, `LoadedCheckpoint`,
  `FamilyDefaults`, `RenderSpec` / `LoraUse`, `Progress`, `RenderedVideo`, `DemoAssets`);
* the errors a plugin raises: `RenderError`, `JobFileError`; `BatchAborted` is raised for it;
* render helpers every diffusers family needs: `sampling_arguments` (the job's A1111
  sampler as a diffusers scheduler, one CPU generator per render, the step callback), and
  `encode_clip_prompts` (A1111 weighting and BREAK through compel for CLIP text encoders);
* per-pipeline facts kept beside a diffusers pipeline, not on it: `pipeline_facts(pipe)`
  (the offload mode, the scheduler settings `remember_scheduler_config` records, and a
  family's own `extras`);
* hires fix and image-to-image helpers (`hires_target`, `hires_steps`, `img2img_steps`,
  `upscale_image`, `upscale_latents`, their infotext fields and the A1111 reader);
* header readers (`read_header`, `read_gguf_header`) and A1111 prompt parsing;
* offline tokenizer builders for tiny demo and test checkpoints (`tiny_clip_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from daemon import __version__ as LORAFARM_VERSION  # noqa: N812 - a constant to plugins
from daemon import hookimpl
from daemon.config import PostprocessStep
from daemon.contract.clip_weighting import (
    CLIP_SKIP_LEVELS,
    a1111_prompt_warnings,
    encode_clip_prompts,
)
from daemon.contract.family import (
    BatchAborted,
    CheckpointProbe,
    CheckpointSource,
    DemoAssets,
    EmbeddingProbe,
    Family,
    FamilyDefaults,
    LoadedCheckpoint,
    LoraProbe,
    Progress,
    RenderedVideo,
    RenderError,
    quantization_fields,
    read_json_object,
)
from daemon.contract.hires import (
    LATENT_UPSCALERS,
    exact_steps,
    hires_steps,
    hires_target,
    img2img_steps,
    job_hires_from_infotext,
    upscale_image,
    upscale_latents,
)
from daemon.contract.hires import infotext_fields as refinement_infotext_fields
from daemon.contract.jobfile import JobFileError, parse_json, parse_toml
from daemon.contract.onnx_models import OnnxModel, OnnxModelError
from daemon.contract.onnx_models import clear_cache as clear_onnx_models
from daemon.contract.onnx_models import load_model as load_onnx_model
from daemon.contract.pipeline_facts import (
    PipelineFacts,
    pipeline_facts,
    remember_scheduler_config,
)
from daemon.contract.prompt_weights import (
    ParsedPrompt,
    WeightedText,
    parse_prompt,
    strip_explicit_weights,
    to_compel_conjunction,
    unweighted_notes,
)
from daemon.contract.results import GATE_RESEED, PostProcessResult
from daemon.contract.samplers import SamplerError, choose_sampler, make_scheduler
from daemon.contract.spec import LoraUse, RenderSpec
from daemon.contract.tiny_tokenizers import (
    CLIP_BOS_TOKEN,
    CLIP_EOS_TOKEN,
    CLIP_MAX_TOKENS,
    byte_level_alphabet,
    tiny_clip_tokenizer,
    tiny_clip_vocab,
)
from daemon.formats.gguf_header import GgufError, GgufHeader, read_gguf_header
from daemon.formats.lora_probe import KOHYA_PREFIXES, LoraFacts, tag_frequency
from daemon.formats.safetensors_header import (
    SafetensorsError,
    SafetensorsHeader,
    TensorInfo,
    read_header,
)
from daemon.output.files import SPEC_CHUNK

__all__ = [
    "CLIP_BOS_TOKEN",
    "CLIP_EOS_TOKEN",
    "CLIP_MAX_TOKENS",
    "CLIP_SKIP_LEVELS",
    "GATE_RESEED",
    "KOHYA_PREFIXES",
    "LATENT_UPSCALERS",
    "LORAFARM_VERSION",
    "SPEC_CHUNK",
    "BatchAborted",
    "CheckpointProbe",
    "CheckpointSource",
    "DemoAssets",
    "EmbeddingProbe",
    "Family",
    "FamilyDefaults",
    "GgufError",
    "GgufHeader",
    "JobFileError",
    "LoadedCheckpoint",
    "LoraFacts",
    "LoraProbe",
    "LoraUse",
    "OnnxModel",
    "OnnxModelError",
    "ParsedPrompt",
    "PipelineFacts",
    "PostProcessResult",
    "PostprocessStep",
    "Progress",
    "RenderError",
    "RenderSpec",
    "RenderedVideo",
    "SafetensorsError",
    "SafetensorsHeader",
    "SamplerError",
    "TensorInfo",
    "WeightedText",
    "a1111_prompt_warnings",
    "byte_level_alphabet",
    "choose_sampler",
    "clear_onnx_models",
    "cpu_generators",
    "encode_clip_prompts",
    "exact_steps",
    "hires_steps",
    "hires_target",
    "hookimpl",
    "img2img_steps",
    "job_hires_from_infotext",
    "load_onnx_model",
    "job_scheduler",
    "make_scheduler",
    "parse_json",
    "parse_prompt",
    "pipeline_facts",
    "parse_toml",
    "quantization_fields",
    "read_gguf_header",
    "read_header",
    "read_json_object",
    "refinement_infotext_fields",
    "remember_scheduler_config",
    "sampling_arguments",
    "step_callback",
    "strip_explicit_weights",
    "tag_frequency",
    "tiny_clip_tokenizer",
    "tiny_clip_vocab",
    "to_compel_conjunction",
    "unweighted_notes",
    "upscale_image",
    "upscale_latents",
]

def job_scheduler(pipe: Any, spec: RenderSpec, kind: str = "eps",
                  overrides: dict[str, Any] | None = None) -> Any:
    """A fresh diffusers scheduler for the render's A1111 sampler and schedule ("DPM++ 2M",
    "Karras"), built on the checkpoint's own scheduler settings (`remember_scheduler_config`)
    with `overrides` (e.g. a job's flow shift). `kind` is the family's `sampler_kind`. Fresh
    per pipeline call: multistep samplers keep state between steps."""
    config = remember_scheduler_config(pipe)
    config.update(overrides or {})
    return make_scheduler(config, spec.sampler, spec.schedule, kind=kind)


def cpu_generators(specs: Sequence[RenderSpec]) -> list[Any]:
    """One CPU generator per render, seeded with its seed: the same seed gives the same noise
    on any device, and an image does not depend on the batch it shared."""
    import torch

    return [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]


def step_callback(progress: Progress | None) -> Callable[..., dict[str, Any]] | None:
    """The pipeline's `callback_on_step_end` for `Family.render_batch`'s `progress`: it
    reports each step (live display, status page, the render lease's heartbeat) and stops
    the batch when the daemon aborts it. None when no progress is wanted."""
    return progress.callback if progress is not None else None


def sampling_arguments(pipe: Any, specs: Sequence[RenderSpec], progress: Progress | None,
                       kind: str = "eps") -> dict[str, Any]:
    """Sets the batch's sampler on `pipe` and returns the pipeline call's
    `num_inference_steps`, `generator` and `callback_on_step_end`, so that a render honours
    the job's steps, sampler, schedule and seeds and reports progress:

        pipe(prompt=..., guidance_scale=first.cfg, width=first.width, height=first.height,
             **sampling_arguments(pipe, specs, progress, self.sampler_kind))

    Specs of one batch share steps, sampler and schedule (their batch key), so the first
    spec's are used."""
    first = specs[0]
    pipe.scheduler = job_scheduler(pipe, first, kind)
    return {"num_inference_steps": first.steps, "generator": cpu_generators(specs),
            "callback_on_step_end": step_callback(progress)}
