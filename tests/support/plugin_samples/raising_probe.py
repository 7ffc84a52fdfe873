"""A family whose probes raise on every file they are shown."""

from __future__ import annotations

from typing import Any

from daemon import hookimpl
from families.sdxl.sdxl import SDXLFamily


class RaisingProbeFamily(SDXLFamily):
    name = "raising-probe"
    display_name = "Probes raise (test)"

    def probe_checkpoint(self, source: Any) -> Any:
        return source.header.tensors["model.no_such_tensor"]  # KeyError: a bug

    def probe_lora(self, header: Any, facts: Any) -> Any:
        return header.tensors["lora.no_such_tensor"]  # KeyError: a bug


@hookimpl
def register_families(register: Any) -> None:
    register(RaisingProbeFamily())
