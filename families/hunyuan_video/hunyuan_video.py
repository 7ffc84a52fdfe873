"""The HunyuanVideo families: Tencent's HunyuanVideo (13B, text-to-video) and HunyuanVideo 1.5
(8.3B), as diffusers folders (`HunyuanVideoPipeline`, `HunyuanVideo15Pipeline`).

HunyuanVideo is guidance-distilled: `guidance` (6 by default) is fed to the transformer as an
embedding, there is no CFG scale and no negative prompt unless the job asks for real
classifier-free guidance with `true_cfg` (twice the compute per step). HunyuanVideo 1.5 runs
real CFG (6) through the pipeline's guider and takes a negative prompt. Both sample with
flow-matching Euler; clips have 4k+1 frames (the VAE compresses time 4x, keeping frame 0).

Prompts are wrapped in a template whose first `crop_start` tokens are cut from the text
encoder's output. diffusers ships the value computed for the released tokenizers (95 for
HunyuanVideo's Llama 3, 108 for 1.5's Qwen2.5); any other tokenizer (the tiny test models,
a retrained one) gets its own count, computed from the template when the pipeline loads,
or the template would be kept or the prompt cut away.

LoRAs patch the transformer only. HunyuanVideo LoRAs come in diffusers/PEFT names
(`transformer.transformer_blocks.0.attn.to_q`), in the original model's names
(`diffusion_model.double_blocks.0.img_attn_qkv`, which diffusers converts) and in
musubi-tuner's kohya-style names (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`
with `.alpha`), which diffusers 0.42 cannot read. `load_lora` renames musubi keys to the
original names and folds `alpha / rank` into the up matrix, then hands the result to
diffusers' own converter; nothing else is re-implemented. HunyuanVideo 1.5 takes
diffusers-format LoRAs, loaded into the transformer directly: its pipeline has no LoRA loader.

Telling HunyuanVideo LoRAs from Flux.1's: both are 3072 wide and share block names
(`double_blocks`, `img_attn_qkv` in kohya naming, `linear1`). HunyuanVideo spells its MLP and
modulation differently (`img_mlp.fc1`, `img_mod.linear`, `modulation.linear` where Flux.1 has
`img_mlp.0`, `img_mod.lin`, `modulation.lin`), writes `img_attn_qkv` with an underscore where
Flux.1's original names have `img_attn.qkv`, has a token refiner, and one more double block
(0..19 vs 0..18) and two more single blocks (0..39 vs 0..37). A file with none of these tells
(e.g. attention-only, blocks 0..18, no metadata) is left to the Flux.1 family; a sidecar
`family = "hunyuan-video"` overrides.

Sizes: HunyuanVideo's default is its release size, 1280x720 (129 frames at 24 fps); 960x544
(`width = 960`, `height = 544`) is the other size it was trained for and needs ~55% of the
activation memory and under half the time. `batch_cost` gives the scheduler the
memory per clip. On CUDA with float16, the transformers load in bfloat16 (their released
precision).

Transformer-only files load with a diffusers HunyuanVideo folder as their base (Llama 3 and
CLIP-L text encoders, VAE, tokenizers, scheduler and transformer config; lorafarm never
downloads one), named by config.toml `[checkpoints.NAME] config = ...` or a sidecar NAME.toml:
city96's GGUF files (`hunyuan-video-t2v-720p-Q8_0.gguf`, original layout, which stay quantized
in memory), FP8 files (`hunyuan_video_720_cfgdistill_fp8_e4m3fn.safetensors`) and plain
bf16 ones, all in the original (Tencent / ComfyUI) key layout. diffusers' converter for that
layout splits `single_blocks.N.linear1` at the released width (3072) whatever the file's width;
`original_transformer_to_diffusers` splits it at the file's own width first and leaves the
rest to diffusers. HunyuanVideo 1.5 loads from folders only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.plugin_api import (
    CheckpointProbe,
    CheckpointSource,
    DemoAssets,
    Family,
    FamilyDefaults,
    GgufError,
    LoadedCheckpoint,
    LoraFacts,
    LoraProbe,
    LoraUse,
    Progress,
    RenderedVideo,
    RenderError,
    RenderSpec,
    SafetensorsError,
    SafetensorsHeader,
    hookimpl,
    make_scheduler,
    pipeline_facts,
    quantization_fields,
    read_gguf_header,
    read_header,
    read_json_object,
    remember_scheduler_config,
    strip_explicit_weights,
    unweighted_notes,
)

HUNYUAN_VIDEO_PIPELINE = "HunyuanVideoPipeline"
HUNYUAN_VIDEO15_PIPELINE = "HunyuanVideo15Pipeline"
V10, V15 = "1.0", "1.5"
SINGLE_FILE = "single-file"  # checkpoint variant: a transformer-only file (GGUF, FP8, bf16)

# The chat template its text encoder is prompted with (a fact kept beside the pipeline).
PROMPT_TEMPLATE = "hunyuan_video.prompt_template"
# Tokenizers at least this large are taken to be the released ones (Llama 3: 128,256 tokens;
# Qwen2.5: 151,643), for which diffusers' crop_start values were computed.
RELEASED_VOCAB_MIN = 100_000

# --- LoRA recognition -----------------------------------------------------------------------

_PREFIXES = ("lora_unet_", "lora_transformer_", "model.diffusion_model.", "diffusion_model.",
             "base_model.model.", "transformer.")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
_DOWN = (".lora_down.weight", ".lora_A.weight")
_UP = (".lora_up.weight", ".lora_B.weight")

# Inside a double / single block of the original layout, in kohya naming ("_" for "."), and
# the original (dotted) name each stands for. The kohya -> original rename is this table.
_ORIGINAL_DOUBLE = {
    f"{stream}_{kohya}": f"{stream}_{dotted}" for stream in ("img", "txt")
    for kohya, dotted in (("attn_qkv", "attn_qkv"), ("attn_proj", "attn_proj"),
                          ("mlp_fc1", "mlp.fc1"), ("mlp_fc2", "mlp.fc2"),
                          ("mod_linear", "mod.linear"))
}
_ORIGINAL_SINGLE = {"linear1": "linear1", "linear2": "linear2",
                    "modulation_linear": "modulation.linear"}
# Original-layout modules outside the blocks (kohya naming), which diffusers also converts.
_ORIGINAL_TOP = re.compile(
    r"^(?:txt_in_(?:input_embedder|t_embedder_mlp_[02]|c_embedder_linear_[12]"
    r"|individual_token_refiner_blocks_\d+_(?:self_attn_qkv|self_attn_proj|mlp_fc[12]"
    r"|adaLN_modulation_1))"
    r"|time_in_mlp_[02]|guidance_in_mlp_[02]|vector_in_(?:in|out)_layer"
    r"|final_layer_linear|final_layer_adaLN_modulation_1)$")
# diffusers module names (kohya naming) inside a double block (both versions) and a
# single block (HunyuanVideo only), and outside the blocks.
_DIFFUSERS_DOUBLE = re.compile(
    r"^(?:attn_(?:to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff_net_0_proj|ff_net_2|ff_context_net_0_proj|ff_context_net_2"
    r"|norm1_linear|norm1_context_linear)$")
_DIFFUSERS_SINGLE = re.compile(r"^(?:attn_to_[qkv]|proj_mlp|proj_out|norm_linear)$")
_REFINER = re.compile(
    r"^context_embedder_(?:proj_in|time_text_embed_(?:timestep|text)_embedder_linear_[12]"
    r"|token_refiner_refiner_blocks_\d+_(?:attn_(?:to_q|to_k|to_v|to_out_0)|ff_net_0_proj"
    r"|ff_net_2|norm_out_linear))$")
_DIFFUSERS_TOP_V10 = re.compile(
    r"^(?:time_text_embed_(?:timestep|guidance|text)_embedder_linear_[12]|proj_out"
    r"|norm_out_linear)$")
_DIFFUSERS_TOP_V15 = re.compile(
    r"^(?:context_embedder_2_linear_[123]|image_embedder_linear_[12]"
    r"|time_embed_timestep_embedder_linear_[12]|proj_out|norm_out_linear)$")
_V15_ONLY = re.compile(r"^(?:context_embedder_2|image_embedder|time_embed)_")
_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)"
                    r"_(\d+)_(.+)$")
# HunyuanVideo-only spellings of the original layout (Flux.1: img_mlp.0, img_mod.lin, ...).
_V10_ONLY_ORIGINAL = re.compile(r"^(?:(?:img|txt)_(?:mlp_fc[12]|mod_linear)|modulation_linear)$")
# `double_blocks.N.img_attn_qkv` with dots around: Flux.1's original layout has img_attn.qkv.
_DOTTED_ORIGINAL = re.compile(r"(?:^|\.)double_blocks\.\d+\.(?:img|txt)_attn_(?:qkv|proj)$")

V10_DOUBLE_BLOCKS, V10_SINGLE_BLOCKS = 20, 40  # Flux.1: 19 and 38
V15_DOUBLE_BLOCKS = 54
FLUX1_DOUBLE_BLOCKS, FLUX1_SINGLE_BLOCKS = 19, 38
V10_WIDTH, V15_WIDTH = 3072, 2048
_METADATA_KEYS = ("modelspec.architecture", "ss_base_model_version")
_HUNYUAN_VIDEO_IN_METADATA = re.compile(r"hunyuan[-_ .]?video|hunyuanvideo|\bhyv", re.I)
_V15_IN_METADATA = re.compile(r"(?:video|hyv)[-_ .]?(?:v)?1[-_.]?5", re.I)


@dataclass(frozen=True)
class HunyuanLoraGuess:
    version: str  # V10 or V15
    score: float
    reason: str


def recognise_hunyuan_lora(header: SafetensorsHeader,
                           facts: LoraFacts) -> HunyuanLoraGuess | None:
    """Which HunyuanVideo (if any) a LoRA is for, from its names, block indices, widths and
    trainer metadata. Every transformer module must be one HunyuanVideo has, in a naming
    lorafarm loads; then at least one tell must say HunyuanVideo rather than Flux.1 (which
    shares the names) or SD3 (which shares diffusers' double-block names)."""
    stated = " ".join(f"{key} = {header.metadata[key]!r}" for key in _METADATA_KEYS
                      if header.metadata.get(key))
    if stated and not _HUNYUAN_VIDEO_IN_METADATA.search(stated) and re.search(
            r"flux|wan|sd3|stable-diffusion|qwen|ltx|cogvideo|mochi|chroma", stated, re.I):
        return None  # the trainer says it is another model's
    shapes = _lora_shapes(header)
    modules = (set(facts.module_keys) | set(shapes)) - {""}
    tells: list[str] = []
    v15_tells: list[str] = []
    double: set[int] = set()
    single: set[int] = set()
    kohya = original = diffusers = False
    widths: set[int] = set()
    for module in sorted(modules):
        if module.startswith(_TEXT_ENCODER_PREFIXES):
            return None  # HunyuanVideo LoRAs patch the transformer only
        kohya = kohya or module.startswith(("lora_unet_", "lora_transformer_"))
        name = _strip_prefix(module).replace(".", "_")
        if match := _BLOCK.match(name):
            kind, index, inner = match.group(1), int(match.group(2)), match.group(3)
            if kind == "double_blocks" and inner in _ORIGINAL_DOUBLE:
                original = True
                double.add(index)
            elif kind == "single_blocks" and inner in _ORIGINAL_SINGLE:
                original = True
                single.add(index)
            elif kind == "transformer_blocks" and _DIFFUSERS_DOUBLE.match(inner):
                diffusers = True
                double.add(index)
            elif kind == "single_transformer_blocks" and _DIFFUSERS_SINGLE.match(inner):
                diffusers = True
                single.add(index)
            else:
                return None  # a block module HunyuanVideo does not have
            if _V10_ONLY_ORIGINAL.match(inner):
                tells.append(f"HunyuanVideo module name {inner}")
            if not kohya and _DOTTED_ORIGINAL.search(_strip_prefix(module)):
                tells.append(f"{inner} with an underscore (Flux.1 writes img_attn.qkv)")
            fan_in = shapes.get(module, (None, None))[0]
            if fan_in and inner.endswith(("attn_qkv", "attn_to_q", "attn_add_q_proj")):
                widths.add(fan_in)
        elif kohya:
            return None  # musubi-tuner trains the blocks only; nothing else can be renamed
        elif _ORIGINAL_TOP.match(name):
            original = True
            if name.startswith("txt_in_"):
                tells.append(f"HunyuanVideo token refiner ({name})")
        elif _REFINER.match(name):
            diffusers = True
            tells.append(f"HunyuanVideo token refiner ({name})")
        elif _DIFFUSERS_TOP_V15.match(name) or _DIFFUSERS_TOP_V10.match(name):
            diffusers = True
            if _V15_ONLY.match(name):
                v15_tells.append(f"HunyuanVideo 1.5 module {name}")
        else:
            return None  # not a HunyuanVideo module
    if not (double or single or tells or v15_tells):
        return None
    if original and diffusers:
        return None  # two namings mixed: not a file any trainer writes
    if kohya and not original:
        return None  # kohya-style diffusers names: no trainer writes those for HunyuanVideo
    # Block indices beyond the model say "not this model"; those beyond Flux.1's say
    # HunyuanVideo, since the names are shared.
    deepest_double = max(double, default=-1)
    deepest_single = max(single, default=-1)
    if deepest_single >= V10_SINGLE_BLOCKS or deepest_double >= V15_DOUBLE_BLOCKS:
        return None
    if deepest_double >= FLUX1_DOUBLE_BLOCKS and (single or original):
        tells.append(f"double block {deepest_double} (Flux.1 stops at {FLUX1_DOUBLE_BLOCKS - 1})")
    if deepest_single >= FLUX1_SINGLE_BLOCKS:
        tells.append(f"single block {deepest_single} (Flux.1 stops at {FLUX1_SINGLE_BLOCKS - 1})")
    if _HUNYUAN_VIDEO_IN_METADATA.search(stated):
        (v15_tells if _V15_IN_METADATA.search(stated) else tells).append(stated)
    note = ""
    if original or single:
        if v15_tells or deepest_double >= V10_DOUBLE_BLOCKS:
            return None  # HunyuanVideo's structure with 1.5 traits: neither model fits
        version = V10
    elif v15_tells or deepest_double >= V10_DOUBLE_BLOCKS or V15_WIDTH in widths:
        version = V15
        if deepest_double >= V10_DOUBLE_BLOCKS and V15_WIDTH in widths:
            tells.append(f"double block {deepest_double}, no single blocks, width {V15_WIDTH}")
    else:
        version = V10
        if V10_WIDTH not in widths:
            note = ("double blocks only, so it could be for HunyuanVideo 1.5 (if so, set "
                    'family = "hunyuan-video-1.5" in a sidecar)')
    evidence = v15_tells + tells
    if not evidence:
        return None  # nothing says HunyuanVideo rather than Flux.1 / SD3
    if stated and _HUNYUAN_VIDEO_IN_METADATA.search(stated):
        score = 0.95
    elif any(word in tell for tell in evidence for word in ("module", "refiner", "underscore")):
        score = 0.9
    else:
        score = 0.8  # block indices or widths only
    naming = "musubi-tuner (kohya) names" if kohya else (
        "original names" if original else "diffusers names")
    name = "HunyuanVideo 1.5" if version == V15 else "HunyuanVideo"
    reason = f"{name} LoRA, {naming}: {evidence[0]}" + (f"; {note}" if note else "")
    return HunyuanLoraGuess(version=version, score=score, reason=reason)


def _strip_prefix(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    return module


def _lora_shapes(header: SafetensorsHeader) -> dict[str, tuple[int | None, int | None]]:
    """LoRA module -> (input width from the down matrix, output width from the up matrix)."""
    found: dict[str, list[int | None]] = {}
    for key, info in header.tensors.items():
        if len(info.shape) != 2:
            continue
        for suffixes, slot, dim in ((_DOWN, 0, 1), (_UP, 1, 0)):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix:
                found.setdefault(key[: -len(suffix)], [None, None])[slot] = info.shape[dim]
    return {module: (pair[0], pair[1]) for module, pair in found.items()}


# --- LoRA loading ---------------------------------------------------------------------------

_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
                   ".lora_A.weight": "down", ".lora_B.weight": "up"}


class HunyuanLoraLayoutError(RenderError):
    """A LoRA file claims to be HunyuanVideo's but cannot be brought into a layout diffusers
    loads; the message names the key."""


def needs_original_rename(keys: list[str]) -> bool:
    """Whether diffusers 0.42 cannot read the file as it is: musubi-tuner's `lora_unet_`
    names, or original names with kohya's `lora_down` / `lora_up` / `alpha` (diffusers'
    HunyuanVideo converter reads original names with `lora_A` / `lora_B` only, and splits a
    fused q/k/v `lora_down` as if it were an up matrix)."""
    return any(key.startswith("lora_unet_") or key.endswith((".lora_down.weight", ".alpha"))
               for key in keys)


def to_original_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA under the original module names with `lora_A` / `lora_B`, which
    diffusers' HunyuanVideo converter reads: `lora_unet_double_blocks_0_img_mlp_fc1` becomes
    `diffusion_model.double_blocks.0.img_mlp.fc1` (a fixed table, `_ORIGINAL_DOUBLE` /
    `_ORIGINAL_SINGLE`), `lora_down` / `lora_up` become `lora_A` / `lora_B`, and each module's
    `alpha / rank` is multiplied into its up matrix (diffusers reads no alpha here; kohya's
    forward pass scales by it). Raises HunyuanLoraLayoutError for a key it cannot place.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise HunyuanLoraLayoutError(f"LoRA key {key!r} is neither a down/up matrix nor an "
                                         "alpha; this is not a plain LoRA")
        groups.setdefault(key[: -len(suffix)], {})[_KOHYA_SUFFIXES[suffix]] = tensor
    out: dict[str, torch.Tensor] = {}
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise HunyuanLoraLayoutError(f"LoRA module {module!r} lacks its "
                                         f"{'down' if 'down' not in parts else 'up'} matrix")
        down, up = parts["down"], parts["up"]
        if "alpha" in parts:
            up = up * (float(parts["alpha"]) / down.shape[0])
        name = _original_module_name(module)
        out[f"diffusion_model.{name}.lora_A.weight"] = down
        out[f"diffusion_model.{name}.lora_B.weight"] = up
    return out


def _original_module_name(module: str) -> str:
    if not module.startswith("lora_unet_"):
        return _strip_prefix(module)
    flat = module[len("lora_unet_"):]
    match = re.match(r"^(double_blocks|single_blocks)_(\d+)_(.+)$", flat)
    table = (_ORIGINAL_DOUBLE if match and match.group(1) == "double_blocks" else
             _ORIGINAL_SINGLE)
    if match is None or match.group(3) not in table:
        raise HunyuanLoraLayoutError(
            f"musubi-tuner LoRA module {module!r} is not one of the double/single block "
            "layers lorafarm can rename for diffusers (img/txt attn_qkv, attn_proj, mlp_fc1, "
            "mlp_fc2, mod_linear; linear1, linear2, modulation_linear)")
    return f"{match.group(1)}.{match.group(2)}.{table[match.group(3)]}"


def _hunyuan_lora_source(path: Path) -> str | dict[str, torch.Tensor]:
    """What to hand `load_lora_weights`: the path, or the renamed tensors (see
    `to_original_layout`) when diffusers cannot read the file as it is."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    fused_refiner = next((key for key in keys if "self_attn_qkv" in key), None)
    if fused_refiner is not None:
        # diffusers 0.42 splits this fused q/k/v's down matrix as if it were an up matrix
        # (a size-mismatch error at best): say so instead of failing inside PEFT.
        raise HunyuanLoraLayoutError(
            f"LoRA {path.name}: diffusers 0.42 cannot load the token refiner's fused q/k/v "
            f"in the original layout ({fused_refiner}); remove the txt_in.* modules from the "
            "file, or save the LoRA in diffusers format")
    if not needs_original_rename(keys):
        return str(path)
    return to_original_layout(load_file(str(path)))


# --- transformer-only files (GGUF, FP8, bf16) -----------------------------------------------

# Keys every HunyuanVideo transformer file has in the original layout (after the prefix).
V10_FILE_TELLS = ("double_blocks.0.img_attn_qkv.weight",
                  "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight")
# Prefixes ComfyUI's tools keep in front of a transformer's keys.
_FILE_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
_LINEAR1 = re.compile(r"^(single_blocks\.\d+)\.linear1\.(weight|bias)$")
_BLOCK_INDEX = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class TransformerFileFacts:
    """What a transformer-only file's tensor table says (names and shapes only)."""

    prefix: str
    width: int
    in_channels: int | None
    double_blocks: int
    single_blocks: int


def transformer_file_facts(table: SafetensorsHeader,
                           tells: tuple[str, ...] = V10_FILE_TELLS) -> TransformerFileFacts | None:
    """The facts of an original-layout HunyuanVideo transformer file (a GGUF file's table
    has PyTorch-order shapes, as a safetensors header), or None if it is not one."""
    prefix = next((p for p in _FILE_PREFIXES
                   if all(p + tell in table.tensors for tell in tells)), None)
    if prefix is None:
        return None
    shapes = {key[len(prefix):]: info.shape for key, info in table.tensors.items()
              if key.startswith(prefix)}
    qkv = shapes["double_blocks.0.img_attn_qkv.weight"]
    patch = shapes.get("img_in.proj.weight")
    blocks: dict[str, set[int]] = {"double_blocks": set(), "single_blocks": set()}
    for key in shapes:
        if match := _BLOCK_INDEX.match(key):
            blocks[match.group(1)].add(int(match.group(2)))
    return TransformerFileFacts(
        prefix=prefix, width=int(qkv[-1]),
        in_channels=int(patch[1]) if patch is not None and len(patch) == 5 else None,
        double_blocks=len(blocks["double_blocks"]), single_blocks=len(blocks["single_blocks"]))


def _read_table(path: Path, kind: str) -> SafetensorsHeader:
    """Raises GgufError / SafetensorsError (ValueErrors) with the reason."""
    return read_gguf_header(path).as_safetensors_header() if kind == "gguf" else read_header(path)


def transformer_file_requirements(checkpoint: LoadedCheckpoint) -> str | None:
    """What a transformer-only HunyuanVideo checkpoint still needs (a base folder that fits
    it), or None when it can load. Reads headers and configs only."""
    name = checkpoint.name
    from families.shared.quantized import scaled_fp8_problem

    scaled = scaled_fp8_problem(checkpoint)
    if scaled:
        return scaled
    where = f"[checkpoints.{name}] config"
    base = checkpoint.config_path
    if base is None:
        return (f"{name!r} is a HunyuanVideo transformer alone; the text encoders (Llama 3, "
                "CLIP-L), VAE, tokenizers and configs come from a local diffusers HunyuanVideo "
                f"folder (lorafarm never downloads one): set {where} = "
                '"path/to/HunyuanVideo" in config.toml, or config = "..." in a sidecar '
                f"{name}.toml beside the file (the folder's transformer weights are not "
                "needed), e.g. hunyuanvideo-community/HunyuanVideo")
    index = read_json_object(base / "model_index.json")
    if index is None:
        return (f"the config folder {base} for {name!r} has no readable model_index.json; "
                f"point {where} at a diffusers HunyuanVideo folder")
    if index.get("_class_name") != HUNYUAN_VIDEO_PIPELINE:
        return (f"the config folder {base} for {name!r} is a {index.get('_class_name')}, not "
                f"a {HUNYUAN_VIDEO_PIPELINE}; point {where} at a diffusers HunyuanVideo folder")
    config = read_json_object(base / "transformer" / "config.json")
    if config is None:
        return (f"the config folder {base} has no transformer/config.json, which {name!r} "
                "needs to be built")
    for component in ("text_encoder", "text_encoder_2", "vae"):
        if not any((base / component).glob("*.safetensors")):
            return (f"the config folder {base} has no {component} weights "
                    f"({component}/*.safetensors); {name!r} takes them from there: use a "
                    "complete diffusers HunyuanVideo download")
    for component in ("tokenizer", "tokenizer_2", "scheduler"):
        if not (base / component).is_dir():
            return f"the config folder {base} has no {component}/ folder"
    try:
        facts = transformer_file_facts(_read_table(checkpoint.path, checkpoint.kind))
    except (GgufError, SafetensorsError, OSError) as exc:
        return f"{checkpoint.path.name}: {exc}"
    if facts is None:
        return (f"{checkpoint.path.name} is not a HunyuanVideo transformer in the original "
                f"layout (no {V10_FILE_TELLS[0]})")
    width = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
    if (facts.width, facts.in_channels) != (width, config.get("in_channels")):
        return (f"{checkpoint.path.name} (width {facts.width}, {facts.in_channels} input "
                f"channels) does not fit the transformer of the config folder {base.name} "
                f"(width {width}, {config.get('in_channels')} input channels): use the base "
                "folder of the same release and size")
    return None


def original_transformer_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout HunyuanVideo transformer state dict (no prefix) under diffusers'
    names. Quantized GGUF tensors pass through as they are: every step is a rename or a split
    / concatenation along rows, which keeps a GGUFParameter's blocks whole.

    diffusers' `convert_hunyuan_video_transformer_to_diffusers` does the work, except for
    `single_blocks.N.linear1` (q, k, v and the MLP input, fused), which it splits at the
    released width, 3072, whatever the file's. Here it is split first, at the width the
    block's `linear2` gives (its output rows), under names the converter then only moves from
    `single_blocks` to `single_transformer_blocks`."""
    from diffusers.loaders.single_file_utils import (
        convert_hunyuan_video_transformer_to_diffusers,
    )

    prepared = dict(state)
    for key in [k for k in prepared if _LINEAR1.match(k)]:
        match = _LINEAR1.match(key)
        assert match is not None
        block, suffix = match.groups()
        linear2 = prepared.get(f"{block}.linear2.weight")
        if linear2 is None:
            raise RenderError(f"{block} has linear1 but no linear2.weight: the file is "
                              "incomplete")
        tensor = prepared.pop(key)
        width = int(linear2.shape[0])
        if tensor.shape[0] <= 3 * width:
            raise RenderError(f"{key} has {tensor.shape[0]} rows, too few for q, k, v and the "
                              f"MLP at width {width}")
        q, k, v, mlp = torch.split(tensor, (width, width, width, tensor.shape[0] - 3 * width),
                                   dim=0)
        for part, value in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v),
                            ("proj_mlp", mlp)):
            prepared[f"{block}.{part}.{suffix}"] = value
    return convert_hunyuan_video_transformer_to_diffusers(prepared)


def load_hunyuan_transformer(path: Path, base: Path, dtype: torch.dtype, *,
                             gguf: bool = False) -> Any:
    """An original-layout transformer file as a HunyuanVideoTransformer3DModel, its config
    from the base folder's transformer/config.json and its depth from the file. A GGUF file
    stays quantized (GGUFLinear layers computing in `dtype`); an FP8 file keeps its float8
    weights (Float8Linear layers computing in `dtype`); a bf16 / fp32 one loads in `dtype`."""
    from diffusers import HunyuanVideoTransformer3DModel
    from safetensors import safe_open

    from families.shared.quantized import (
        check_complete,
        float8_dtype_of,
        load_fp8_model,
        load_gguf_model,
        load_gguf_state_dict,
    )

    if gguf:
        state = load_gguf_state_dict(path)  # ComfyUI's prefix already removed
    else:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            prefix = next((p for p in _FILE_PREFIXES[1:] if any(k.startswith(p) for k in keys)),
                          "")
            state = {key[len(prefix):]: handle.get_tensor(key) for key in keys
                     if key.startswith(prefix)}
    blocks: dict[str, set[int]] = {"double_blocks": set(), "single_blocks": set()}
    for key in state:
        if match := _BLOCK_INDEX.match(key):
            blocks[match.group(1)].add(int(match.group(2)))
    converted = original_transformer_to_diffusers(state)
    depth = {"num_layers": len(blocks["double_blocks"]),
             "num_single_layers": len(blocks["single_blocks"])}
    model_class = HunyuanVideoTransformer3DModel
    if gguf:
        return load_gguf_model(model_class, converted, base, "transformer", dtype, path, **depth)
    if float8_dtype_of(converted) is not None:
        return load_fp8_model(model_class, converted, base, "transformer", dtype, path, **depth)
    model = model_class.from_single_file(converted, config=str(base), subfolder="transformer",
                                         dtype=dtype, local_files_only=True, **depth)
    check_complete(model, path, base / "transformer")
    return model.eval().requires_grad_(False)


# --- the pipelines --------------------------------------------------------------------------


def _lora_pipeline_class() -> type:
    """HunyuanVideo15Pipeline with the pipeline-level adapter API the worker uses
    (`set_adapters`, `enable_lora`, `disable_lora`, `delete_adapters`).

    diffusers 0.42 gives this pipeline no LoRA mixin at all; `LoraBaseMixin` provides those
    methods for the components named in `_lora_loadable_modules`, here the transformer,
    whose own PEFT methods do the work. Loading goes through the transformer
    (`HunyuanVideo15Family.load_lora`). Built lazily: importing diffusers' pipelines takes
    seconds, and the family module is imported by every daemon start.
    """
    global _LORA_PIPELINE_15
    if _LORA_PIPELINE_15 is None:
        from diffusers import HunyuanVideo15Pipeline
        from diffusers.loaders.lora_base import LoraBaseMixin

        class HunyuanVideo15LoraPipeline(HunyuanVideo15Pipeline, LoraBaseMixin):
            _lora_loadable_modules = ["transformer"]
            transformer_name = "transformer"
            lorafarm_progress: Progress | None = None

            def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
                bar = super().progress_bar(iterable=iterable, total=total)
                if self.lorafarm_progress is None:
                    return bar
                return _StepReporter(bar, self.lorafarm_progress, self)

        _LORA_PIPELINE_15 = HunyuanVideo15LoraPipeline
    return _LORA_PIPELINE_15


_LORA_PIPELINE_15: type | None = None


class _StepReporter:
    """The denoising loop's progress bar, also reporting each finished step to lorafarm's
    `Progress` (which raises to abort the batch), for pipelines without a step callback."""

    def __init__(self, bar: Any, progress: Progress, pipe: Any) -> None:
        self.bar, self.progress, self.pipe = bar, progress, pipe
        self.done = 0

    def __enter__(self) -> _StepReporter:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        self.progress.callback(self.pipe, self.done - 1, None, {})


def hunyuan_prompt_template(tokenizer: Any) -> dict[str, Any]:
    """HunyuanVideo's prompt template with the `crop_start` that fits `tokenizer`.

    The released tokenizer keeps diffusers' value (95). For any other, crop_start is the
    number of leading tokens every prompt shares once wrapped in the template: computed from
    whole prompts rather than the template's prefix alone, so that a token merging across the
    template/prompt boundary is kept rather than cut.
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = dict(DEFAULT_PROMPT_TEMPLATE)
    if len(tokenizer) >= RELEASED_VOCAB_MIN:
        return template
    encoded = [tokenizer(template["template"].format(probe)).input_ids for probe in _PROBES]
    template["crop_start"] = _shared_prefix_length(encoded)
    return template


def hunyuan_video15_crop_start(pipe: Any) -> int:
    """The `prompt_template_encode_start_idx` of a HunyuanVideo 1.5 pipeline for its
    tokenizer: diffusers' 108 for the released Qwen2.5 tokenizer, else the number of leading
    tokens the chat template puts before every prompt."""
    tokenizer = pipe.tokenizer
    if len(tokenizer) >= RELEASED_VOCAB_MIN:
        return int(pipe.prompt_template_encode_start_idx)
    encoded = []
    for probe in _PROBES:
        messages = [{"role": "system", "content": pipe.system_message},
                    {"role": "user", "content": probe}]
        encoded.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"])
    return _shared_prefix_length(encoded)


# Prompts that start differently from each other (letter, capital, digit, punctuation).
_PROBES = ("a", "Z", "7", "(")


def _shared_prefix_length(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences, strict=False):
        if len(set(column)) != 1:
            break
        length += 1
    return length


def _scheduler(pipe: Any, spec: RenderSpec, kind: str) -> Any:
    """The job's sampler on the checkpoint's scheduler config, with the job's flow shift
    (FlowMatchEulerDiscreteScheduler's `shift`; make_scheduler carries it to UniPC's
    `flow_shift`). A scheduler built from the config, not `set_shift` afterwards, so that the
    shift also shapes the training sigma range the scheduler keeps."""
    config = remember_scheduler_config(pipe)
    shift = spec.extra.get("flow_shift")
    if shift is not None:
        config["shift"] = float(shift)
        config.pop("flow_shift", None)
    return make_scheduler(config, spec.sampler, spec.schedule, kind=kind)


class _HunyuanBase(Family):
    """What both HunyuanVideo versions share: diffusers folders (HunyuanVideo also loads
    transformer-only files on a base folder), video output, flow-matching Euler,
    transformer-only LoRAs, VAE tiling and slicing."""

    sampler_kind = "flow"
    # Its LLM encoders read no weights: stripped text, and unweighted_notes says so.
    prompt_weighting = "stripped"
    produces = "video"
    pipeline_class_name: str
    version: str
    single_file_tells: tuple[str, ...] = ()  # keys of a transformer-only file
    bytes_per_token: float  # transformer activations per token (see batch_cost)
    text_tokens: int  # tokens beside the video's in the transformer's sequence

    def probe_checkpoint(self, source: CheckpointSource) -> CheckpointProbe | None:
        if source.kind == "folder":
            pipeline_class = (source.model_index or {}).get("_class_name")
            if pipeline_class != self.pipeline_class_name:
                return None
            return CheckpointProbe(family=self.name, score=0.9,
                                   reason=f"model_index.json: {pipeline_class}")
        # A transformer-only file (ComfyUI's hunyuan_video_*.safetensors, city96's GGUF
        # files): loadable with a base folder (HunyuanVideoFamily), and otherwise recognised
        # so that the user is told what it needs, rather than "unknown model".
        if not self.single_file_tells or (source.kind == "gguf" and not self.reads_gguf):
            return None
        table = source.tensor_table()
        facts = transformer_file_facts(table, self.single_file_tells) if table else None
        if facts is None:
            return None
        container = "GGUF file" if source.kind == "gguf" else "single file"
        return CheckpointProbe(
            family=self.name, score=0.9, variant=SINGLE_FILE,
            reason=f"{self.display_name} transformer in the original layout, {container} "
                   f"(img_attn_qkv, token refiner; {facts.double_blocks} double / "
                   f"{facts.single_blocks} single blocks, width {facts.width})")

    def missing_requirements(self, checkpoint: LoadedCheckpoint) -> str | None:
        if checkpoint.kind == "folder":
            return None
        return (f"{checkpoint.name!r} is a {self.display_name} transformer alone; lorafarm runs "
                f"{self.display_name} from diffusers folders only (model_index.json with "
                "transformer, vae, text encoders and tokenizers), e.g. "
                "hunyuanvideo-community/HunyuanVideo downloaded into models/")

    def _dtypes(self, dtype: torch.dtype) -> torch.dtype | dict[str, torch.dtype]:
        """float16 for everything but the transformer, which stays in bfloat16: its released
        weights are bfloat16, and diffusers' own HunyuanVideo example loads it that way
        beside a float16 pipeline rather than trusting float16's narrower range."""
        if dtype == torch.float16:
            return {"transformer": torch.bfloat16, "default": dtype}
        return dtype

    def probe_lora(self, header: SafetensorsHeader, facts: LoraFacts) -> LoraProbe | None:
        guess = recognise_hunyuan_lora(header, facts)
        if guess is None or guess.version != self.version:
            return None
        return LoraProbe(family=self.name, architecture=self.architecture, score=guess.score,
                         reason=guess.reason)

    def lora_strengths(self, lora: LoraUse) -> dict[str, float]:
        # The transformer is the only component either loader patches.
        return {"transformer": lora.strength}

    def apply_conventions(self, prompt: str, negative_prompt: str | None,
                          enabled: bool) -> tuple[str, str, list[str]]:
        """No prompt conventions; nothing weights prompts for Llama / Qwen2.5 encoders, so
        explicit A1111 weights are dropped at render time (`strip_explicit_weights`), with a
        warning here. The prompts are kept as written, for the history, the infotext and
        rerenders."""
        prompt, negative, notes = super().apply_conventions(prompt, negative_prompt, enabled)
        return prompt, negative, [*notes, *unweighted_notes(self.display_name, prompt, negative)]

    def batch_cost(self, spec: RenderSpec) -> int:
        """Accelerator memory one clip adds to a batch: transformer activations per token.

        Calibrated on HunyuanVideo's published peaks with the same weights loaded (README:
        60 GB at 1280x720x129, 45 GB at 960x544x129): 15 GB for 51,480 more video tokens,
        ~0.29 MB a token at width 3072, scaled by width for 1.5. Tokens are latent frames
        ((frames - 1) / 4 + 1) times 16x16-pixel patches, plus the text tokens. 1280x720x129:
        ~35 GB per clip; 960x544x129: ~20 GB; 848x480x121 on 1.5: ~10 GB. The VAE decodes one
        clip at a time (slicing) and in tiles, so it does not grow with the batch.
        """
        frames = int(spec.extra.get("frames") or self.defaults.frames or 1)
        video_tokens = ((frames - 1) // 4 + 1) * (spec.height // 16) * (spec.width // 16)
        return int((video_tokens + self.text_tokens) * self.bytes_per_token)

    def _finish_loading(self, pipe: Any, device: torch.device) -> Any:
        pipe.set_progress_bar_config(disable=True)
        # Samplers are swapped per batch, each built from the checkpoint's own settings.
        remember_scheduler_config(pipe)
        # Decoding one clip at a time (slicing) gives the same frames with a fraction of the
        # memory, and HunyuanVideo 1.5's VAE fails on a batch without it. Tiling only acts
        # above 256 px, where a whole-frame decode of a 720p clip needs tens of GB.
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        # Loaded on the CPU already; `.to("cpu")` would only warn about fp32 modules.
        return pipe if device.type == "cpu" else pipe.to(device)

    def _frames(self, result: Any, specs: list[RenderSpec]) -> list[RenderedVideo]:
        fps = int(specs[0].extra["fps"])
        return [RenderedVideo(frames=list(frames), fps=fps) for frames in result.frames]

    def infotext_fields(self, spec: RenderSpec) -> list[tuple[str, object]]:
        fields: list[tuple[str, object]] = []
        if spec.extra.get("flow_shift") is not None:
            fields.append(("Shift", spec.extra["flow_shift"]))  # Forge's name for flow shift
        fields += [("Frames", spec.extra.get("frames")), ("FPS", spec.extra.get("fps"))]
        return fields + quantization_fields(spec)


class HunyuanVideoFamily(_HunyuanBase):
    name = "hunyuan-video"
    architecture = "hunyuan_video"
    display_name = "HunyuanVideo"
    pipeline_class_name = HUNYUAN_VIDEO_PIPELINE
    version = V10
    single_file_tells = V10_FILE_TELLS
    reads_gguf = True  # city96's original-layout GGUF files, with a diffusers folder as base
    bytes_per_token = 0.29e6
    text_tokens = 256  # Llama tokens after the template is cropped
    supports_negative_prompt = False  # unless the job sets true_cfg
    supports_true_cfg = True  # HunyuanVideoPipeline's true_cfg_scale
    # 1280x720 is the released default; 960x544 renders in about a third of the time.
    defaults = FamilyDefaults(width=1280, height=720, steps=50, cfg=1.0, sampler="Euler",
                              schedule=None, size_multiple=16, guidance=6.0, frames=129, fps=24,
                              frame_step=4, flow_shift=7.0, cfg_fixed=1.0)

    def missing_requirements(self, checkpoint: LoadedCheckpoint) -> str | None:
        if checkpoint.kind == "folder":
            return None
        return transformer_file_requirements(checkpoint)

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> Any:
        from diffusers import HunyuanVideoPipeline

        self.require_loadable(checkpoint)
        dtypes = self._dtypes(dtype)
        if checkpoint.kind == "folder":
            pipe = HunyuanVideoPipeline.from_pretrained(checkpoint.path, dtype=dtypes,
                                                        local_files_only=True)
        else:
            base = checkpoint.config_path
            assert base is not None  # checked by missing_requirements
            # The transformer computes in the dtype it would load in from a folder.
            compute = dtypes["transformer"] if isinstance(dtypes, dict) else dtypes
            transformer = load_hunyuan_transformer(checkpoint.path, base, compute,
                                                   gguf=checkpoint.kind == "gguf")
            pipe = HunyuanVideoPipeline.from_pretrained(base, transformer=transformer,
                                                        dtype=dtypes, local_files_only=True)
        pipeline_facts(pipe).extras[PROMPT_TEMPLATE] = hunyuan_prompt_template(pipe.tokenizer)
        return self._finish_loading(pipe, device)

    def load_lora(self, pipe: Any, path: Path, adapter_name: str, lora: LoraUse) -> None:
        pipe.load_lora_weights(_hunyuan_lora_source(path), adapter_name=adapter_name)

    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: torch.device,
                     progress: Progress | None = None) -> list[RenderedVideo]:
        first = specs[0]
        if first.cfg != 1.0:
            # Not checked at intake (no family hook for it yet): fail clearly rather than
            # render at a setting that does not exist.
            raise RenderError(f"{self.display_name} has no CFG scale (cfg = {first.cfg:g}): use "
                              "`guidance` for its embedded guidance, or `true_cfg` for real "
                              "classifier-free guidance with a negative prompt")
        pipe.scheduler = _scheduler(pipe, first, self.sampler_kind)
        # CPU generators: the same seed gives the same noise on any device, and one generator
        # per render keeps each clip independent of its batch.
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
        options: dict[str, Any] = {}
        true_cfg = first.extra.get("true_cfg")
        if true_cfg is not None:
            # The pipeline runs real CFG only when a negative prompt is given; "" is one.
            options = {"true_cfg_scale": float(true_cfg),
                       "negative_prompt": [strip_explicit_weights(spec.negative_prompt)[0]
                                           for spec in specs]}
        result = pipe(
            # No prompt weighting: explicit A1111 weights are read as plain text.
            prompt=[strip_explicit_weights(spec.prompt)[0] for spec in specs],
            height=first.height,
            width=first.width,
            num_frames=int(first.extra["frames"]),
            num_inference_steps=first.steps,
            guidance_scale=float(first.extra["guidance"]),  # embedded, not CFG
            generator=generators,
            prompt_template=pipeline_facts(pipe).extras[PROMPT_TEMPLATE],
            output_type="pil",
            callback_on_step_end=progress.callback if progress else None,
            **options,
        )
        return self._frames(result, specs)

    def infotext_fields(self, spec: RenderSpec) -> list[tuple[str, object]]:
        # Forge's name for embedded guidance, written beside "CFG scale: 1" as for Flux.1.
        fields: list[tuple[str, object]] = [("Distilled CFG Scale", spec.extra.get("guidance"))]
        if spec.extra.get("true_cfg") is not None:
            fields.append(("True CFG scale", spec.extra["true_cfg"]))
        return fields + super().infotext_fields(spec)

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        from families.hunyuan_video.tiny import (
            GGUF_HEADS,
            build_tiny_hunyuan_video_pipeline,
            save_tiny_folder,
            save_tiny_hunyuan_transformer_fp8,
            save_tiny_hunyuan_transformer_gguf,
        )

        save_tiny_folder(build_tiny_hunyuan_video_pipeline(seed=0), models_dir / DEMO_V10)
        # Quantized transformers need widths that are multiples of GGUF's 32-wide blocks: a
        # HunyuanVideo of its own (32 wide), whose folder is both their base and the
        # unquantized original.
        wide = build_tiny_hunyuan_video_pipeline(seed=0, heads=GGUF_HEADS)
        save_tiny_folder(wide, models_dir / DEMO_GGUF_BASE)
        for quantization, name in DEMO_GGUF.items():
            save_tiny_hunyuan_transformer_gguf(wide.transformer, models_dir / f"{name}.gguf",
                                               quantization)
        save_tiny_hunyuan_transformer_fp8(wide.transformer,
                                          models_dir / f"{DEMO_FP8}.safetensors")
        job = DEMO_JOB.format(name=DEMO_GGUF["Q8_0"], seed=5000, extra="guidance = 6.0\n")
        return DemoAssets(
            checkpoint_overrides={name: {"config": f"models/{DEMO_GGUF_BASE}"}
                                  for name in (*DEMO_GGUF.values(), DEMO_FP8)},
            jobs={"hunyuan-video.toml": DEMO_JOB.format(name=DEMO_V10, seed=5000,
                                                        extra="guidance = 6.0\n"),
                  # One clip: the quantized path, beside the folder's jobs.
                  "hunyuan-video-gguf.toml": job.replace("count = 2", "count = 1")})


class HunyuanVideo15Family(_HunyuanBase):
    name = "hunyuan-video-1.5"
    architecture = "hunyuan_video_1_5"
    display_name = "HunyuanVideo 1.5"
    pipeline_class_name = HUNYUAN_VIDEO15_PIPELINE
    version = V15
    bytes_per_token = 0.29e6 * V15_WIDTH / V10_WIDTH
    text_tokens = 1000 + 256 + 729  # Qwen2.5 and ByT5 tokens, SigLIP image tokens (zeros)
    supports_negative_prompt = True  # real CFG through the guider
    # 848x480 is the 480p release's size (1280x720 for the 720p one). Flow shift: the
    # checkpoint's scheduler config, which differs between the releases.
    defaults = FamilyDefaults(width=848, height=480, steps=50, cfg=6.0, sampler="Euler",
                              schedule=None, size_multiple=16, frames=121, fps=24,
                              frame_step=4)

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> Any:
        pipe = _lora_pipeline_class().from_pretrained(
            checkpoint.path, dtype=self._dtypes(dtype), local_files_only=True)
        pipe.prompt_template_encode_start_idx = hunyuan_video15_crop_start(pipe)
        return self._finish_loading(pipe, device)

    def load_lora(self, pipe: Any, path: Path, adapter_name: str, lora: LoraUse) -> None:
        # The pipeline has no load_lora_weights; its transformer takes diffusers-format files,
        # reading the keys under `transformer.`.
        pipe.transformer.load_lora_adapter(str(path), prefix="transformer",
                                           adapter_name=adapter_name, _pipeline=pipe)

    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: torch.device,
                     progress: Progress | None = None) -> list[RenderedVideo]:
        first = specs[0]
        pipe.scheduler = _scheduler(pipe, first, self.sampler_kind)
        if pipe.guider.guidance_scale != first.cfg:
            # The guider is the pipeline's CFG; a copy with the job's scale (cfg 1 turns the
            # unconditional pass off).
            pipe.guider = pipe.guider.new(guidance_scale=float(first.cfg))
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
        # This pipeline takes no step callback: its progress bar reports the steps instead.
        pipe.lorafarm_progress = progress
        try:
            result = pipe(
                # No prompt weighting: A1111 weights are read as plain text.
                prompt=[strip_explicit_weights(spec.prompt)[0] for spec in specs],
                negative_prompt=[strip_explicit_weights(spec.negative_prompt)[0] for spec in specs],
                height=first.height,
                width=first.width,
                num_frames=int(first.extra["frames"]),
                num_inference_steps=first.steps,
                generator=generators,
                output_type="pil",
            )
        finally:
            pipe.lorafarm_progress = None
        return self._frames(result, specs)

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        from families.hunyuan_video.tiny import (
            build_tiny_hunyuan_video15_pipeline,
            save_tiny_folder,
        )

        save_tiny_folder(build_tiny_hunyuan_video15_pipeline(seed=0), models_dir / DEMO_V15)
        # One clip: with CFG and 1.5's ~2000 text and image tokens it is the demo's slowest.
        job = DEMO_JOB.format(name=DEMO_V15, seed=6000, extra="cfg = 6.0\n")
        return DemoAssets(jobs={"hunyuan-video-1.5.toml": job.replace("count = 2", "count = 1")})


DEMO_V10 = "tiny-hunyuan-video"
DEMO_V15 = "tiny-hunyuan-video-1.5"
# A 32-wide tiny HunyuanVideo (a folder) and its transformer quantized, named as the
# community's files are; config.toml names the folder as their base.
DEMO_GGUF_BASE = "tiny-hunyuan-video-32"
DEMO_GGUF = {q: f"tiny-hunyuan-video-{q}" for q in ("Q8_0", "Q4_0")}
DEMO_FP8 = "tiny-hunyuan-video-fp8"
DEMO_JOB = ('checkpoint = "{name}"\n'
            'prompt = "a paper boat drifting down a rain-soaked street, slow camera pan"\n'
            "seed = {seed}\ncount = 2\nsteps = 2\n{extra}"
            "width = 64\nheight = 64\nframes = 5\nfps = 8\n")


@hookimpl
def register_families(register: Any) -> None:
    register(HunyuanVideoFamily())
    register(HunyuanVideo15Family())
