"""Hires fix for Flux.1 (dev, schnell): the first pass at the job's size, the upscale (the
packed latents unpacked first, for the latent upscalers), and a second pass through
diffusers' `FluxImg2ImgPipeline` built `from_pipe`: the same modules and LoRAs, no load."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from daemon.plugin_api import (
    LATENT_UPSCALERS,
    choose_sampler,
    exact_steps,
    hires_steps,
    hires_target,
    make_scheduler,
    remember_scheduler_config,
    upscale_image,
    upscale_latents,
)

if TYPE_CHECKING:
    from daemon.plugin_api import Progress, RenderSpec


def render_flux_hires(family: Any, pipe: Any, specs: list[RenderSpec],
                      options: dict[str, Any], progress: Progress | None) -> list[Image.Image]:
    """`family` is the FluxFamily (typed loosely: its module imports this one)."""
    from diffusers import FluxImg2ImgPipeline

    first = specs[0]
    hires = first.extra["hires"]
    second_steps = hires_steps(first.steps, hires)
    total = first.steps + second_steps
    latent = hires["upscaler"] in LATENT_UPSCALERS
    negative = first.extra.get("true_cfg") is not None
    common = {"guidance_scale": family.guidance(first),
              "max_sequence_length": family.max_sequence_length, **options}
    pipe.scheduler = make_scheduler(remember_scheduler_config(pipe), first.sampler,
                                    first.schedule, kind=family.sampler_kind)
    # One generator per render through both passes: no image depends on its batch.
    generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
    low = pipe(**family.prompt_conditioning(pipe, specs, negative=negative),
               num_inference_steps=first.steps, width=first.width, height=first.height,
               generator=generators, output_type="latent" if latent else "pil",
               callback_on_step_end=progress.stage(0, total).callback if progress else None,
               **common)
    size = hires_target(first.width, first.height, hires, family.defaults.size_multiple)
    if latent:
        unpacked = pipe._unpack_latents(low.images, first.height, first.width,
                                        pipe.vae_scale_factor)
        image: Any = upscale_latents(unpacked, size, hires["upscaler"], pipe.vae_scale_factor)
    else:
        model = first.extra.get("hires_upscaler_model")  # an ONNX upscaler's file
        image = [upscale_image(picture, size, hires["upscaler"], model)
                 for picture in low.images]
    second = [replace(spec, prompt=hires.get("prompt", spec.prompt),
                      negative_prompt=hires.get("negative_prompt", spec.negative_prompt))
              for spec in specs]
    sampler, schedule = first.sampler, first.schedule
    if hires.get("sampler"):
        choice = choose_sampler(hires["sampler"], None, family.sampler_kind)
        sampler, schedule = choice.sampler, choice.schedule
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = make_scheduler(remember_scheduler_config(pipe), sampler, schedule,
                                       kind=family.sampler_kind)
    steps, strength = exact_steps(second_steps, float(hires["denoising_strength"]),
                                  rounds_up=True)
    result = img2img(**family.prompt_conditioning(img2img, second, negative=negative),
                     image=image, strength=strength, num_inference_steps=steps,
                     width=size[0], height=size[1], generator=generators, output_type="pil",
                     callback_on_step_end=(progress.stage(first.steps, total).callback
                                           if progress else None),
                     **common)
    return list(result.images)
