"""A plugin whose hook name is misspelled (register_family for register_families)."""

from __future__ import annotations

from typing import Any

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


class NeverRegistered(SDXLFamily):
    name = "never-registered"


@hookimpl
def register_family(register: Any) -> None:
    register(NeverRegistered())
