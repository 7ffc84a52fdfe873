"""Lineage inside the SDXL architecture: plain SDXL, Pony and Illustrious share every shape,
yet their LoRAs do not cross over. Shapes cannot tell them apart (every tensor of a Pony
LoRA has an SDXL LoRA's shape); metadata and file names can, and the user can always
override (sidecar or config.toml).

The signals, strongest first:
1. the checkpoint a LoRA was trained on (`ss_sd_model_name`), or a checkpoint's own title
   (`modelspec.title`);
2. the file name (`pony`, `illustrious`, `noob`, `ilxl`);
3. Pony's score tags (`score_9`, ...) among the training tags (`ss_tag_frequency`).
`ss_base_model_version` and `modelspec.architecture` say "SDXL" for all three, so they
confirm the architecture only.
"""

from __future__ import annotations

import re

from daemon.plugin_api import tag_frequency

SDXL, PONY, ILLUSTRIOUS = "sdxl", "pony", "illustrious"
LINEAGES = (SDXL, PONY, ILLUSTRIOUS)

_NAME_PATTERNS = (
    (PONY, re.compile(r"pony|pdxl", re.IGNORECASE)),
    (ILLUSTRIOUS, re.compile(r"illustrious|noob|ilxl|\bil[-_]?xl\b|wai[-_]?nsfw", re.IGNORECASE)),
    (SDXL, re.compile(r"sd[-_]?xl[-_]?base|sd_xl_base|sdxl[-_]?base", re.IGNORECASE)),
)
PONY_SCORE_TAGS = ("score_9", "score_8_up", "score_7_up")


def lineage_from_name(text: str) -> str | None:
    for lineage, pattern in _NAME_PATTERNS:
        if pattern.search(text):
            return lineage
    return None


def guess_lineage(metadata: dict[str, str], file_name: str) -> tuple[str | None, str]:
    """(lineage or None, what decided it) for an SDXL-architecture LoRA or checkpoint."""
    trained_on = metadata.get("ss_sd_model_name", "")
    if trained_on and (found := lineage_from_name(trained_on)):
        return found, f"trained on {trained_on!r} (ss_sd_model_name)"
    explicit = metadata.get("lorafarm.lineage", "").strip().lower()
    if explicit in LINEAGES:
        return explicit, "lorafarm.lineage metadata"
    title = metadata.get("modelspec.title", "")
    if title and (found := lineage_from_name(title)):
        return found, f"modelspec.title {title!r}"
    if found := lineage_from_name(file_name):
        return found, f"file name {file_name!r}"
    tags = tag_frequency(metadata)
    if any(tag in tags for tag in PONY_SCORE_TAGS):
        return PONY, "Pony score tags (score_9, ...) in its training tags"
    return None, "no lineage signal in metadata or file name"
