"""Read a GGUF file's header (key-value metadata and tensor table) without loading weights.

GGUF is llama.cpp's container, used for quantized diffusion transformers too (city96's
ComfyUI-GGUF files: `flux1-dev-Q8_0.gguf`, `wan2.2_t2v_high_noise_14B_Q4_K_M.gguf`, ...). Such
a file holds the transformer alone, in its original key layout, each tensor in its own type:
2-D weights quantized (Q8_0, Q4_0, Q4_K, ...), small or precision-critical tensors as F32/F16.

The table is read with the `gguf` package (the reader diffusers' GGUF loader uses) and turned
into the same shape of data the safetensors header gives (`TensorInfo` per key, shapes in
PyTorch order), so that a family can recognise a GGUF transformer with the code that recognises
its safetensors file. GGUF stores shapes innermost-first; they are reversed here.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from daemon.formats.safetensors_header import SafetensorsHeader, TensorInfo

GGUF_MAGIC = b"GGUF"
# Tensor types that are stored as plain floats; every other type is a quantization.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# `general.architecture` values of language models: their GGUF files are text encoders or
# chat models, never a diffusion transformer.
TEXT_ARCHITECTURES = ("llama", "t5", "t5encoder", "qwen2", "qwen2vl", "qwen3", "gemma", "gemma2",
                      "gemma3", "mistral", "phi3", "gpt2", "bert")


class GgufError(ValueError):
    """The file is not a readable GGUF file; the message says why and what to do."""


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file says about itself. `tensors` has PyTorch-order shapes (the matrix a
    quantized tensor decodes to) and the GGML type name as `dtype` ("Q8_0", "F32", ...)."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]  # scalar key-value pairs as strings; arrays left out
    architecture: str | None  # `general.architecture` ("flux", "wan", "hyvid", ...)
    data_offset: int
    file_size: int

    def keys(self) -> list[str]:
        return list(self.tensors)

    def as_safetensors_header(self) -> SafetensorsHeader:
        """The tensor table in the safetensors header's shape, for recognition code that
        reads names, shapes and dtypes only."""
        return SafetensorsHeader(path=self.path, tensors=self.tensors, metadata=self.metadata,
                                 data_offset=self.data_offset, file_size=self.file_size)

    def parameters_by_type(self) -> Counter[str]:
        """Number of weights stored in each tensor type (what a quantization really is: a
        Q4_K_M file is mostly Q4_K with some Q6_K, and F32 for small tensors)."""
        counts: Counter[str] = Counter()
        for info in self.tensors.values():
            count = 1
            for dim in info.shape:
                count *= dim
            counts[info.dtype] += count
        return counts

    @property
    def main_type(self) -> str:
        """The quantization that holds the most weights, or the float type of an
        unquantized file."""
        counts = self.parameters_by_type()
        quantized = Counter({k: v for k, v in counts.items() if k not in FLOAT_TYPES})
        chosen = quantized or counts
        return chosen.most_common(1)[0][0] if chosen else "F32"


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse the GGUF header and tensor table; raises GgufError with the reason. The registry
    rescans models/ every few seconds: an unchanged file (size, mtime) is parsed once."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise GgufError(f"{path.name}: cannot read: {exc.strerror}") from exc
    return _read_gguf_header(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_gguf_header(path: Path, size: int, mtime_ns: int) -> GgufHeader:
    import gguf  # imported here: only GGUF files need it

    del mtime_ns  # part of the cache key only
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise GgufError(f"{path.name}: cannot read: {exc.strerror}") from exc
    if len(magic) < len(GGUF_MAGIC):
        raise GgufError(f"{path.name}: file is {size} bytes, too short to be GGUF (truncated or "
                        "empty): download or copy it again")
    if magic != GGUF_MAGIC:
        raise GgufError(f"{path.name}: not a GGUF file (it does not start with 'GGUF'); rename "
                        "it if it is another format, or download it again")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError, KeyError) as exc:
        # The reader fails with numpy's reshape and dtype errors when the file ends inside
        # the tensor table or the tensor data; say what that means for the user.
        raise GgufError(f"{path.name}: truncated or corrupt GGUF file: its header or tensor "
                        f"table cannot be read ({type(exc).__name__}: {str(exc)[:120]}); "
                        "download or copy it again") from exc
    try:
        metadata: dict[str, str] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or len(field.types) != 1 or not field.data:
                continue  # format bookkeeping, or an array
            value = field.parts[field.data[0]]
            if field.types[0] == gguf.GGUFValueType.STRING:
                metadata[name] = bytes(value).decode("utf-8", errors="replace")
            else:
                metadata[name] = str(value[0])
        tensors: dict[str, TensorInfo] = {}
        data_end = 0
        data_offset = int(reader.data_offset)
        for tensor in reader.tensors:
            start = int(tensor.data_offset) - data_offset
            end = start + int(tensor.n_bytes)
            tensors[tensor.name] = TensorInfo(
                dtype=tensor.tensor_type.name,
                shape=tuple(int(dim) for dim in reversed(tensor.shape.tolist())),
                start=start, end=end)
            data_end = max(data_end, int(tensor.data_offset) + int(tensor.n_bytes))
    finally:
        del reader  # its memory map keeps the file open
    if data_end > size:
        raise GgufError(f"{path.name}: tensors need {data_end} bytes but the file has {size} "
                        "(truncated: download or copy it again)")
    if not tensors:
        raise GgufError(f"{path.name}: the GGUF file holds no tensors")
    return GgufHeader(path=path, tensors=tensors, metadata=metadata,
                      architecture=metadata.get("general.architecture"),
                      data_offset=data_offset, file_size=size)
