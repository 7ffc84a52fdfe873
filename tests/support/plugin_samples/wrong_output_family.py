"""A family whose render_batch returns the pipeline's output object instead of its images."""

from __future__ import annotations

from typing import Any

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


class WrongOutputFamily(SDXLFamily):
    name = "wrong-output"
    display_name = "Returns the pipeline output (test)"

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return None  # claims a checkpoint only when config.toml names it

    def render_batch(self, pipe: Any, specs: Any, device: Any, progress: Any = None) -> Any:
        class StableDiffusionXLPipelineOutput:  # what `pipe(...)` returns
            images: list[Any] = []
        return StableDiffusionXLPipelineOutput()


@hookimpl
def register_families(register: Any) -> None:
    register(WrongOutputFamily())
