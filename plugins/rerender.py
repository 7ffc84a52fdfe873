"""Re-render from an image: a PNG (lorafarm's own, or A1111 / Forge infotext) or a lorafarm
MP4 dropped into jobs/ becomes a job with its parameters.

The checkpoint and LoRAs are looked up by hash first (the file may have another name on
this machine), then by name; intake names whatever cannot be resolved in the error file.
lorafarm's own files carry the full render spec, so they re-render exactly; A1111 infotext
carries what A1111 writes (prompt with <lora:...> tags, sampler, steps, CFG, seed, size,
model hash and name, Lora hashes).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from PIL import Image, UnidentifiedImageError

from daemon.plugin_api import (
    SPEC_CHUNK,
    JobFileError,
    RenderSpec,
    hookimpl,
    job_hires_from_infotext,
)
from plugins.a1111_metadata import parse_infotext

# Extra render settings a spec may carry that are job keys too.
EXTRA_KEYS = ("guidance", "true_cfg", "frames", "fps", "flow_shift", "guidance_2", "image",
              "hires", "denoising_strength", "mask")

# Infotext fields a re-render turns into job keys, or that only describe the file (Version,
# Civitai's Hashes, the Size the job keys carry). Any other field gets a job warning naming
# it: a re-render never differs from its source without a word.
HONOURED_FIELDS = frozenset({
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
    "Distilled CFG Scale", "Lora hashes", "Hashes", "Version", "Denoising strength",
    "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler",
    "Hires schedule type", "Hires prompt", "Hires negative prompt", "TI hashes",
})


@hookimpl
def register_job_parsers(register: Callable[..., None]) -> None:
    register(".png", parse_png, binary=True)
    register(".mp4", parse_mp4, binary=True)


def parse_png(raw: bytes) -> dict[str, Any]:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            text = dict(getattr(image, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as exc:
        raise JobFileError(f"not a readable PNG ({exc})",
                           fix="drop a PNG saved by lorafarm, A1111 or Forge") from exc
    return _job_from_text(text)


def parse_mp4(raw: bytes) -> dict[str, Any]:
    import av

    try:
        with av.open(io.BytesIO(raw)) as container:
            metadata = dict(container.metadata)
    except (av.error.FFmpegError, OSError) as exc:
        raise JobFileError(f"not a readable MP4 ({exc})",
                           fix="drop an MP4 written by lorafarm") from exc
    return _job_from_text(metadata)


def _job_from_text(text: dict[str, str]) -> dict[str, Any]:
    if SPEC_CHUNK in text:
        try:
            return job_from_spec(RenderSpec.from_json(text[SPEC_CHUNK]))
        except (ValueError, TypeError, KeyError) as exc:
            raise JobFileError(f"the embedded lorafarm spec is damaged ({exc})",
                               fix="use the A1111 parameters instead, or another file") from exc
    if "parameters" in text:
        return job_from_infotext(text["parameters"])
    raise JobFileError("the file carries no generation parameters (no lorafarm spec, no A1111 "
                       "`parameters` text)", fix="drop a PNG written by lorafarm, A1111 or "
                       "Forge; images meant as inputs go into the inputs folder")


def job_from_spec(spec: RenderSpec) -> dict[str, Any]:
    """Exactly the render again: the prompt as encoded, conventions already applied."""
    sampler = f"{spec.sampler} {spec.schedule}" if spec.schedule else spec.sampler
    job: dict[str, Any] = {
        "checkpoint": spec.checkpoint, "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt, "seed": spec.seed, "steps": spec.steps,
        "cfg": spec.cfg, "sampler": sampler, "width": spec.width, "height": spec.height,
        "conventions": False,
    }
    if spec.checkpoint_hash:
        job["checkpoint_hash"] = spec.checkpoint_hash
    if spec.loras:
        job["loras"] = [{"name": lora.name, "strength": lora.strength,
                         **({"text_encoder_strength": lora.text_encoder_strength}
                            if lora.text_encoder_strength is not None else {}),
                         **({"expert": lora.expert} if lora.expert else {})}
                        for lora in spec.loras]
        job["lora_hashes"] = {lora.name: lora.autov3 or lora.autov2 for lora in spec.loras
                              if lora.autov3 or lora.autov2}
    for key in EXTRA_KEYS:
        if key in spec.extra:
            job[key] = spec.extra[key]
    if spec.extra.get("embeddings"):
        job["embedding_hashes"] = {e["name"]: e["autov2"] for e in spec.extra["embeddings"]
                                   if e.get("autov2")}
    return job


def job_from_infotext(infotext: str) -> dict[str, Any]:
    """A1111 / Forge parameters: the prompt keeps its <lora:...> tags (intake reads them)."""
    prompt, negative, fields = parse_infotext(infotext)
    job: dict[str, Any] = {"prompt": prompt, "conventions": False}
    if negative:
        job["negative_prompt"] = negative
    missing = [key for key in ("Model", "Steps", "Seed") if key not in fields]
    if not prompt.strip() or missing:
        raise JobFileError(f"the A1111 parameters lack {', '.join(missing) or 'a prompt'}",
                           key="parameters", fix="drop an image whose parameters are complete")
    job["checkpoint"] = fields["Model"]
    if "Model hash" in fields:
        job["checkpoint_hash"] = fields["Model hash"]
    numbers = {"Steps": ("steps", int), "Seed": ("seed", int), "CFG scale": ("cfg", float),
               "Distilled CFG Scale": ("guidance", float)}
    for field, (key, kind) in numbers.items():
        if field in fields:
            try:
                job[key] = kind(float(fields[field]))
            except ValueError as exc:
                raise JobFileError(f"`{field}: {fields[field]}` is not a number",
                                   key=field) from exc
    if "Sampler" in fields:
        schedule = fields.get("Schedule type", "")
        job["sampler"] = f"{fields['Sampler']} {schedule}".strip() if schedule not in (
            "", "Automatic") else fields["Sampler"]
    if "Size" in fields:
        try:
            width, height = (int(v) for v in fields["Size"].lower().split("x"))
        except ValueError as exc:
            raise JobFileError(f"`Size: {fields['Size']}` is not WIDTHxHEIGHT",
                               key="Size") from exc
        job["width"], job["height"] = width, height
    if "Lora hashes" in fields:
        job["lora_hashes"] = _name_hashes(fields["Lora hashes"])
    if "TI hashes" in fields:
        job["embedding_hashes"] = _name_hashes(fields["TI hashes"])
    warnings = [f"the source image's `{key}: {value}` is not honoured by this re-render"
                for key, value in fields.items() if key not in HONOURED_FIELDS]
    try:
        hires, denoising = job_hires_from_infotext(fields)
    except ValueError as exc:
        raise JobFileError(f"the hires fields cannot be read ({exc})", key="Hires upscale",
                           fix="drop an image whose parameters are complete") from exc
    if hires is not None:
        job["hires"] = hires
    elif denoising is not None:
        # Image-to-image: the input image is not in the infotext.
        warnings.append(f"the source image was image-to-image (`Denoising strength: "
                        f"{fields['Denoising strength']}`); its input image is not in the "
                        "file, so this re-render is text-to-image")
    if warnings:
        job["rerender_warnings"] = warnings
    return job


def _name_hashes(value: str) -> dict[str, str]:
    """"name: hash, name2: hash" (A1111's Lora hashes and TI hashes) as a dict."""
    hashes = {}
    for pair in value.split(","):
        name, _, digest = pair.partition(":")
        if name.strip() and digest.strip():
            hashes[name.strip()] = digest.strip()
    return hashes
