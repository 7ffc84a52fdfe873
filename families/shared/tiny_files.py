"""Writing the tiny demo and test files the way a careful user's tool does."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def save_safetensors_atomically(tensors: Mapping[str, Tensor], path: Path,
                                header: Mapping[str, str]) -> None:
    """Write a .safetensors file beside its target and rename it in: a half-written file in
    a watched folder would be indexed as a broken one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as handle:
        temp = Path(handle.name)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp),
                  metadata={str(k): str(v) for k, v in header.items()})
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
