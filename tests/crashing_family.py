"""A family whose render kills its own process, for the poison-render test: it is loaded
only through config.toml `plugins = ["tests.crashing_family"]` and claims a checkpoint only
when config.toml names it."""

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
        os.kill(os.getpid(), signal.SIGKILL)  # like a driver crash or the OOM killer


@hookimpl
def register_families(register: Any) -> None:
    register(CrashingFamily())
