"""A family whose prompt conventions raise while intake resolves a job."""

from __future__ import annotations

from typing import Any

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


class RaisingConventionsFamily(SDXLFamily):
    name = "raising-conventions"
    display_name = "Conventions raise (test)"

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return None

    def apply_conventions(self, prompt: str, negative_prompt: str | None,
                          enabled: bool) -> Any:
        quality_tags = {"score_9": 1.0}
        return quality_tags["score_10"], negative_prompt, []  # KeyError: a bug


@hookimpl
def register_families(register: Any) -> None:
    register(RaisingConventionsFamily())
