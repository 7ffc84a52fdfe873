"""The original Black Forest Labs (BFL) key layout of the Flux.1 transformer, both directions.

Users have Flux.1 transformers as one `.safetensors` file in BFL's layout (`flux1-dev.safetensors`,
ComfyUI/Forge files with a `model.diffusion_model.` prefix): `double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`,
`final_layer`. diffusers names the same weights differently and keeps fused projections apart
(q, k and v are three Linear layers; a single block's `linear1` is q, k, v plus the MLP input).

Why lorafarm converts these itself instead of leaving it to diffusers' single-file loader:
diffusers 0.42's `convert_flux_transformer_checkpoint_to_diffusers` splits `linear1` with sizes
hard-coded for the real model (`inner_dim = 3072`, MLP 12288), so it fails on any other width,
including every tiny test model. The conversion here takes every size from the tensors
themselves, so the tiny checkpoint goes through exactly the code a real file does; a test checks
it against diffusers' converter on real-sized (stride-0, nearly free) tensors.

One table, `module_groups`, drives both directions and the LoRA writers: each entry pairs one BFL
module with the diffusers module(s) it holds, fused along the output dimension in table order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "BFL_PREFIXES",
    "BflLayoutError",
    "ConvertedTransformer",
    "ModuleGroup",
    "bfl_to_diffusers",
    "block_counts",
    "diffusers_to_bfl",
    "is_transformer_key",
    "module_groups",
    "split_sizes",
    "strip_bfl_prefix",
]

T = TypeVar("T")

# Prefixes full checkpoints put before the transformer's keys (ComfyUI / Forge / SGM saves).
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Keys of other components an all-in-one checkpoint may carry; not the transformer's business.
_OTHER_COMPONENT_PREFIXES = ("vae.", "text_encoders.", "first_stage_model.", "cond_stage_model.",
                             "conditioner.")

_BLOCK_INDEX = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


class BflLayoutError(ValueError):
    """The state dict is not a complete Flux.1 transformer in the BFL layout; says what is off."""


@dataclass(frozen=True)
class ModuleGroup:
    """One BFL module and the diffusers module(s) whose weights it holds.

    With several diffusers modules the BFL weight is their concatenation along dim 0, in order.
    `swap_halves`: BFL's final modulation stores (shift, scale) where diffusers has (scale,
    shift); swapping the two halves is its own inverse.
    """

    bfl: str
    diffusers: tuple[str, ...]
    swap_halves: bool = False


# Inside double block N (`double_blocks.N.` / `transformer_blocks.N.`).
_DOUBLE_BLOCK = (
    ModuleGroup("img_mod.lin", ("norm1.linear",)),
    ModuleGroup("txt_mod.lin", ("norm1_context.linear",)),
    ModuleGroup("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ModuleGroup("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ModuleGroup("img_attn.proj", ("attn.to_out.0",)),
    ModuleGroup("txt_attn.proj", ("attn.to_add_out",)),
    ModuleGroup("img_mlp.0", ("ff.net.0.proj",)),
    ModuleGroup("img_mlp.2", ("ff.net.2",)),
    ModuleGroup("txt_mlp.0", ("ff_context.net.0.proj",)),
    ModuleGroup("txt_mlp.2", ("ff_context.net.2",)),
)
# RMSNorm scales: a parameter, not a Linear, and named `.scale` in BFL.
_DOUBLE_BLOCK_NORMS = (
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
)
# Inside single block N (`single_blocks.N.` / `single_transformer_blocks.N.`).
_SINGLE_BLOCK = (
    ModuleGroup("modulation.lin", ("norm.linear",)),
    ModuleGroup("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ModuleGroup("linear2", ("proj_out",)),
)
_SINGLE_BLOCK_NORMS = (
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
)
_TOP_LEVEL = (
    ModuleGroup("img_in", ("x_embedder",)),
    ModuleGroup("txt_in", ("context_embedder",)),
    ModuleGroup("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ModuleGroup("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ModuleGroup("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ModuleGroup("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ModuleGroup("final_layer.linear", ("proj_out",)),
    ModuleGroup("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
)
# Only Flux.1 dev (guidance-distilled) has these; schnell has no guidance input.
_GUIDANCE = (
    ModuleGroup("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ModuleGroup("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
)


def module_groups(num_double: int, num_single: int, guidance: bool) -> list[ModuleGroup]:
    """Every Linear of a Flux.1 transformer of this depth, with full names on both sides."""
    groups = list(_TOP_LEVEL) + (list(_GUIDANCE) if guidance else [])
    for index in range(num_double):
        groups += [ModuleGroup(f"double_blocks.{index}.{g.bfl}",
                               tuple(f"transformer_blocks.{index}.{d}" for d in g.diffusers))
                   for g in _DOUBLE_BLOCK]
    for index in range(num_single):
        groups += [ModuleGroup(f"single_blocks.{index}.{g.bfl}",
                               tuple(f"single_transformer_blocks.{index}.{d}" for d in g.diffusers))
                   for g in _SINGLE_BLOCK]
    return groups


def _norm_pairs(num_double: int, num_single: int) -> list[tuple[str, str]]:
    pairs = [(f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}")
             for i in range(num_double) for b, d in _DOUBLE_BLOCK_NORMS]
    pairs += [(f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}")
              for i in range(num_single) for b, d in _SINGLE_BLOCK_NORMS]
    return pairs


def _swap_halves(tensor: Tensor) -> Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def block_counts(keys: Iterable[str]) -> tuple[int, int]:
    """(double blocks, single blocks) of a BFL-layout key set (prefix already stripped).

    Raises BflLayoutError when the indices have gaps: a file with a block missing is damaged,
    and loading it would leave that block's weights uninitialised.
    """
    seen: dict[str, set[int]] = {"double_blocks": set(), "single_blocks": set()}
    for key in keys:
        if match := _BLOCK_INDEX.match(key):
            seen[match.group(1)].add(int(match.group(2)))
    counts = []
    for kind, indices in seen.items():
        if indices != set(range(len(indices))):
            missing = sorted(set(range(max(indices) + 1)) - indices)
            raise BflLayoutError(f"{kind} {missing} are missing (the file has "
                                 f"{kind} up to {max(indices)}); the file is incomplete")
        counts.append(len(indices))
    return counts[0], counts[1]


def is_transformer_key(key: str) -> bool:
    """Whether a key of a (possibly all-in-one) checkpoint belongs to the transformer."""
    return key.startswith(BFL_PREFIXES) or not key.startswith(_OTHER_COMPONENT_PREFIXES)


def strip_bfl_prefix(entries: Mapping[str, T]) -> dict[str, T]:
    """The transformer's keys (tensors or header entries) without a full checkpoint's prefix;
    other components' keys dropped."""
    out: dict[str, T] = {}
    for key, value in entries.items():
        if not is_transformer_key(key):
            continue
        for prefix in BFL_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def diffusers_to_bfl(state_dict: Mapping[str, Tensor], num_double: int, num_single: int,
                     guidance: bool) -> dict[str, Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict in BFL's layout (fused q/k/v, BFL names).

    Raises BflLayoutError for a diffusers key that has no place in the layout, so a writer never
    drops a weight silently.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for group in module_groups(num_double, num_single, guidance):
        for param in ("weight", "bias"):
            names = [f"{d}.{param}" for d in group.diffusers]
            fused = torch.cat([state_dict[name] for name in names], dim=0)
            out[f"{group.bfl}.{param}"] = _swap_halves(fused) if group.swap_halves else fused
            used.update(names)
    for bfl, diffusers in _norm_pairs(num_double, num_single):
        out[bfl] = state_dict[diffusers]
        used.add(diffusers)
    left = sorted(set(state_dict) - used)
    if left:
        raise BflLayoutError(f"diffusers keys with no BFL name: {left[:5]}")
    return {key: value.contiguous() for key, value in out.items()}


def split_sizes(group: ModuleGroup, shape: tuple[int, ...] | torch.Size) -> list[int]:
    """Row counts of a fused BFL weight's parts, from the weight's (out, in) shape alone.

    In Flux.1 every attention projection is width x width (width = the weight's input size), so
    q, k and v take `width` rows each; a single block's MLP input takes the rest (4 x width in
    every released model, but nothing here depends on that).
    """
    rows, width = shape[0], shape[1]
    parts = len(group.diffusers)
    if parts == 1:
        return [rows]
    sizes = [width] * 3 + ([rows - 3 * width] if parts == 4 else [])
    if len(sizes) != parts or sizes[-1] <= 0 or sum(sizes) != rows:
        raise BflLayoutError(f"{group.bfl}.weight has shape {tuple(shape)}, which cannot "
                             f"be split into {', '.join(group.diffusers)}")
    return sizes


@dataclass(frozen=True)
class ConvertedTransformer:
    """A BFL-layout transformer in diffusers' names, with what its keys say about the model."""

    state_dict: dict[str, Tensor]
    guidance: bool  # has guidance_in: FLUX.1 dev (schnell has none)
    double_blocks: int
    single_blocks: int


def bfl_to_diffusers(state_dict: Mapping[str, Tensor]) -> ConvertedTransformer:
    """A BFL-layout Flux.1 transformer as a diffusers state dict. Accepts a full checkpoint:
    the `model.diffusion_model.` prefix is stripped and other components' keys are ignored.

    Split tensors are views into the input (no copy), which matters for a 23 GB file.

    Raises:
        BflLayoutError: a key is missing, a fused weight has an impossible shape, or keys are
            left over that this layout does not know (an unsupported variant such as a scaled
            fp8 file); loading anyway would leave weights uninitialised or ignore some.
    """
    source = strip_bfl_prefix(state_dict)
    guidance = "guidance_in.in_layer.weight" in source
    num_double, num_single = block_counts(source)
    if num_double == 0 or num_single == 0:
        raise BflLayoutError("no double_blocks / single_blocks keys: not a Flux.1 transformer")
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    try:
        for group in module_groups(num_double, num_single, guidance):
            weight = source[f"{group.bfl}.weight"]
            # A GGUF-quantized weight (diffusers' GGUFParameter) holds rows of packed blocks;
            # its `quant_shape` is the matrix it decodes to. Blocks never cross a row, so
            # splitting the packed rows splits the matrix exactly.
            sizes = split_sizes(group, getattr(weight, "quant_shape", weight.shape))
            for param in ("weight", "bias"):
                key = f"{group.bfl}.{param}"
                tensor = source[key]
                used.add(key)
                if group.swap_halves:
                    tensor = _swap_halves(tensor)
                for name, part in zip(group.diffusers, tensor.split(sizes, dim=0), strict=True):
                    out[f"{name}.{param}"] = part
        for bfl, diffusers in _norm_pairs(num_double, num_single):
            out[diffusers] = source[bfl]
            used.add(bfl)
    except KeyError as exc:
        raise BflLayoutError(f"key {exc.args[0]!r} is missing; the file is not a complete "
                             "Flux.1 transformer") from None
    left = sorted(set(source) - used)
    if left:
        raise BflLayoutError(f"{len(left)} keys this Flux.1 layout does not know, e.g. "
                             f"{left[:3]}; the file is a variant lorafarm cannot load")
    return ConvertedTransformer(out, guidance, num_double, num_single)
