"""A family whose LoRA loading has a bug (an attribute it never set)."""

from __future__ import annotations

from typing import Any

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


class RaisingLoraFamily(SDXLFamily):
    name = "raising-lora"
    display_name = "Cannot load LoRAs (test)"

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return None

    def load_lora(self, pipe: Any, path: Any, adapter_name: str, lora: Any) -> None:
        pipe.load_lora_weights(str(path), adapter_name=adapter_name, prefix=self.lora_prefix)


@hookimpl
def register_families(register: Any) -> None:
    register(RaisingLoraFamily())
