"""Pony Diffusion V6 XL: the SDXL architecture with its own prompt conventions and a LoRA
lineage of its own (Pony LoRAs do not carry over to plain SDXL or Illustrious models)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from daemon.plugin_api import DemoAssets, FamilyDefaults, hookimpl
from families.sdxl.lineage import PONY
from families.sdxl.sdxl import SDXLFamily

PONY_QUALITY_TAGS = ("score_9", "score_8_up", "score_7_up", "score_6_up", "score_5_up",
                     "score_4_up")
_SCORE_TAG = re.compile(r"\bscore_\d(_up)?\b")


class PonyFamily(SDXLFamily):
    name = "pony"
    display_name = "Pony Diffusion (SDXL)"
    lineage = PONY
    # The settings Pony V6 XL's model card recommends. "Clip skip 2" is what
    # diffusers' SDXL pipeline does by default, so it is recorded, not passed on.
    defaults = FamilyDefaults(width=1024, height=1024, steps=25, cfg=7.0, sampler="Euler a",
                              schedule=None, clip_skip=2)

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return 0.9 if lineage == self.lineage else None

    def apply_conventions(self, prompt: str, negative_prompt: str | None,
                          enabled: bool) -> tuple[str, str, list[str]]:
        """Pony was trained with score tags in front of every caption; prepend them unless
        the prompt already has score tags. `source_*` and `rating_*` tags pass as written."""
        prompt, negative, notes = super().apply_conventions(prompt, negative_prompt, enabled)
        if enabled and not _SCORE_TAG.search(prompt):
            prompt = ", ".join(PONY_QUALITY_TAGS) + (", " + prompt if prompt else "")
        return prompt, negative, notes

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        return _lineage_demo(self, models_dir, "tiny-pony", seed=2, title="Pony Diffusion V6 XL "
                             "(tiny random weights)", prompt="source_anime, rating_safe, a fox "
                             "in a forest")


def _lineage_demo(family: SDXLFamily, models_dir: Path, name: str, seed: int, title: str,
                  prompt: str) -> DemoAssets:
    """A single-file tiny checkpoint whose metadata names its lineage, as users have them."""
    from families.sdxl.tiny import build_tiny_sdxl_pipeline, save_tiny_sdxl_single_file

    save_tiny_sdxl_single_file(build_tiny_sdxl_pipeline(seed=seed),
                               models_dir / f"{name}.safetensors",
                               metadata={"modelspec.title": title,
                                         "modelspec.architecture": "stable-diffusion-xl-v1-base"})
    job = (f'checkpoint = "{name}"\nprompt = "{prompt}"\nseed = {seed * 1000}\ncount = 2\n'
           "steps = 4\nwidth = 64\nheight = 64\n")
    return DemoAssets(checkpoint_overrides={name: {"config": "configs/tiny-sdxl"}},
                      jobs={f"{family.name}.toml": job})


@hookimpl
def register_families(register: Any) -> None:
    register(PonyFamily())
