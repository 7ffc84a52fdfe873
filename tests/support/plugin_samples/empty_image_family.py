"""A family that renders 0x0 images: valid PIL images that no PNG writer can save."""

from __future__ import annotations

from typing import Any

from PIL import Image

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


class EmptyImageFamily(SDXLFamily):
    name = "empty-image"
    display_name = "Renders empty images (test)"

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return None

    def render_batch(self, pipe: Any, specs: Any, device: Any, progress: Any = None) -> Any:
        return [Image.new("RGB", (0, 0)) for _ in specs]


@hookimpl
def register_families(register: Any) -> None:
    register(EmptyImageFamily())
