"""What a LoRA file is, from its safetensors header alone: layout, rank, alpha, trigger words,
the checkpoint it was trained on, and the two hashes Civitai shows.

Which *family* a LoRA belongs to is asked of the family plugins (`Family.probe_lora`); this
module knows only what every LoRA file has in common. Layout names (kohya, diffusers, peft,
original, xlabs, lycoris-loha, lycoris-lokr) are described in docs/writing-a-family.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from daemon.formats.safetensors_header import SafetensorsHeader

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_",
                  "lora_transformer_")
DIFFUSERS_PREFIXES = ("unet.", "transformer.", "transformer_2.", "text_encoder.",
                      "text_encoder_2.", "text_encoder_3.")
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".down.weight")
MAX_TRIGGERS = 8


@dataclass(frozen=True)
class LoraFacts:
    layout: str  # see module docstring; "unknown" when nothing matched
    rank: int | None
    alpha: float | None  # None: the layout's default (alpha = rank, scale 1)
    triggers: list[str] = field(default_factory=list)
    base_model: str | None = None  # ss_sd_model_name: the checkpoint it was trained on
    base_model_hash: str | None = None
    dora: bool = False
    module_keys: frozenset[str] = frozenset()  # module names with their layout prefix


def detect_layout(keys: list[str]) -> str:
    """The key layout a LoRA file uses (the first family of names that matches)."""
    if any(".hada_w1_a" in k for k in keys):
        return "lycoris-loha"
    if any(".lokr_w1" in k for k in keys):
        return "lycoris-lokr"
    if any(".processor." in k and "_lora" in k for k in keys):
        return "xlabs"
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "original"
    if any(k.startswith(DIFFUSERS_PREFIXES) for k in keys):
        return "diffusers"
    return "unknown"


def module_names(keys: list[str]) -> frozenset[str]:
    """The patched module names (keys without their lora_down/lora_A/alpha suffix)."""
    names = set()
    for key in keys:
        for suffix in (*DOWN_SUFFIXES, ".lora_up.weight", ".lora_B.weight", ".lora.up.weight",
                       ".up.weight", ".alpha", ".dora_scale", ".hada_w1_a", ".lokr_w1"):
            if key.endswith(suffix):
                names.add(key[: -len(suffix)])
                break
    return frozenset(names)


def probe_lora_file(header: SafetensorsHeader) -> LoraFacts:
    keys = header.keys()
    layout = detect_layout(keys)
    ranks = [info.shape[0] for key, info in header.tensors.items()
             if key.endswith(DOWN_SUFFIXES) and info.shape]
    rank = Counter(ranks).most_common(1)[0][0] if ranks else None
    meta = header.metadata
    return LoraFacts(
        layout=layout,
        rank=rank,
        alpha=_alpha(header, meta),
        triggers=trigger_words(meta),
        base_model=meta.get("ss_sd_model_name") or None,
        base_model_hash=meta.get("ss_new_sd_model_hash") or meta.get("ss_sd_model_hash") or None,
        dora=any(k.endswith(".dora_scale") for k in keys),
        module_keys=module_names(keys),
    )


def _alpha(header: SafetensorsHeader, meta: dict[str, str]) -> float | None:
    for key, info in header.tensors.items():
        if key.endswith(".alpha") and info.end - info.start in (2, 4, 8):
            return read_scalar(header, key)
    try:
        return float(meta["ss_network_alpha"])
    except (KeyError, ValueError):
        return None


def read_scalar(header: SafetensorsHeader, key: str) -> float:
    """One scalar tensor's value, read straight from the file (a few bytes)."""
    info = header.tensors[key]
    with header.path.open("rb") as handle:
        handle.seek(header.data_offset + info.start)
        raw = handle.read(info.end - info.start)
    if info.dtype == "F32":
        return float(struct.unpack("<f", raw)[0])
    if info.dtype == "F64":
        return float(struct.unpack("<d", raw)[0])
    if info.dtype == "F16":
        return float(struct.unpack("<e", raw)[0])
    if info.dtype == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    raise ValueError(f"unexpected dtype {info.dtype} for {key}")


def trigger_words(meta: dict[str, str]) -> list[str]:
    """modelspec.trigger_phrase first, then the most frequent training tags."""
    words: list[str] = []
    phrase = meta.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        words.extend(p.strip() for p in phrase.split(",") if p.strip())
    counts = tag_frequency(meta)
    for tag, _ in counts.most_common(MAX_TRIGGERS):
        if tag not in words:
            words.append(tag)
    return words[:MAX_TRIGGERS]


def tag_frequency(meta: dict[str, str]) -> Counter[str]:
    """ss_tag_frequency ({dataset: {tag: count}}), summed over datasets."""
    counts: Counter[str] = Counter()
    try:
        data = json.loads(meta.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return counts
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, int | float):
                        counts[str(tag).strip()] += int(count)
    return counts


def civitai_hashes(path: Path, data_offset: int) -> tuple[str, str, str]:
    """(sha256 of the file, AutoV2 = its first 10 hex, AutoV3 = the first 12 hex of the
    sha256 of the tensor data after the header), in one read of the file."""
    whole = hashlib.sha256()
    tensors = hashlib.sha256()
    position = 0
    with path.open("rb") as handle:
        while block := handle.read(8 * 1024 * 1024):
            whole.update(block)
            if position + len(block) > data_offset:
                tensors.update(block[max(0, data_offset - position):])
            position += len(block)
    digest = whole.hexdigest()
    return digest, digest[:10], tensors.hexdigest()[:12]
