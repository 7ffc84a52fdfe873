"""Writers for tiny quantized checkpoints (GGUF and FP8), the way users get real ones.

GGUF files are written as city96's ComfyUI-GGUF converter writes them: the transformer's
original key layout, `general.architecture` set ("flux", "wan", ...), every 2-D weight whose
last dimension is a multiple of the quantization's block size (32 for Q8_0 and Q4_0, 256 for
the K types) quantized, everything else (1-D tensors, small embeddings the converter keeps
precise, shapes that do not fit the blocks) stored as F32. The `gguf` package quantizes Q8_0
and Q4_0 itself; it has no quantizer for the K types, and the tiny widths could not hold
256-wide blocks anyway.

FP8 files are safetensors with the Linear weights (and biases) in float8_e4m3fn, and norm
scales in bfloat16, like the fp8 Flux transformers ComfyUI users share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

GGUF_TYPES = ("Q8_0", "Q4_0")


def write_gguf(tensors: Mapping[str, torch.Tensor], path: Path, *, architecture: str,
               quantization: str, keep_precise: tuple[str, ...] = ()) -> Path:
    """Write `tensors` (original key names) as a GGUF file quantized to `quantization`
    ("Q8_0" or "Q4_0"); keys starting with one of `keep_precise` stay F32. Written under a
    hidden temporary name and renamed into place: a half-written file in models/ must never
    be indexed."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quantization]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(temp), arch=architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(qtype))  # city96's converter records the GGML type here
    for key, tensor in tensors.items():
        array = tensor.detach().to(torch.float32).contiguous().numpy()
        kind = gguf.GGMLQuantizationType.F32
        if (array.ndim == 2 and array.shape[-1] % block_size == 0
                and not key.startswith(keep_precise)):
            kind = qtype
        writer.add_tensor(key, gguf.quants.quantize(array, kind), raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(temp, path)
    return path


def write_fp8_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, *,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` with every tensor in float8_e4m3fn except norm scales (`.scale` keys,
    and 1-D `norm` weights), which stay bfloat16."""
    def stored(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key.endswith(".scale") or (tensor.ndim == 1 and "norm" in key):
            return tensor.to(torch.bfloat16)
        return tensor.to(torch.float8_e4m3fn)

    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    save_file({key: stored(key, value).contiguous() for key, value in tensors.items()},
              str(temp), metadata=dict(metadata or {}))
    os.replace(temp, path)
    return path
