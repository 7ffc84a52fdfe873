"""What a post-processing plugin returns (the `post_process` hook) and how the results of
several plugins combine. The daemon records them (daemon/output/postprocess.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCORE, TAG, GATE = "score", "tag", "gate"


GATE_FLAG, GATE_RESEED = "flag", "reseed"


@dataclass
class PostProcessResult:
    """What one plugin made of one image. `image` replaces the render's image (written with
    the same metadata); `scores` and `tags` map names to numbers; `gate` is "flag" or
    "reseed" when the image fell below a quality threshold, with `gate_reason` saying which
    score and threshold."""

    image: Any | None = None  # PIL image
    scores: dict[str, float] = field(default_factory=dict)
    tags: dict[str, float] = field(default_factory=dict)
    gate: str | None = None
    gate_reason: str = ""
    gate_score: float = 0.0


def merge_results(results: list[PostProcessResult | None]) -> PostProcessResult:
    """Several plugins' results as one: the last image wins, a reseed outranks a flag."""
    merged = PostProcessResult()
    for result in results:
        if result is None:
            continue
        if result.image is not None:
            merged.image = result.image
        merged.scores.update(result.scores)
        merged.tags.update(result.tags)
        if result.gate and (merged.gate is None or result.gate == GATE_RESEED):
            merged.gate, merged.gate_reason = result.gate, result.gate_reason
            merged.gate_score = result.gate_score
    return merged
