"""Sidecar files: the `NAME.toml` a user puts beside a checkpoint or a LoRA file to say what
its header cannot (family, lineage, trigger words, a config folder, presets, ...).

The registry (checkpoints) and the LoRA library both read them; this module is the one reader,
so that a sidecar is read, parsed and checked the same way wherever it lies, and a broken one
gets the same message from both: the file's name, the key, what it must be. A checkpoint's
sidecar is `NAME.toml` beside the file or folder named NAME (a folder `sd-v1.5` has
`sd-v1.5.toml`); a LoRA's is the file's name with `.toml` for `.safetensors`.

    # my-lightning.toml, beside my-lightning.safetensors
    lineage = "sdxl"
    config = "configs/sdxl-base"     # relative paths count from the sidecar's folder
    steps = 6
    cfg = 1.5

    # mystery.toml, beside loras/mystery.safetensors
    family = "sdxl"
    trigger_words = ["mystery style"]

A1111's own `NAME.json` beside a LoRA (activation text, preferred weight) is read here too
(`a1111_sidecar`); it is advisory, so a broken one is logged and ignored.

Errors are SidecarError, a ValueError: both callers turn a broken sidecar into the file's
reason (a checkpoint "unrecognised", a LoRA "quarantined"), never into a crash.
"""

from __future__ import annotations

import difflib
import json
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import COMPONENT_KEYS, component_path
from daemon.presets import PRESET_KEYS, check_preset

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("family", "lineage", "config", "variant", "transformer_2", *COMPONENT_KEYS,
                   *PRESET_KEYS)
LORA_KEYS = ("family", "lineage", "trigger_words", "expert", "variant")

# Keys whose value is one piece of text, with an example for the message when it is not.
TEXT_KEYS = {
    "family": 'family = "sdxl"',
    "lineage": 'lineage = "pony"',
    "variant": 'variant = "distilled"',
    "expert": 'expert = "high"',
    "config": 'config = "configs/sdxl-base"',
    "transformer_2": 'transformer_2 = "wan2.2_t2v_low_noise_14B_Q8_0.gguf"',
}


class SidecarError(ValueError):
    """A sidecar that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class CheckpointSidecar:
    """What a checkpoint's sidecar says. Paths (`config`, `transformer_2`) are resolved
    against the sidecar's folder; a component file given as a bare file name stays bare (the
    registry looks it up in the UI trees' folders, Paths.component_folders)."""

    path: Path
    family: str | None = None
    lineage: str | None = None
    variant: str | None = None
    config: Path | None = None
    transformer_2: Path | None = None
    components: Mapping[str, Path] = field(default_factory=dict)  # text_encoder, vae, ...
    preset: Mapping[str, Any] = field(default_factory=dict)  # steps, cfg, ... (checked)

    def values(self) -> dict[str, object]:
        """The keys the sidecar sets, by CheckpointOverride's field names."""
        values: dict[str, object] = {key: getattr(self, key) for key in (
            "family", "lineage", "variant", "config", "transformer_2")
            if getattr(self, key) is not None}
        return {**values, **self.components, **self.preset}


@dataclass(frozen=True)
class LoraSidecar:
    """What a LoRA's sidecar says (config.toml's [loras.NAME] goes on top, in loras.py)."""

    path: Path
    family: str | None = None
    lineage: str | None = None
    variant: str | None = None
    expert: str | None = None  # checked against high / low / both with the probe's answer
    trigger_words: tuple[str, ...] | None = None

    def values(self) -> dict[str, object]:
        """The keys the sidecar sets."""
        return {key: getattr(self, key) for key in LORA_KEYS if getattr(self, key) is not None}


def checkpoint_sidecar_path(name: str, path: Path) -> Path:
    """Where checkpoint NAME's sidecar is: beside its file or folder, named after NAME (not
    `path.with_suffix`, which would cut a folder name at its last dot)."""
    return path.parent / f"{name}.toml"


