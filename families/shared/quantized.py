"""Loading quantized transformers (GGUF and FP8 single files) for the families that read them.

Shared by the Flux.1, FLUX.2 [klein] and Wan 2.2 families. Each family converts key layouts
its own way; what is common lives here:

* GGUF: the file's tensors come in through diffusers' own reader (`load_gguf_checkpoint`:
  quantized tensors as `GGUFParameter`, F32/F16 ones as plain tensors), and the model is built
  with diffusers' single-file loader and `GGUFQuantizationConfig(compute_dtype=...)`, which
  puts each quantized Linear into a `GGUFLinear` that dequantizes its weight per forward.
* FP8: every Linear whose weight the file stores in an 8-bit float type becomes a
  `Float8Linear`, which keeps the file's bytes as they are and widens the weight to the
  compute dtype per forward (bfloat16 / float16 on a GPU, float32 on the CPU). Everything
  else is loaded in the compute dtype.

Why not diffusers' layerwise casting for FP8 (`enable_layerwise_casting(storage_dtype=
torch.float8_e4m3fn, ...)`), which does the same for the base weights: PEFT gives a LoRA layer
the dtype of the weight it wraps, so a LoRA loaded on a layerwise-cast model gets float8
A/B matrices (its values rounded to 3 mantissa bits) and then fails on the CPU ("mul not
implemented for Float8_e4m3fn"); diffusers issue #11648 is still open. A Float8Linear stores
its weight as raw bytes (uint8), which PEFT does not cast to, so LoRAs keep their own
precision, exactly as on GGUF layers. It also survives `pipe.to(dtype)` untouched.

LoRAs on either stay unfused PEFT layers: the weights cannot take a merged update without
being re-quantized, and the core never fuses anyway.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from daemon.plugin_api import RenderError

log = logging.getLogger(__name__)

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Prefixes ComfyUI's tools keep in front of a transformer's keys.
GGUF_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_ORIG_SHAPE = "comfy.gguf.orig_shape."


# --- GGUF -----------------------------------------------------------------------------------


def gguf_config(compute_dtype: torch.dtype) -> Any:
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=compute_dtype)


def load_gguf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors in PyTorch shapes, quantized ones as diffusers' GGUFParameter,
    with ComfyUI's `model.diffusion_model.` prefix removed.

    Tensors the converter reshaped to fit GGUF's 4-dimension limit carry their real shape in
    `comfy.gguf.orig_shape.NAME` (city96's tools): they get it back here, dequantized first
    when they were quantized (diffusers reads no such key).
    """
    import gguf
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    try:
        state: dict[str, torch.Tensor] = load_gguf_checkpoint(str(path))
    except ValueError as exc:  # a quantization type diffusers cannot dequantize
        raise RenderError(f"{path.name}: diffusers cannot load this GGUF file: "
                          f"{str(exc).strip().splitlines()[0]}") from exc
    reader = gguf.GGUFReader(path)
    shapes = {}
    for name, field in reader.fields.items():
        if name.startswith(_ORIG_SHAPE):
            shapes[name[len(_ORIG_SHAPE):]] = tuple(int(field.parts[i][0]) for i in field.data)
    del reader
    for name, shape in shapes.items():
        if name in state:
            tensor = state[name]
            if hasattr(tensor, "quant_type"):
                tensor = dequantize_gguf_tensor(tensor)
            state[name] = tensor.reshape(shape)
    prefix = next((p for p in GGUF_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is not None:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_gguf_model(model_class: Any, state: dict[str, torch.Tensor], base: Path, subfolder: str,
                    compute_dtype: torch.dtype, path: Path, **config: Any) -> Any:
    """Build `model_class` from a (converted) GGUF state dict through diffusers' single-file
    loader, its config from the base folder's `subfolder`; quantized Linears become
    GGUFLinear layers computing in `compute_dtype`."""
    model = model_class.from_single_file(
        state, config=str(base), subfolder=subfolder, local_files_only=True,
        quantization_config=gguf_config(compute_dtype), dtype=compute_dtype, **config)
    check_complete(model, path, base / subfolder)
    return model.eval().requires_grad_(False)


# --- FP8 ------------------------------------------------------------------------------------


class Float8Linear(torch.nn.Linear):
    """A Linear whose weight stays in an 8-bit float format, stored as its raw bytes (uint8),
    and is widened to `compute_dtype` for each forward. The bias (small) is kept in the
    compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 float8_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        torch.nn.Module.__init__(self)  # no float weight to allocate first
        self.in_features, self.out_features = in_features, out_features
        self.float8_dtype, self.compute_dtype = float8_dtype, compute_dtype
        self.weight = torch.nn.Parameter(
            torch.empty((out_features, in_features), dtype=torch.uint8, device="meta"),
            requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.empty(out_features, dtype=compute_dtype,
                                                    device="meta"), requires_grad=False)
                     if bias else None)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = self.weight.view(self.float8_dtype).to(self.compute_dtype)
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return F.linear(inputs.to(self.compute_dtype), weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, storage={self.float8_dtype}, "
                f"compute={self.compute_dtype}")


def float8_dtype_of(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The 8-bit float type most weights of a state dict are stored in, or None."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.dtype in FLOAT8_DTYPES:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=lambda dtype: counts[dtype]) if counts else None


def load_fp8_model(model_class: Any, state: dict[str, torch.Tensor], base: Path, subfolder: str,
                   compute_dtype: torch.dtype, path: Path, **config: Any) -> Any:
    """Build `model_class` (config from the base folder's `subfolder`, updated by `config`)
    from a diffusers-named state dict that holds FP8 weights; see the module docstring.

    The model is built on the meta device and the file's tensors are assigned to it, so the
    weights are never widened in memory: a 12 GB FP8 Flux transformer stays 12 GB.
    """
    from accelerate import init_empty_weights

    model_config = dict(model_class.load_config(str(base), subfolder=subfolder,
                                                local_files_only=True))
    model_config.update(config)
    with init_empty_weights():
        model = model_class.from_config(model_config)
    # Modules diffusers keeps in float32 whatever the dtype (Wan's time embedder, norms).
    keep_fp32 = tuple(model_class._keep_in_fp32_modules or ()) \
        if compute_dtype != torch.float32 else ()

    def precise(name: str) -> bool:
        return any(part in keep_fp32 for part in name.split("."))

    float8_linears: set[str] = set()
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if (type(module) is torch.nn.Linear and weight is not None
                and weight.dtype in FLOAT8_DTYPES and not precise(name)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Float8Linear(module.in_features, module.out_features,
                                                module.bias is not None, weight.dtype,
                                                compute_dtype))
            float8_linears.add(f"{name}.weight")
    prepared: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in float8_linears:
            prepared[key] = tensor.view(torch.uint8)
        elif tensor.is_floating_point():
            prepared[key] = tensor.to(torch.float32 if precise(key) else compute_dtype)
        else:
            prepared[key] = tensor
    result = model.load_state_dict(prepared, strict=False, assign=True)
    if result.unexpected_keys:
        raise RenderError(f"{path.name}: {len(result.unexpected_keys)} weights have no place in "
                          f"the model of {base / subfolder} (e.g. {result.unexpected_keys[0]}): "
                          "the config folder is of another model size or release")
    check_complete(model, path, base / subfolder)
    log.info("%s: %d Linear layers kept in %s, computed in %s", path.name, len(float8_linears),
             next(iter({state[k].dtype for k in float8_linears}), None), compute_dtype)
    return model.eval().requires_grad_(False)


# --- shared ---------------------------------------------------------------------------------


def scaled_fp8_problem(checkpoint: Any) -> str | None:
    """The refusal of a ComfyUI "scaled" FP8 file (a LoadedCheckpoint whose quantization
    label ends in "(scaled)"), or None for any other checkpoint."""
    if not (checkpoint.quantization and checkpoint.quantization.endswith("(scaled)")):
        return None
    return (f"{checkpoint.name!r} is a ComfyUI scaled-FP8 file (per-tensor weight scales "
            "beside the fp8 weights), which lorafarm does not load: use a plain FP8 "
            "(e4m3fn) file, a GGUF file or the bf16 original")


def check_complete(model: torch.nn.Module, path: Path, config_folder: Path) -> None:
    """diffusers leaves a weight the file lacks on the meta device without an error; such a
    model fails obscurely mid-render, or draws noise."""
    missing = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
               if tensor.device.type == "meta"]
    if missing:
        raise RenderError(f"{path.name} lacks {len(missing)} weights (e.g. {missing[0]}) of the "
                          f"model configured in {config_folder}: the file is incomplete or of "
                          "another model size")
