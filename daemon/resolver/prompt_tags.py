"""A1111's LoRA tags in prompts: `<lora:NAME:WEIGHT>`, `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`,
and the named forms `<lora:NAME:te=0.5:unet=0.8>`.

With one number both weights are equal; with two, the first is the text encoder's and the
second the UNet's (as A1111's Lora extension reads them). Tags are removed from the text
the encoder sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"<lora:([^:<>]+)((?::[^:<>]*)*)>", re.IGNORECASE)


class PromptTagError(ValueError):
    pass


@dataclass(frozen=True)
class PromptLora:
    name: str
    strength: float  # the diffusion model's (UNet/transformer) weight
    text_encoder_strength: float


def extract_lora_tags(prompt: str) -> tuple[str, list[PromptLora]]:
    """(prompt without the tags, the LoRAs the tags named)."""
    found: list[PromptLora] = []
    for match in _TAG.finditer(prompt):
        found.append(_parse(match.group(0), match.group(1).strip(), match.group(2)))
    cleaned = _TAG.sub("", prompt)
    # Tidy what removing a tag leaves behind: doubled spaces and commas, edges.
    cleaned = re.sub(r"[ \t]{2,}", " ", cleaned)
    cleaned = re.sub(r"\s*,\s*(,\s*)+", ", ", cleaned)
    return cleaned.strip().strip(",").strip(), found


def _parse(tag: str, name: str, rest: str) -> PromptLora:
    fields = [f.strip() for f in rest.split(":")[1:]] if rest else []
    te: float | None = None
    unet: float | None = None
    positional: list[float] = []
    for field in fields:
        if not field:
            continue
        key, _, value = field.partition("=")
        try:
            if value:
                number = float(value)
                if key.strip().lower() == "te":
                    te = number
                elif key.strip().lower() == "unet":
                    unet = number
                else:
                    raise PromptTagError(f"{tag}: unknown named weight {key!r} (use te= or unet=)")
            else:
                positional.append(float(field))
        except ValueError as exc:
            if isinstance(exc, PromptTagError):
                raise
            raise PromptTagError(f"{tag}: {field!r} is not a number; write e.g. "
                                 f"<lora:{name}:0.8>") from exc
    if len(positional) > 2:
        raise PromptTagError(f"{tag}: at most two weights (text encoder, UNet)")
    # A1111: te = named te, else the first number, else 1; unet = named unet, else the second
    # number, else the text encoder's weight.
    if te is None:
        te = positional[0] if positional else 1.0
    if unet is None:
        unet = positional[1] if len(positional) == 2 else te
    return PromptLora(name=name, strength=unet, text_encoder_strength=te)
