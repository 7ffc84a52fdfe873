"""Hires fix and image-to-image for the SDXL lineage (SDXL, Pony, Illustrious).

Both run diffusers' `StableDiffusionXLImg2ImgPipeline` built `from_pipe` on the loaded
pipeline: it holds the very same modules (nothing is loaded twice, applied LoRAs stay
applied, since they are PEFT layers on those modules). Settings come from RenderSpec.extra
as intake checked them (daemon/contract/hires.py); every spec of a batch shares them (batch key).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from daemon.plugin_api import (
    LATENT_UPSCALERS,
    choose_sampler,
    exact_steps,
    hires_steps,
    hires_target,
    img2img_steps,
    make_scheduler,
    remember_scheduler_config,
    upscale_image,
    upscale_latents,
)

if TYPE_CHECKING:
    from daemon.plugin_api import Family, Progress, RenderSpec


def img2img_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline over the loaded pipeline's own modules (no load)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def total_steps(spec: RenderSpec) -> int:
    """Every denoising step one render of `spec` runs (for progress)."""
    hires = spec.extra.get("hires")
    denoising = spec.extra.get("denoising_strength")
    if "mask_path" in spec.extra or (
            "image_path" in spec.extra and denoising is not None and denoising < 1):
        return img2img_steps(spec.steps, denoising)
    return spec.steps + (hires_steps(spec.steps, hires) if hires else 0)


def source_image(spec: RenderSpec) -> Image.Image:
    """The job's input image at the render size (A1111's "just resize")."""
    with Image.open(spec.extra["image_path"]) as image:
        rgb = image.convert("RGB")
    if rgb.size != (spec.width, spec.height):
        rgb = rgb.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
    return rgb


def render_img2img(family: Family, pipe: Any, specs: list[RenderSpec],
                   conditioning: dict[str, Any], progress: Progress | None) -> list[Image.Image]:
    """Image-to-image at extra["denoising_strength"] d: diffusers runs int(steps * d) of the
    steps, as A1111 does. d = 0 keeps the input as it is (no step would run)."""
    first = specs[0]
    denoising = float(first.extra["denoising_strength"])
    source = source_image(first)
    if img2img_steps(first.steps, denoising) == 0:
        return [source.copy() for _ in specs]
    img2img = img2img_pipeline(pipe)
    img2img.scheduler = make_scheduler(remember_scheduler_config(pipe), first.sampler,
                                       first.schedule, kind=family.sampler_kind)
    generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
    result = img2img(**conditioning, image=[source] * len(specs), strength=denoising,
                     num_inference_steps=first.steps, guidance_scale=first.cfg,
                     generator=generators, output_type="pil",
                     callback_on_step_end=progress.callback if progress else None)
    return list(result.images)


def render_hires(family: Family, pipe: Any, specs: list[RenderSpec],
                 conditioning: dict[str, Any], hires_conditioning: dict[str, Any],
                 progress: Progress | None) -> list[Image.Image]:
    """The first pass at the job's size, the upscale, and the second pass at the target
    size running exactly the hires steps at the hires denoising strength."""
    first = specs[0]
    hires = first.extra["hires"]
    total = total_steps(first)
    latent = hires["upscaler"] in LATENT_UPSCALERS
    pipe.scheduler = make_scheduler(remember_scheduler_config(pipe), first.sampler,
                                    first.schedule, kind=family.sampler_kind)
    # One generator per render, carried through both passes: an image does not depend on
    # its batch, and the second pass's noise follows from the seed.
    generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
    low = pipe(**conditioning, num_inference_steps=first.steps, guidance_scale=first.cfg,
               width=first.width, height=first.height, generator=generators,
               output_type="latent" if latent else "pil",
               callback_on_step_end=progress.stage(0, total).callback if progress else None)
    size = hires_target(first.width, first.height, hires, family.defaults.size_multiple)
    if latent:
        image: Any = upscale_latents(low.images, size, hires["upscaler"], pipe.vae_scale_factor)
    else:
        model = first.extra.get("hires_upscaler_model")  # an ONNX upscaler's file
        image = [upscale_image(picture, size, hires["upscaler"], model)
                 for picture in low.images]
    sampler, schedule = first.sampler, first.schedule
    if hires.get("sampler"):
        choice = choose_sampler(hires["sampler"], None, family.sampler_kind)
        sampler, schedule = choice.sampler, choice.schedule
    img2img = img2img_pipeline(pipe)
    img2img.scheduler = make_scheduler(remember_scheduler_config(pipe), sampler, schedule,
                                       kind=family.sampler_kind)
    steps, strength = exact_steps(hires_steps(first.steps, hires),
                                  float(hires["denoising_strength"]))
    result = img2img(**hires_conditioning, image=image, strength=strength,
                     num_inference_steps=steps, guidance_scale=first.cfg,
                     generator=generators, output_type="pil",
                     callback_on_step_end=(progress.stage(first.steps, total).callback
                                           if progress else None))
    return list(result.images)


def render_inpaint(family: Family, pipe: Any, specs: list[RenderSpec],
                   conditioning: dict[str, Any], progress: Progress | None) -> list[Image.Image]:
    """Inpainting through `StableDiffusionXLInpaintPipeline.from_pipe`: the mask's white is
    redrawn at extra["denoising_strength"] (1 redraws it from noise), and the input's pixels
    outside the mask are laid back over the result, as A1111 does (the VAE round trip would
    otherwise soften what was to be kept)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    first = specs[0]
    denoising = float(first.extra["denoising_strength"])
    source = source_image(first)
    with Image.open(first.extra["mask_path"]) as opened:
        mask = opened.convert("L").resize(source.size, Image.Resampling.NEAREST)
    if img2img_steps(first.steps, denoising) == 0:
        return [source.copy() for _ in specs]
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    inpaint.scheduler = make_scheduler(remember_scheduler_config(pipe), first.sampler,
                                       first.schedule, kind=family.sampler_kind)
    generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
    result = inpaint(**conditioning, image=[source] * len(specs),
                     mask_image=[mask] * len(specs), strength=denoising,
                     num_inference_steps=first.steps, guidance_scale=first.cfg,
                     width=first.width, height=first.height, generator=generators,
                     output_type="pil",
                     callback_on_step_end=progress.callback if progress else None)
    return [Image.composite(image.convert("RGB"), source, mask) for image in result.images]
