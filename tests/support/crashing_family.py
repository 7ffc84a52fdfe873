"""A family whose render kills its own process when a render of the batch has "poison" in its
prompt, for the poison-render tests: it is loaded only through config.toml
`plugins = ["tests.support.crashing_family"]` and claims a checkpoint only when config.toml names
it. Other prompts render as SDXL does (a poison render's innocent batch-mates)."""

from __future__ import annotations

import os
import signal
from typing import Any

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


class CrashingFamily(SDXLFamily):
    name = "crashy"
    display_name = "Crashes its worker (test)"

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        return None  # never claims anything by itself

    def render_batch(self, pipe: Any, specs: Any, device: Any, progress: Any = None) -> Any:
        if any("poison" in spec.prompt for spec in specs):
            os.kill(os.getpid(), signal.SIGKILL)  # like a driver crash or the OOM killer
        return super().render_batch(pipe, specs, device, progress)


@hookimpl
def register_families(register: Any) -> None:
    register(CrashingFamily())
