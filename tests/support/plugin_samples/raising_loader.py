"""A family whose load_pipeline has a bug deep in the standard library (os.stat(None))."""

from __future__ import annotations

import os
from typing import Any

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


class RaisingLoaderFamily(SDXLFamily):
    name = "raising-loader"
    display_name = "Cannot load (test)"

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return None

    def load_pipeline(self, checkpoint: Any, device: Any, dtype: Any) -> Any:
        config_file = None  # the bug: a path that was never set
        os.path.getsize(config_file)  # type: ignore[arg-type]
        return super().load_pipeline(checkpoint, device, dtype)


@hookimpl
def register_families(register: Any) -> None:
    register(RaisingLoaderFamily())
