"""A family class that leaves an abstract method (render_batch) out."""

from __future__ import annotations

from typing import Any

from daemon.plugin_api import Family, hookimpl


class HalfDoneFamily(Family):
    name = "half-done"
    display_name = "Half done (test)"
    architecture = "sdxl"

    def probe_checkpoint(self, source: Any) -> Any:
        return None

    def load_pipeline(self, checkpoint: Any, device: Any, dtype: Any) -> Any:
        raise NotImplementedError


@hookimpl
def register_families(register: Any) -> None:
    register(HalfDoneFamily())  # TypeError: can't instantiate abstract class