def lora_sidecar_path(path: Path) -> Path:
    return path.with_suffix(".toml")


def read_checkpoint_sidecar(name: str, path: Path) -> CheckpointSidecar | None:
    """The sidecar of checkpoint NAME at `path`; None when there is none. Raises
    SidecarError.

    A Wan 2.2 A14B pair of GGUF files is declared in the high-noise file's sidecar:

        # wan2.2_t2v_high_noise_14B_Q8_0.toml
        config = "Wan2.2-T2V-A14B-Diffusers"            # UMT5, VAE, tokenizer, configs
        transformer_2 = "wan2.2_t2v_low_noise_14B_Q8_0.gguf"
    """
    sidecar = checkpoint_sidecar_path(name, path)
    data = read_table(sidecar, CHECKPOINT_KEYS)
    if data is None:
        return None
    where = f"sidecar {sidecar.name}"
    try:
        preset = check_preset(data, where)
    except ValueError as exc:
        raise SidecarError(str(exc)) from exc
    folder = sidecar.parent
    paths = {key: (folder / str(data[key])).resolve() for key in ("config", "transformer_2")
             if key in data}
    try:
        components = {key: component_path(data[key], folder, where, key)
                      for key in COMPONENT_KEYS if key in data}
    except ValueError as exc:
        raise SidecarError(str(exc)) from exc
    return CheckpointSidecar(path=sidecar, family=data.get("family"),
                             lineage=data.get("lineage"), variant=data.get("variant"),
                             config=paths.get("config"), transformer_2=paths.get("transformer_2"),
                             components=components, preset=preset)


def read_lora_sidecar(path: Path) -> LoraSidecar | None:
    """The sidecar of the LoRA file at `path`; None when there is none. Raises
    SidecarError."""
    sidecar = lora_sidecar_path(path)
    data = read_table(sidecar, LORA_KEYS)
    if data is None:
        return None
    triggers = data.get("trigger_words")
    if triggers is not None and not (isinstance(triggers, list)
                                     and all(isinstance(t, str) for t in triggers)):
        raise SidecarError(f"sidecar {sidecar.name}: trigger_words must be a list of strings")
    return LoraSidecar(path=sidecar, family=data.get("family"), lineage=data.get("lineage"),
                       variant=data.get("variant"), expert=data.get("expert"),
                       trigger_words=tuple(triggers) if triggers is not None else None)


def read_table(sidecar: Path, allowed: tuple[str, ...]) -> dict[str, Any] | None:
    """The sidecar's TOML table, its keys among `allowed` and its text keys text; None when
    the file does not exist. The file is read once (no exists-then-read race with a user
    saving it). Raises SidecarError naming the file and the key."""
    try:
        raw = sidecar.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as exc:
        raise SidecarError(f"sidecar {sidecar.name} is not valid TOML: {exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SidecarError(f"sidecar {sidecar.name} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        named = ", ".join(_with_hint(key, allowed) for key in unknown)
        raise SidecarError(f"sidecar {sidecar.name}: unknown key(s) {named}; "
                           f"allowed: {', '.join(allowed)}")
    for key, example in TEXT_KEYS.items():
        if key in data and not isinstance(data[key], str):
            raise SidecarError(f"sidecar {sidecar.name}: {key} = {data[key]!r} must be text, "
                               f"e.g. {example}")
    return data


def _with_hint(key: str, allowed: tuple[str, ...]) -> str:
    """An unknown key, with the allowed one it is probably a typo of."""
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


def a1111_sidecar(path: Path) -> dict[str, Any]:
    """A1111's `NAME.json` beside a LoRA file ({} when there is none or it is not JSON):
    "activation text", "preferred weight" (0 means unset), "negative text", "sd version"."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s: not a JSON object (%s)", sidecar, exc)
        return {}
    return data if isinstance(data, dict) else {}
