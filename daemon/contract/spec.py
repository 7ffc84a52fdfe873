"""Plain data that travels between intake, scheduler, worker and outputs.

Everything here is a frozen dataclass that round-trips through JSON (`to_json` /
`from_json`), because the same spec is stored in the database, embedded in every output
file, and read back to re-render an image exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Extras that only record where a render came from (its sweep labels, a LoRA's epoch, the
# wildcard template): they change no pixel, so renders differing only there share a batch.
RECORD_ONLY_EXTRAS = frozenset({"sweep", "sweep_axes", "epoch", "prompt_template",
                                "negative_prompt_template"})


@dataclass(frozen=True)
class LoraUse:
    """One LoRA applied to a render, as the job asked for it."""

    name: str
    strength: float = 1.0
    text_encoder_strength: float | None = None  # None: same as `strength`
    autov2: str | None = None  # sha256 of the whole file, 10 hex (Civitai AutoV2)
    autov3: str | None = None  # sha256 of the tensor data, 12 hex (Civitai AutoV3)
    expert: str | None = None  # Wan 2.2: "high", "low" or "both" noise experts


@dataclass(frozen=True)
class RenderSpec:
    """Everything needed to produce one output file, and to produce it again."""

    family: str  # family plugin name, e.g. "sdxl"
    checkpoint: str  # checkpoint name as the registry knows it
    prompt: str  # the prompt actually encoded (after family conventions)
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    sampler: str  # A1111 sampler name without schedule, e.g. "DPM++ 2M"
    schedule: str | None  # A1111 schedule type, e.g. "Karras"; None = sampler default
    width: int
    height: int
    user_prompt: str = ""  # the prompt as the user wrote it
    checkpoint_hash: str | None = None  # A1111 model hash (AutoV2, 10 hex)
    clip_skip: int | None = None  # recorded in the infotext only (see families)
    loras: tuple[LoraUse, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific settings

    def batch_key(self) -> str:
        """Renders with equal keys may share one pipeline call (prompt and seed may differ)."""
        shared = {
            "family": self.family,
            "checkpoint": self.checkpoint,
            "steps": self.steps,
            "cfg": self.cfg,
            "sampler": self.sampler,
            "schedule": self.schedule,
            "width": self.width,
            "height": self.height,
            "clip_skip": self.clip_skip,
            "loras": [dataclasses.asdict(lora) for lora in self.loras],
            "extra": {key: value for key, value in self.extra.items()
                      if key not in RECORD_ONLY_EXTRAS},
        }
        canonical = json.dumps(shared, sort_keys=True, separators=(",", ":"))
        # A short digest: it is stored per render and indexed for the scheduler.
        return hashlib.sha1(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RenderSpec:
        data = json.loads(text)
        data["loras"] = tuple(LoraUse(**lora) for lora in data.get("loras", ()))
        return cls(**data)
