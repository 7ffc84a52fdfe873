"""Tiny LoRA files for the tiny SDXL, written from a seed in the layouts users bring.

`make_tiny_lora` draws the LoRA's *content* once (per target module: a down and an up matrix,
plus rank and alpha); the `write_*` functions put that same content on disk in different key
layouts. Loaded into the tiny SDXL with `pipe.load_lora_weights`, every accepted layout patches
the same modules with the same numbers, so they all render the same image. Tests and the demo
use them to check that lorafarm applies what users bring, and refuses what it cannot apply.

Layouts written (all accepted by diffusers' `StableDiffusionXLPipeline.load_lora_weights`):

* `write_diffusers`: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.*`,
  `text_encoder_2.*`, written through diffusers' own `save_lora_weights`. There is no alpha
  tensor in this layout: alpha travels in diffusers' `lora_adapter_metadata` header entry, or
  is baked into the up matrices (`alpha_in="up_weights"`).
* `write_kohya_original`: sd-scripts names on the original (SGM) UNet layout,
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`, `.lora_up`,
  `.alpha`, and `lora_te1_` / `lora_te2_` for the text encoders.
* `write_kohya_diffusers_names`: the same with diffusers' UNet module names
  (`lora_unet_down_blocks_1_attentions_0_...`), as diffusers' `convert_state_dict_to_kohya`
  and other trainers write them.

Not written: raw PEFT (`base_model.model.<module>...`). diffusers 0.42's SDXL loader keeps
only keys under `unet.` / `text_encoder.` / `text_encoder_2.` (or kohya `lora_*` keys), so a
raw PEFT file loads NOTHING, without an error (see the tests).

Refusal helpers write files lorafarm must reject: a LyCORIS LoHa file, a LoRA whose module
names match nothing in SDXL, and header-realistic Flux.1 and SD 1.5 kohya LoRAs.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from families.sdxl.tiny import build_tiny_sdxl_pipeline, diffusers_unet_key_to_original
from families.shared.tiny_files import save_safetensors_atomically as _save_atomically

__all__ = [
    "LORA_COMPONENTS",
    "LoraWeights",
    "TinyLora",
    "count_patched_modules",
    "make_tiny_lora",
    "write_diffusers",
    "write_flux_like",
    "write_kohya_diffusers_names",
    "write_kohya_original",
    "write_loha_header_only",
    "write_sd15_like",
    "write_unmatched",
]

# The pipeline components an SDXL LoRA can patch, in diffusers' order
# (`StableDiffusionXLLoraLoaderMixin._lora_loadable_modules`).
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Leaf module names a target set patches, per kind of component. "to_out.0" is the Linear
# inside diffusers' `to_out` ModuleList (index 1 is a Dropout).
_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "attn": {
        "unet": ("to_q", "to_k", "to_v", "to_out.0"),
        "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
    },
}

# What sd-scripts writes for an SDXL LoRA (train_network.py / sdxl_train_network.py); the
# caller's metadata is laid over it.
_KOHYA_SDXL_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_v2": "False",
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
}

# Header entries diffusers' `save_lora_weights` owns; a caller may not overwrite them.
_DIFFUSERS_RESERVED_METADATA = frozenset({"format", "lora_adapter_metadata"})

# module path -> (down [rank, in], up [out, rank])
LoraWeights = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True, eq=False)  # eq=False: comparing dicts of tensors has no single truth
class TinyLora:
    """A LoRA's content, independent of any file layout.

    Keys are module paths exactly as `named_modules()` gives them on the pipeline's
    components, i.e. the modules PEFT wraps. With transformers >= 5.6 CLIP-L
    (`CLIPTextModel`) has no `text_model` level, so text_encoder keys read
    `encoder.layers.0.self_attn.q_proj`, while text_encoder_2 (`CLIPTextModelWithProjection`,
    still nested) reads `text_model.encoder.layers.0.self_attn.q_proj`. Writers add or drop
    `text_model.` as each layout needs.

    Values are `(down [rank, in], up [out, rank])`; the applied change to a module's weight is
    `(alpha / rank) * up @ down`, as in kohya and PEFT.
    """

    unet: LoraWeights
    text_encoder: LoraWeights
    text_encoder_2: LoraWeights
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies the LoRA branch by: alpha / rank."""
        return self.alpha / self.rank

    def components(self) -> dict[str, LoraWeights]:
        return {name: getattr(self, name) for name in LORA_COMPONENTS}

    def module_counts(self) -> dict[str, int]:
        """Target modules per component: what `count_patched_modules` must find after a load."""
        return {name: len(weights) for name, weights in self.components().items()}


