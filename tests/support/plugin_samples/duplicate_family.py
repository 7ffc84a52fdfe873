"""A plugin that registers a family under a name a built-in plugin already takes."""

from __future__ import annotations

from typing import Any

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


@hookimpl
def register_families(register: Any) -> None:
    register(SDXLFamily())  # "sdxl" again
