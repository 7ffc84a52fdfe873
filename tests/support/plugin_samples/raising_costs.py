"""A family whose memory estimates (batch_cost, weights_cost) have a bug: they run inside the
scheduler's claim, so they must not be able to stall the queue."""

from __future__ import annotations

from typing import Any

from daemon.plugin_api import hookimpl
from families.sdxl.sdxl import SDXLFamily


class RaisingCostsFamily(SDXLFamily):
    name = "raising-costs"
    display_name = "Cannot estimate memory (test)"

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return None

    def batch_cost(self, spec: Any) -> int:
        return int(spec.extra["no such key"])

    def weights_cost(self, checkpoint: Any, dtype: Any, offload: str = "none") -> int:
        raise ZeroDivisionError("division by zero")


@hookimpl
def register_families(register: Any) -> None:
    register(RaisingCostsFamily())