# --- content ---------------------------------------------------------------------------------


def make_tiny_lora(
    pipe_or_none: StableDiffusionXLPipeline | None = None,
    *,
    seed: int,
    rank: int = 4,
    alpha: float | None = None,
    targets: str = "attn",
    include_text_encoders: bool = True,
    scale: float = 1.0,
) -> TinyLora:
    """Draw a random LoRA for the tiny SDXL (or the given pipeline); same seed, same tensors.

    `targets="attn"` patches every to_q/to_k/to_v/to_out.0 of the UNet's attention blocks
    (self- and cross-attention) and q/k/v/out_proj of every text-encoder layer. `alpha`
    defaults to `rank` (scaling 1). `scale` multiplies the up matrices; at 1.0 the change to
    each weight is about as large as the weight itself, enough to change a 64x64 render of
    the random tiny model clearly. Up matrices are never zero (a trained LoRA's are not, and
    zero ones would hide a LoRA that silently failed to apply).

    Every value is rounded to float16 precision (kept as float32), so float16 files, as
    sd-scripts saves them, hold exactly the numbers the float32 files hold.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be finite and non-zero, got {scale}")

    shapes = (
        _default_target_shapes(targets) if pipe_or_none is None
        else _target_shapes(pipe_or_none, targets)
    )
    generator = torch.Generator().manual_seed(seed)
    drawn: dict[str, LoraWeights] = {}
    for component in LORA_COMPONENTS:
        if component != "unet" and not include_text_encoders:
            drawn[component] = {}
            continue
        drawn[component] = {
            module: _draw_pair(generator, rank, fan_in, fan_out, scale)
            for module, (fan_in, fan_out) in shapes[component].items()
        }
    return TinyLora(
        unet=drawn["unet"],
        text_encoder=drawn["text_encoder"],
        text_encoder_2=drawn["text_encoder_2"],
        rank=rank,
        alpha=alpha,
    )


def _draw_pair(
    generator: torch.Generator, rank: int, fan_in: int, fan_out: int, scale: float
) -> tuple[Tensor, Tensor]:
    # Entries of up @ down then have std ~ scale / sqrt(fan_in), the order of magnitude of
    # PyTorch's default Linear init, so the LoRA's change is as large as the weight it patches.
    down = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
    up = torch.randn(fan_out, rank, generator=generator) * (scale / math.sqrt(rank))
    return _fp16_exact(down), _fp16_exact(up)


def _fp16_exact(tensor: Tensor) -> Tensor:
    return tensor.to(torch.float16).to(torch.float32).contiguous()


def _target_shapes(
    pipe: StableDiffusionXLPipeline, targets: str
) -> dict[str, dict[str, tuple[int, int]]]:
    """Per component: target module path -> (in_features, out_features), in sorted order."""
    if targets not in _TARGETS:
        raise ValueError(f"unknown targets {targets!r}; known: {sorted(_TARGETS)}")
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            out[component] = {}  # e.g. a refiner pipeline without CLIP-L
            continue
        leaves = _TARGETS[targets]["unet" if component == "unet" else "text_encoder"]
        found: dict[str, tuple[int, int]] = {}
        for name, module in model.named_modules():
            if not any(name == leaf or name.endswith("." + leaf) for leaf in leaves):
                continue
            # A pipeline that already carries adapters has PEFT wrappers at these paths.
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, torch.nn.Linear):
                found[name] = (base.in_features, base.out_features)
        out[component] = dict(sorted(found.items()))
    return out


@functools.cache
def _default_target_shapes(targets: str) -> dict[str, dict[str, tuple[int, int]]]:
    # Only the shapes are kept: the tiny pipeline is cheap to build but not worth holding.
    return _target_shapes(build_tiny_sdxl_pipeline(0), targets)


# --- checking what a load applied ------------------------------------------------------------


def count_patched_modules(pipe: object, adapter_name: str) -> dict[str, int]:
    """Modules per LoRA-loadable component that actually carry the adapter `adapter_name`.

    `load_lora_weights` can load nothing without raising (unknown layout, names that match no
    module), so this count, not the absence of an error, tells whether a LoRA applied. A module
    counts when it is a PEFT tuner layer holding `adapter_name` in one of its adapter layers
    (`lora_A`/`lora_B` for LoRA, `lora_embedding_*`, `lokr_*` for LoKr, ...). Components that
    are missing (None) are left out.
    """
    names = getattr(pipe, "_lora_loadable_modules", LORA_COMPONENTS)
    counts: dict[str, int] = {}
    for component in names:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        counts[component] = sum(
            1
            for module in model.modules()
            if isinstance(module, BaseTunerLayer)
            and any(
                adapter_name in getattr(module, layer_name, {})
                for layer_name in module.adapter_layer_names
            )
        )
    return counts


# --- diffusers layout ------------------------------------------------------------------------


def write_diffusers(
    lora: TinyLora,
    path: Path,
    metadata: Mapping[str, str] | None = None,
    *,
    alpha_in: Literal["metadata", "up_weights"] = "metadata",
    te1_text_model_prefix: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the diffusers / PEFT layout, through diffusers' own `save_lora_weights`.

    Keys: `unet.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), likewise under
    `text_encoder.` and `text_encoder_2.`; header `format: pt`.

    This layout has no alpha tensor; without help diffusers loads it with alpha = rank
    (scaling 1). `alpha_in` chooses how the LoRA's alpha survives:

    * "metadata": diffusers' `lora_adapter_metadata` header entry (`unet.r`,
      `unet.lora_alpha`, `unet.target_modules`, ... as JSON), which `load_lora_weights`
      turns into the PEFT config. Same numbers, same scaling as the kohya files: bit-identical
      renders.
    * "up_weights": no adapter metadata, the up matrices multiplied by alpha / rank, as
      converters and older trainers do. Same change up to float rounding (exact when alpha /
      rank is a power of two).

    `te1_text_model_prefix` writes CLIP-L keys as `text_encoder.text_model.encoder...`, the
    form in files made with transformers < 5.6 (nearly all files in the wild); diffusers
    strips `text_model.` when the loaded CLIPTextModel is flat. False writes the flat form
    that a save under transformers >= 5.6 gives. CLIP-G keys always keep `text_model.`:
    `CLIPTextModelWithProjection` is still nested and nothing strips it.

    `metadata` adds string entries to the header (not `format` / `lora_adapter_metadata`).
    """
    if alpha_in not in ("metadata", "up_weights"):
        raise ValueError(f"alpha_in must be 'metadata' or 'up_weights', got {alpha_in!r}")
    reserved = _DIFFUSERS_RESERVED_METADATA.intersection(metadata or {})
    if reserved:
        raise ValueError(f"metadata keys reserved by diffusers: {sorted(reserved)}")
    path = Path(path)
    up_factor = lora.scaling if alpha_in == "up_weights" else 1.0

    layers: dict[str, dict[str, Tensor]] = {}
    adapter_metadata: dict[str, dict[str, object]] = {}
    for component, weights in lora.components().items():
        if not weights:
            continue  # save_lora_weights skips empty components too; keep both in step
        file_names = {
            module: _diffusers_file_module(component, module, te1_text_model_prefix)
            for module in weights
        }
        layers[component] = {}
        for module, (down, up) in weights.items():
            layers[component][f"{file_names[module]}.lora_A.weight"] = down.to(dtype)
            layers[component][f"{file_names[module]}.lora_B.weight"] = (up * up_factor).to(dtype)
        if alpha_in == "metadata":
            # A compact LoraConfig, not `LoraConfig.to_dict()`: the full dict embeds the peft
            # version and fields older peft releases reject. target_modules are the model's
            # own paths (no `text_model.` for flat CLIP-L): diffusers strips that prefix from
            # the tensor keys but not from target_modules, and PEFT matches a target as a
            # dotted suffix, so flat paths also match a nested transformers 4 CLIP-L.
            adapter_metadata[component] = {
                "r": lora.rank,
                "lora_alpha": lora.alpha,
                "target_modules": sorted(weights),
            }
    if not layers:
        raise ValueError("the LoRA has no modules to write")

    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        save_directory=str(path.parent),
        weight_name=path.name,
        unet_lora_layers=layers.get("unet"),
        text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
        unet_lora_adapter_metadata=adapter_metadata.get("unet"),
        text_encoder_lora_adapter_metadata=adapter_metadata.get("text_encoder"),
        text_encoder_2_lora_adapter_metadata=adapter_metadata.get("text_encoder_2"),
    )
    if metadata:
        _add_header_metadata(path, metadata)
    return path


