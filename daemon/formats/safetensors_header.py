"""Read a `.safetensors` file's header without loading any tensor.

The format: 8 bytes little-endian header length N, then N bytes of JSON mapping each tensor
name to {dtype, shape, data_offsets} plus an optional "__metadata__" table of strings, then
the tensor data. Reading only the header indexes a 250 MB LoRA or a 7 GB checkpoint in
milliseconds, and it is also the place to catch a truncated or hostile file before any
library touches it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

# Real headers are well under a few MB (a full SDXL checkpoint: ~250 KB). Anything beyond
# this is a corrupt or hostile file, and reading it would only waste memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The file is not a readable safetensors file; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets relative to the start of the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # byte offset of the data section in the file
    file_size: int

    def keys(self) -> list[str]:
        return list(self.tensors)


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header; raises SafetensorsError with the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path.name}: file is {size} bytes, too short to be "
                                       "safetensors (truncated or empty)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{path.name}: header length {header_len} bytes is absurd "
                                       "(corrupt file, or not safetensors at all)")
            if 8 + header_len > size:
                raise SafetensorsError(f"{path.name}: header says {header_len} bytes but the file "
                                       f"is only {size} bytes (truncated download?)")
            raw = handle.read(header_len)
    except OSError as exc:
        raise SafetensorsError(f"{path.name}: cannot read: {exc.strerror}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path.name}: header is not JSON ({exc}); the file is corrupt "
                               "or not safetensors") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: header is not a JSON object")

    metadata_raw = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in metadata_raw.items()} if isinstance(
        metadata_raw, dict) else {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            info = TensorInfo(dtype=str(entry["dtype"]), shape=shape, start=start, end=end)
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(f"{path.name}: tensor entry {name!r} is malformed") from exc
        tensors[name] = info
        data_end = max(data_end, end)
    data_offset = 8 + header_len
    if data_offset + data_end > size:
        raise SafetensorsError(
            f"{path.name}: tensors need {data_offset + data_end} bytes but the file has {size} "
            "(truncated: download or copy it again)")
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata,
                             data_offset=data_offset, file_size=size)


def sha256_file(path: Path, *, start: int = 0, chunk: int = 8 * 1024 * 1024) -> str:
    """sha256 of the file from byte `start` on (0: the whole file, as A1111's model hash)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        handle.seek(start)
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
