"""Illustrious XL (and NoobAI): the SDXL architecture trained on Danbooru tags, with its own
quality tags and negative prompt, and its own LoRA lineage. Never Pony's score tags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from daemon.plugin_api import DemoAssets, FamilyDefaults, hookimpl
from families.sdxl.lineage import ILLUSTRIOUS
from families.sdxl.pony import _lineage_demo
from families.sdxl.sdxl import SDXLFamily

ILLUSTRIOUS_QUALITY_TAGS = ("masterpiece", "best quality", "good quality")
ILLUSTRIOUS_NEGATIVE = ("worst quality, bad quality, low quality, lowres, bad anatomy, "
                        "bad hands, extra digits, fewer digits, jpeg artifacts, signature, "
                        "watermark, username, blurry")
_SCORE_TAG = re.compile(r"\s*\bscore_\d(?:_up)?\b\s*,?")


class IllustriousFamily(SDXLFamily):
    name = "illustrious"
    display_name = "Illustrious XL (SDXL)"
    lineage = ILLUSTRIOUS
    defaults = FamilyDefaults(width=1024, height=1024, steps=28, cfg=6.0, sampler="Euler a",
                              schedule=None, negative_prompt=ILLUSTRIOUS_NEGATIVE)

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return 0.9 if lineage == self.lineage else None

    def apply_conventions(self, prompt: str, negative_prompt: str | None,
                          enabled: bool) -> tuple[str, str, list[str]]:
        """Quality tags in front unless present; the default negative prompt when the job
        gives none; Pony score tags removed (Illustrious never learned them)."""
        if not enabled:
            return prompt, negative_prompt or "", []
        prompt, negative, notes = super().apply_conventions(prompt, negative_prompt, enabled)
        if _SCORE_TAG.search(prompt):
            prompt = _SCORE_TAG.sub("", prompt).strip().strip(",").strip()
            notes.append("removed Pony score tags (score_9, ...): Illustrious models were not "
                         "trained on them")
        missing = [t for t in ILLUSTRIOUS_QUALITY_TAGS if t not in prompt]
        if missing == list(ILLUSTRIOUS_QUALITY_TAGS):
            prompt = ", ".join(ILLUSTRIOUS_QUALITY_TAGS) + (", " + prompt if prompt else "")
        return prompt, negative, notes

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        return _lineage_demo(self, models_dir, "tiny-illustrious", seed=3,
                             title="Illustrious XL v1.0 (tiny random weights)",
                             prompt="1girl, solo, red scarf, snowy street")


@hookimpl
def register_families(register: Any) -> None:
    register(IllustriousFamily())
