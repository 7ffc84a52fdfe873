"""A family that raises, from any one of the methods the core calls, whatever a test sets in
`SabotagedFamily.raising` (method name -> the exception); otherwise it is the SDXL family."""

from __future__ import annotations

from typing import Any, ClassVar

from daemon.plugin_api import hookimpl
from families.sdxl.sdxl import SDXLFamily

# Every Family method the core calls on the way of an SDXL job without LoRAs.
SABOTAGED = ("probe_checkpoint", "defaults_for", "apply_conventions", "lora_fits",
             "missing_requirements", "require_loadable", "component_sources", "weights_cost",
             "batch_cost", "load_pipeline", "apply_offload", "bfloat16_for_float16",
             "enable_memory_savers", "render_batch", "infotext_fields")


class SabotagedFamily(SDXLFamily):
    name = "sabotaged"
    display_name = "Raises where a test says (test)"
    raising: ClassVar[dict[str, BaseException]] = {}

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return None


def _sabotaged(method: str) -> Any:
    def call(self: SabotagedFamily, *args: Any, **kwargs: Any) -> Any:
        if method in self.raising:
            raise self.raising[method]
        return getattr(super(SabotagedFamily, self), method)(*args, **kwargs)

    call.__name__ = method
    return call


for _method in SABOTAGED:
    setattr(SabotagedFamily, _method, _sabotaged(_method))


@hookimpl
def register_families(register: Any) -> None:
    register(SabotagedFamily())
