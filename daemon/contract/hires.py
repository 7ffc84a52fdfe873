"""Hires fix and image-to-image: the job keys, their checks, and A1111's infotext fields.

A `[hires]` table asks for A1111's "hires fix": render at the job's size, upscale (in latent
space or in pixels), then run a second, partial denoising pass at the larger size. A top-level
`image` with `denoising_strength` on an image family asks for image-to-image.

What this module decides is the same for every family (the checked settings, the target
size, how many steps run, the infotext); running the passes is the family's, through
`Family.supports_hires` / `Family.supports_img2img` (families/sdxl/refine.py does it with diffusers'
img2img pipeline built `from_pipe`, sharing every loaded module and LoRA).

Settings travel in `RenderSpec.extra["hires"]` (the table as checked, with defaults filled
in) and `extra["denoising_strength"]`, so renders with equal settings share a batch key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.contract.jobfile import JobFileError, line_of_key

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from daemon.config import Limits, PostprocessStep

# A1111's latent upscalers: name -> torch.nn.functional.interpolate (mode, antialias).
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Pixel upscalers that need no model: A1111's built-in "Lanczos" and "Nearest".
PIXEL_UPSCALERS = ("Lanczos", "Nearest")
UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)

HIRES_KEYS = ("scale", "width", "height", "steps", "denoising_strength", "upscaler",
              "upscaler_fallback", "sampler", "prompt", "negative_prompt")
HIRES_EXAMPLE = ('[hires]\nscale = 2.0\nsteps = 10\ndenoising_strength = 0.5\n'
                 'upscaler = "Latent"')
DEFAULT_DENOISING = 0.7  # A1111's default for the hires pass
DEFAULT_IMG2IMG_DENOISING = 0.75  # A1111's default for image-to-image
DEFAULT_UPSCALER = "Latent"
MAX_SCALE = 8.0


def check_hires(table: dict[str, Any], text: str, limits: Limits) -> dict[str, Any]:
    """The `[hires]` table with its types and ranges checked and its defaults filled in (the
    form stored in RenderSpec.extra and written back by re-renders)."""
    line = line_of_key(text, "hires") or _line_of_table(text)
    for key in table:
        if key not in HIRES_KEYS:
            close = difflib.get_close_matches(key, HIRES_KEYS, n=1)
            raise JobFileError(f"unknown key `hires.{key}`", key=f"hires.{key}", line=line,
                               fix=f"did you mean `{close[0]}`?" if close else
                               f"allowed in [hires]: {', '.join(HIRES_KEYS)}")

    def number(key: str, low: float, high: float, whole: bool = False) -> float | int | None:
        value = table.get(key)
        if value is None:
            return None
        kinds = (int,) if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            kind = "a whole number" if whole else "a number"
            raise JobFileError(f"`hires.{key}` = {value!r} must be {kind} from {low:g} to "
                               f"{high:g}", key=f"hires.{key}", line=line_of_key(text, key) or line,
                               fix=HIRES_EXAMPLE)
        return value

    scale = number("scale", 1.0, MAX_SCALE)
    width = number("width", 0, limits.max_width, whole=True)
    height = number("height", 0, limits.max_height, whole=True)
    steps = number("steps", 0, limits.max_steps, whole=True)
    denoising = number("denoising_strength", 0.01, 1.0)
    if scale is not None and (width or height):
        raise JobFileError("[hires] gives both `scale` and `width`/`height`", key="hires",
                           line=line, fix="keep one: scale = 2.0, or width = 2048 and height = "
                           "2048 (A1111's \"Resize to\")")
    if scale is None and not (width or height):
        raise JobFileError("[hires] needs `scale` or `width`/`height`", key="hires", line=line,
                           fix=HIRES_EXAMPLE)
    strings = {}
    for key in ("upscaler", "upscaler_fallback", "sampler", "prompt", "negative_prompt"):
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise JobFileError(f"`hires.{key}` must be a string", key=f"hires.{key}",
                               line=line_of_key(text, key) or line, fix=HIRES_EXAMPLE)
        strings[key] = value
    # A name that is not built in may be an ONNX upscaler of config.toml's [[postprocess]]:
    # intake, which knows the config, decides (resolve_upscaler).
    upscaler = builtin_upscaler(strings["upscaler"] or DEFAULT_UPSCALER) or (
        strings["upscaler"] or "").strip()
    if strings["upscaler_fallback"] is not None:
        fallback = builtin_upscaler(strings["upscaler_fallback"])
        if fallback is None:
            raise JobFileError(f"`hires.upscaler_fallback` = {strings['upscaler_fallback']!r} "
                               "is not a built-in upscaler", key="hires.upscaler_fallback",
                               line=line_of_key(text, "upscaler_fallback") or line,
                               fix=f"use one of: {', '.join(UPSCALERS)}")
        strings["upscaler_fallback"] = fallback
    checked: dict[str, Any] = {
        "steps": int(steps or 0),
        "denoising_strength": float(denoising if denoising is not None else DEFAULT_DENOISING),
        "upscaler": upscaler,
    }
    if scale is not None:
        checked["scale"] = float(scale)
    else:
        checked["width"], checked["height"] = int(width or 0), int(height or 0)
    checked.update({key: value for key, value in strings.items()
                    if value is not None and key != "upscaler"})
    return checked


def builtin_upscaler(name: str) -> str | None:
    """The built-in upscaler `name` stands for (any case), or None."""
    return next((known for known in UPSCALERS if name.strip().lower() == known.lower()), None)


def resolve_upscaler(hires: dict[str, Any], steps: tuple[PostprocessStep, ...], text: str,
                     warnings: list[str]) -> tuple[dict[str, Any], Path | None]:
    """(the [hires] table, the ONNX model file) for the table's upscaler: a built-in one,
    the stem of an `upscale` model of config.toml's [[postprocess]] (as A1111 names ESRGAN
    models by file stem), or else `upscaler_fallback` with a warning; otherwise the job is
    refused."""
    name = hires["upscaler"]
    if name in UPSCALERS:
        return hires, None
    models = {step.model.stem.lower(): step.model for step in steps if step.kind == "upscale"}
    if name.lower() in models:
        return hires, models[name.lower()]
    if hires.get("upscaler_fallback"):
        warnings.append(f"hires upscaler {name!r} is not available here; the hires pass "
                        f"upscales with {hires['upscaler_fallback']} instead")
        return {**hires, "upscaler": hires["upscaler_fallback"]}, None
    known = [*UPSCALERS, *(model.stem for model in models.values())]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    raise JobFileError(
        f"`hires.upscaler` = {name!r} is not an upscaler lorafarm has", key="hires.upscaler",
        line=line_of_key(text, "upscaler"),
        fix=(f"did you mean {close[0]!r}? " if close else "") + f"use one of: {', '.join(known)}"
        + "; a model upscaler is an ONNX file of a [[postprocess]] step with kind = "
        '"upscale" in config.toml, named by its file stem')


def _line_of_table(text: str) -> int | None:
    for number, row in enumerate(text.splitlines(), start=1):
        if row.strip().startswith("[hires]"):
            return number
    return None


def hires_target(width: int, height: int, hires: dict[str, Any],
                 multiple: int) -> tuple[int, int]:
    """The second pass's size, as A1111 computes it (`int(width * scale)`; "Resize to" with a
    side of 0 keeps the aspect), rounded down to the family's size multiple."""
    if "scale" in hires:
        target_w, target_h = int(width * hires["scale"]), int(height * hires["scale"])
    else:
        target_w, target_h = hires.get("width", 0), hires.get("height", 0)
        if not target_w:
            target_w = int(width * target_h / height)
        if not target_h:
            target_h = int(height * target_w / width)
    return target_w - target_w % multiple, target_h - target_h % multiple


