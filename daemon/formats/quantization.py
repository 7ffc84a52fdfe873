"""What quantization a checkpoint file carries, from its header alone.

Two kinds reach lorafarm as users have them:

* GGUF files (`*.gguf`): a transformer whose 2-D weights are block-quantized (Q8_0, Q4_0,
  Q4_K, ...), dequantized layer by layer at compute time by diffusers' GGUF support;
* FP8 safetensors (`F8_E4M3` / `F8_E5M2` tensors, e.g. `flux1-dev-fp8.safetensors`): weights
  stored in 8-bit floats and computed in bfloat16 / float16 (GPU) or float32 (CPU).

The label ("GGUF Q8_0", "FP8 e4m3fn") is what the infotext, the history and the batch key
record; `bytes_per_weight` is what the weights cost in memory, for sizing batches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.formats.gguf_header import FLOAT_TYPES, GgufError, GgufHeader, read_gguf_header
from daemon.formats.safetensors_header import SafetensorsError, SafetensorsHeader, read_header

if TYPE_CHECKING:
    import torch

    from daemon.contract.family import LoadedCheckpoint

log = logging.getLogger(__name__)

FP8_DTYPES = {"F8_E4M3": "e4m3fn", "F8_E5M2": "e5m2"}
# ComfyUI's "scaled fp8" files carry per-tensor scales beside the fp8 weights; read as plain
# fp8 they would render wrongly, so they are named apart (and refused by the loaders).
_SCALED_FP8_KEYS = ("scaled_fp8", ".scale_weight", ".weight_scale")


@dataclass(frozen=True)
class Quantization:
    """A checkpoint file's quantization, as far as its header tells."""

    format: str  # "gguf" | "fp8"
    label: str  # "GGUF Q8_0", "FP8 e4m3fn": recorded in the infotext and the history
    detail: str  # the mix of tensor types, for `lorafarm models` and log lines
    bytes_per_weight: float  # average stored size of one weight in this file


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def of_gguf(header: GgufHeader) -> Quantization:
    by_type = header.parameters_by_type()
    total = sum(by_type.values()) or 1
    stored = sum(info.end - info.start for info in header.tensors.values())
    mix = ", ".join(f"{name} {100 * count / total:.0f}%" for name, count in by_type.most_common())
    main = header.main_type
    label = f"GGUF {main}" if main not in FLOAT_TYPES else f"GGUF {main} (not quantized)"
    return Quantization(format="gguf", label=label, detail=f"{mix} of the weights",
                        bytes_per_weight=stored / total)


def of_safetensors(header: SafetensorsHeader) -> Quantization | None:
    """FP8 when most weights are stored in an 8-bit float type; None otherwise."""
    by_dtype: dict[str, int] = {}
    for info in header.tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + _count(info.shape)
    total = sum(by_dtype.values())
    fp8 = {dtype: n for dtype, n in by_dtype.items() if dtype in FP8_DTYPES}
    if not total or sum(fp8.values()) * 2 < total:
        return None
    main = max(fp8, key=lambda dtype: fp8[dtype])
    scaled = any(marker in key for key in header.tensors for marker in _SCALED_FP8_KEYS)
    label = f"FP8 {FP8_DTYPES[main]}" + (" (scaled)" if scaled else "")
    mix = ", ".join(f"{dtype} {100 * n / total:.0f}%" for dtype, n in
                    sorted(by_dtype.items(), key=lambda item: -item[1]))
    stored = sum(info.end - info.start for info in header.tensors.values())
    return Quantization(format="fp8", label=label, detail=f"{mix} of the weights",
                        bytes_per_weight=stored / total)


@functools.lru_cache(maxsize=256)
def _cached(path: str, kind: str, size: int, mtime_ns: int) -> Quantization | None:
    del size, mtime_ns  # part of the cache key only: a replaced file is read again
    try:
        if kind == "gguf":
            return of_gguf(read_gguf_header(Path(path)))
        if kind == "single_file":
            return of_safetensors(read_header(Path(path)))
    except (GgufError, SafetensorsError, OSError) as exc:
        log.debug("no quantization for %s: %s", path, exc)
    return None


def checkpoint_quantization(path: Path, kind: str) -> Quantization | None:
    """The quantization of a checkpoint under models/ (folders: None, they are stored as
    released); cached per file version, so asking per job costs a stat call."""
    if kind not in ("gguf", "single_file"):
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return _cached(str(path), kind, stat.st_size, stat.st_mtime_ns)


# --- what weights cost in accelerator memory ------------------------------------------------

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", *FP8_DTYPES}
# Subfolders of a diffusers folder that hold the denoiser: a single file replaces them.
_DENOISERS = ("transformer", "transformer_2", "unet")


def _stored_bytes(header: SafetensorsHeader, compute_bytes: int, keep_fp8: bool) -> int:
    """Bytes a safetensors file's tensors take once loaded: floats at the compute dtype
    (FP8 ones as stored when the loader keeps them so), other dtypes as stored."""
    total = 0
    for info in header.tensors.values():
        if info.dtype in FP8_DTYPES and keep_fp8:
            total += _count(info.shape)
        elif info.dtype in _FLOAT_DTYPES:
            total += _count(info.shape) * compute_bytes
        else:
            total += info.end - info.start
    return total


def _file_bytes(path: Path, compute_bytes: int) -> int:
    if path.suffix == ".gguf":
        header = read_gguf_header(path)
        # Quantized tensors stay packed; F32 / F16 ones are cast to the compute dtype.
        return sum(info.end - info.start if info.dtype not in FLOAT_TYPES
                   else _count(info.shape) * compute_bytes for info in header.tensors.values())
    return _stored_bytes(read_header(path), compute_bytes, keep_fp8=True)


def resident_weight_bytes(checkpoint: LoadedCheckpoint, dtype: torch.dtype,
                          offload: str = "none",
                          components: Mapping[str, Path] | None = None) -> int:
    """Accelerator bytes a loaded checkpoint's weights hold, from file headers (see
    `Family.weights_cost`); `dtype` is the compute dtype. 0 when the files cannot tell.
    Component files (`components`, by default the named ones) count instead of the config
    folder's weights."""
    compute_bytes = dtype.itemsize
    files = checkpoint.components if components is None else components
    path, kind, config_path = checkpoint.path, checkpoint.kind, checkpoint.config_path
    sizes: dict[str, int] = {}
    try:
        if kind == "folder":
            base: Path | None = path
        else:
            base = config_path
            sizes["transformer"] = _file_bytes(path, compute_bytes)
            if checkpoint.transformer_2 is not None:
                sizes["transformer_2"] = _file_bytes(checkpoint.transformer_2,
                                                     compute_bytes)
        if base is not None and base.is_dir():
            for folder in sorted(p for p in base.iterdir() if p.is_dir()):
                if kind != "folder" and folder.name in _DENOISERS:
                    continue  # replaced by the single file
                if folder.name in files:
                    continue  # replaced by a component file (counted below)
                weights = sorted(folder.glob("*.safetensors"))
                if weights:
                    sizes[folder.name] = sum(
                        _stored_bytes(read_header(f), compute_bytes, keep_fp8=False)
                        for f in weights)
        for name, file in files.items():
            sizes[name] = _stored_bytes(read_header(file), compute_bytes, keep_fp8=False)
    except (GgufError, SafetensorsError, OSError) as exc:
        log.debug("weights of %s not known: %s", path, exc)
        return 0
    if offload == "model":
        return max(sizes.values(), default=0)
    if offload in ("group", "sequential"):
        return 0  # one block or layer at a time: small beside the activations
    return sum(sizes.values())