def _diffusers_file_module(component: str, module: str, te1_text_model_prefix: bool) -> str:
    if component == "text_encoder" and te1_text_model_prefix:
        return "text_model." + module.removeprefix("text_model.")
    return module


def _add_header_metadata(path: Path, extra: Mapping[str, str]) -> None:
    """Merge `extra` into a safetensors file's `__metadata__` (tiny files: rewrite whole)."""
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata() or {})
    tensors = load_file(str(path))
    header.update(_string_metadata(extra))
    _save_atomically(tensors, path, header)


# --- kohya / sd-scripts layouts --------------------------------------------------------------


def write_kohya_original(
    lora: TinyLora,
    path: Path,
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write sd-scripts' SDXL layout: original (SGM) UNet names, `lora_te1_` / `lora_te2_`.

    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`, `.lora_up`
    and `.alpha` (a 0-d tensor in the file's dtype, as sd-scripts saves it), text encoders as
    `lora_te1_text_model_encoder_layers_0_self_attn_q_proj...`. sd-scripts saves float16 or
    bfloat16 (`dtype`); make_tiny_lora's values survive float16 exactly. Header: sd-scripts'
    ss_* / modelspec.* entries, then `metadata` over them.
    """
    return _write_kohya(lora, Path(path), metadata, dtype, _kohya_original_unet_name)


def write_kohya_diffusers_names(
    lora: TinyLora,
    path: Path,
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the kohya layout with diffusers' UNet module names, with alpha.

    `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`:
    the form diffusers' `convert_state_dict_to_kohya` and some trainers write for SDXL (and
    sd-scripts' own form for SD 1.x). Text-encoder keys as in `write_kohya_original`.
    """
    return _write_kohya(lora, Path(path), metadata, dtype, _kohya_diffusers_unet_name)


def _kohya_original_unet_name(module: str) -> str:
    return "lora_unet_" + diffusers_unet_key_to_original(module).replace(".", "_")


def _kohya_diffusers_unet_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _kohya_te_name(prefix: str, module: str) -> str:
    # sd-scripts names CLIP modules as transformers 4 did: always under `text_model.`.
    return prefix + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")


def _write_kohya(
    lora: TinyLora,
    path: Path,
    metadata: Mapping[str, str] | None,
    dtype: torch.dtype,
    unet_name: Callable[[str], str],
) -> Path:
    alpha = torch.tensor(lora.alpha, dtype=dtype)
    if float(alpha) != lora.alpha:
        # A rounded alpha would give this file a different scaling than a diffusers file of
        # the same LoRA, and the difference would look like a loader bug.
        raise ValueError(f"alpha {lora.alpha} is not exactly representable in {dtype}")
    namers: dict[str, Callable[[str], str]] = {
        "unet": unet_name,
        "text_encoder": lambda module: _kohya_te_name("lora_te1_", module),
        "text_encoder_2": lambda module: _kohya_te_name("lora_te2_", module),
    }
    tensors: dict[str, Tensor] = {}
    for component, weights in lora.components().items():
        for module, (down, up) in weights.items():
            name = namers[component](module)
            tensors[f"{name}.lora_down.weight"] = down.to(dtype)
            tensors[f"{name}.lora_up.weight"] = up.to(dtype)
            tensors[f"{name}.alpha"] = alpha.clone()
    if not tensors:
        raise ValueError("the LoRA has no modules to write")
    header = {
        **_KOHYA_SDXL_METADATA,
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": _number(lora.alpha),
        "ss_output_name": path.stem,
        "modelspec.title": path.stem,
        **_string_metadata(metadata or {}),
    }
    _save_atomically(tensors, path, header)
    return path


# --- files for refusal tests -----------------------------------------------------------------


def write_loha_header_only(path: Path) -> Path:
    """A LyCORIS LoHa file for the tiny SDXL: `hada_w1_a/b`, `hada_w2_a/b`, `alpha` per module.

    diffusers has no LoHa support for SDXL (its kohya converter raises on the unconverted
    keys), so lorafarm must recognise and refuse it from the header. Tensors are real-shaped
    for the tiny SDXL but few (two UNet modules, one CLIP-L module).
    """
    shapes = _default_target_shapes("attn")
    rank = 2
    generator = torch.Generator().manual_seed(0)
    modules = [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    ]
    tensors: dict[str, Tensor] = {}
    for component, module in modules:
        fan_in, fan_out = shapes[component][module]
        name = (
            _kohya_original_unet_name(module) if component == "unet"
            else _kohya_te_name("lora_te1_", module)
        )
        # LyCORIS' LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b), each factor [out, r] @ [r, in].
        for factor in ("w1", "w2"):
            tensors[f"{name}.hada_{factor}_a"] = torch.randn(fan_out, rank, generator=generator)
            tensors[f"{name}.hada_{factor}_b"] = torch.randn(rank, fan_in, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    header = {
        **_KOHYA_SDXL_METADATA,
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number(rank),
        "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "1", "conv_alpha": "1"}),
    }
    _save_atomically(tensors, Path(path), header)
    return Path(path)


def write_unmatched(path: Path) -> Path:
    """A LoRA-looking diffusers-layout file whose module names match nothing in SDXL.

    Keys `unet.nonexistent_block.lora_A.weight` / `.lora_B.weight` and the same under
    `text_encoder.`: the layout diffusers accepts, the module names no SDXL has, so a load
    patches no module. (peft 0.21 raises NoMatchingPeftModuleError, a ValueError, at the
    UNet part; a file mixing matching and unknown names loads the matching ones silently.)
    """
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, Tensor] = {}
    for component, width in (("unet", 8), ("text_encoder", 16)):
        tensors[f"{component}.nonexistent_block.lora_A.weight"] = torch.randn(
            4, width, generator=generator
        )
        tensors[f"{component}.nonexistent_block.lora_B.weight"] = torch.randn(
            width, 4, generator=generator
        )
    _save_atomically(tensors, Path(path), {"format": "pt"})
    return Path(path)


# Flux.1: 19 double blocks (0..18), 38 single blocks (0..37), hidden width 3072, MLP ratio 4.
# Few modules, at their real shapes: the shapes are the tells, and the block indices 18 and
# 37 show the full depth. `single_blocks_N_linear1` is left out: diffusers' converter splits
# it with real-size offsets (the fused qkv+mlp width, 3 * 3072 + 4 * 3072) and it would add
# 60 KB per block.
_FLUX_MODULES = {
    "double_blocks_0_img_attn_qkv": (3072, 3 * 3072),
    "double_blocks_0_img_attn_proj": (3072, 3072),
    "double_blocks_0_txt_attn_qkv": (3072, 3 * 3072),
    "double_blocks_18_img_attn_qkv": (3072, 3 * 3072),
    "single_blocks_0_modulation_lin": (3072, 3 * 3072),
    "single_blocks_37_modulation_lin": (3072, 3 * 3072),
}


def write_flux_like(path: Path) -> Path:
    """A header-realistic Flux.1 kohya LoRA (`lora_unet_double_blocks_0_img_attn_qkv...`).

    Rank 1, float16, a handful of modules at Flux.1's real shapes (width 3072, qkv 9216), with
    sd-scripts' Flux metadata; about 140 KB.
    """
    tensors: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    for module, (fan_in, fan_out) in _FLUX_MODULES.items():
        _add_kohya_module(tensors, f"lora_unet_{module}", fan_in, fan_out, generator)
    header = {
        "ss_network_module": "networks.lora_flux",
        "ss_base_model_version": "flux1",
        "ss_network_dim": "1",
        "ss_network_alpha": "1.0",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
    }
    _save_atomically(tensors, Path(path), header)
    return Path(path)


# SD 1.5's attention blocks, all with transformer_blocks_0 only (depth 1): diffusers-style
# names, as sd-scripts writes SD 1.x LoRAs. Block -> width.
_SD15_ATTENTION_BLOCKS = {
    **{
        f"down_blocks_{b}_attentions_{i}": w
        for b, w in enumerate((320, 640, 1280))
        for i in (0, 1)
    },
    "mid_block_attentions_0": 1280,
    **{
        f"up_blocks_{b}_attentions_{i}": w
        for b, w in zip((1, 2, 3), (1280, 640, 320), strict=True)
        for i in (0, 1, 2)
    },
}
_SD15_CONTEXT = 768  # CLIP-L width: attn2.to_k / to_v take 768 inputs (SD 2: 1024, SDXL: 2048)
_SD15_TE_LAYERS = 12


def write_sd15_like(path: Path) -> Path:
    """A header-realistic SD 1.5 kohya LoRA: one text encoder (`lora_te_`), depth-1 UNet.

    Rank 1, float16, real SD 1.5 shapes throughout, but not every module (the whole attention
    set would be ~550 KB): in every attention block, transformer_blocks_0's cross-attention
    `attn2_to_k` / `attn2_to_v` (input 768, the SD1 tell); in each of CLIP-L's 12 layers,
    `self_attn_q_proj` (768). About 155 KB.
    """
    tensors: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    for block, width in _SD15_ATTENTION_BLOCKS.items():
        for leaf in ("to_k", "to_v"):
            name = f"lora_unet_{block}_transformer_blocks_0_attn2_{leaf}"
            _add_kohya_module(tensors, name, _SD15_CONTEXT, width, generator)
    for layer in range(_SD15_TE_LAYERS):
        name = f"lora_te_text_model_encoder_layers_{layer}_self_attn_q_proj"
        _add_kohya_module(tensors, name, _SD15_CONTEXT, _SD15_CONTEXT, generator)
    header = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_dim": "1",
        "ss_network_alpha": "1.0",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
    }
    _save_atomically(tensors, Path(path), header)
    return Path(path)


def _add_kohya_module(
    tensors: dict[str, Tensor], name: str, fan_in: int, fan_out: int, generator: torch.Generator
) -> None:
    rank = 1
    tensors[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator).half()
    tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator).half()
    tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)


# --- shared helpers --------------------------------------------------------------------------


def _string_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        # safetensors' header holds strings only; converting silently would hide a caller bug.
        raise TypeError(f"metadata values must be strings: {bad}")
    return dict(metadata)


def _number(value: float) -> str:
    """sd-scripts writes ss_network_alpha as Python's str(float): "2.0", "0.5"."""
    return str(float(value))