def exact_steps(steps: int, denoising: float, rounds_up: bool = False) -> tuple[int, float]:
    """(num_inference_steps, strength) that make diffusers' img2img run exactly `steps` steps
    at `denoising` (A1111's hires pass runs exactly its steps; diffusers' SD/SDXL img2img runs
    int(N * strength) of N, which would be 0 for N=4 at 0.2; Flux's runs N - int(N - N *
    strength), i.e. rounds up: `rounds_up`)."""
    total = max(steps, int(steps / denoising))
    nudge = -1e-6 if rounds_up else 1e-6
    return total, min(1.0, (steps + nudge) / total)


def hires_steps(spec_steps: int, hires: dict[str, Any]) -> int:
    """Steps of the second pass: `steps`, or the first pass's when 0 (A1111's meaning)."""
    return int(hires.get("steps") or spec_steps)


def img2img_steps(steps: int, denoising: float) -> int:
    """Steps an image-to-image render runs: A1111's and diffusers' int(steps * strength)."""
    return min(int(steps * denoising), steps)


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], upscaler: str,
                    vae_scale: int) -> torch.Tensor:
    import torch.nn.functional as functional

    mode, antialias = LATENT_UPSCALERS[upscaler]
    width, height = size
    kwargs: dict[str, Any] = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
    return functional.interpolate(latents, size=(height // vae_scale, width // vae_scale),
                                  mode=mode, **kwargs)


def upscale_image(image: Image.Image, size: tuple[int, int], upscaler: str,
                  model: str | None = None) -> Image.Image:
    """A pixel upscale to `size`: a PIL resampler, or an ONNX model (`model`, its file) run
    until the image reaches the size, then Lanczos to the exact size, as A1111 does with
    ESRGAN models."""
    from PIL import Image

    if model is None:
        resample = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
        return image.resize(size, resample[upscaler])
    from daemon.contract.onnx_models import load_model

    network = load_model(Path(model))
    for _ in range(4):  # a 2x model reaches 8x in three passes; enough for MAX_SCALE
        if image.width >= size[0] and image.height >= size[1]:
            break
        image = network.upscale(image)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def infotext_fields(extra: dict[str, Any], sampler: str, schedule: str | None,
                    prompt: str, negative_prompt: str) -> list[tuple[str, object]]:
    """A1111's own fields for a hires or image-to-image render (its names and formats, so
    A1111, Civitai and sd-parsers read them back)."""
    fields: list[tuple[str, object]] = []
    hires = extra.get("hires")
    if "denoising_strength" in extra:
        fields.append(("Denoising strength", extra["denoising_strength"]))
    elif hires:
        fields.append(("Denoising strength", hires["denoising_strength"]))
    if not hires:
        return fields
    if "scale" in hires:
        fields.append(("Hires upscale", hires["scale"]))
    else:
        fields.append(("Hires resize", f"{hires['width']}x{hires['height']}"))
    if hires.get("steps"):
        fields.append(("Hires steps", hires["steps"]))
    fields.append(("Hires upscaler", hires["upscaler"]))
    if hires.get("sampler"):
        from daemon.contract.samplers import parse_sampler

        name, kind = parse_sampler(hires["sampler"])
        if (name, kind) != (sampler, schedule):
            fields.append(("Hires sampler", name))
            if kind:
                fields.append(("Hires schedule type", kind))
    if hires.get("prompt") is not None and hires["prompt"] != prompt:
        fields.append(("Hires prompt", hires["prompt"]))
    if hires.get("negative_prompt") is not None and hires["negative_prompt"] != negative_prompt:
        fields.append(("Hires negative prompt", hires["negative_prompt"]))
    return fields


def job_hires_from_infotext(fields: dict[str, str]) -> tuple[dict[str, Any] | None,
                                                             float | None]:
    """([hires] table, top-level denoising_strength) from A1111 infotext fields. A
    `Denoising strength` with no hires field is image-to-image (its input is not in the
    infotext: the caller warns)."""
    denoising = float(fields["Denoising strength"]) if "Denoising strength" in fields else None
    if not any(key in fields for key in ("Hires upscale", "Hires resize")):
        return None, denoising
    table: dict[str, Any] = {}
    if "Hires upscale" in fields:
        table["scale"] = float(fields["Hires upscale"])
    else:
        width, _, height = fields["Hires resize"].lower().partition("x")
        table["width"], table["height"] = int(width), int(height)
    if "Hires steps" in fields:
        table["steps"] = int(float(fields["Hires steps"]))
    if denoising is not None:
        table["denoising_strength"] = denoising
    if "Hires upscaler" in fields:
        table["upscaler"] = fields["Hires upscaler"]
        if builtin_upscaler(fields["Hires upscaler"]) is None:
            # A model upscaler (ESRGAN...): used if config.toml has it, else Lanczos, and
            # intake warns (resolve_upscaler).
            table["upscaler_fallback"] = "Lanczos"
    if "Hires sampler" in fields:
        schedule = fields.get("Hires schedule type", "")
        table["sampler"] = (f"{fields['Hires sampler']} {schedule}".strip()
                            if schedule not in ("", "Automatic") else fields["Hires sampler"])
    if "Hires prompt" in fields:
        table["prompt"] = fields["Hires prompt"]
    if "Hires negative prompt" in fields:
        table["negative_prompt"] = fields["Hires negative prompt"]
    return table, None
