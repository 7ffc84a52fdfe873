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
precision). Transformer-only single files are recognised but not loadable yet: the family
asks for the diffusers folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon import hookimpl
from daemon.family import (
    CheckpointProbe,
    CheckpointSource,
    DemoAssets,
    Family,
    FamilyDefaults,
    LoadedCheckpoint,
    LoraProbe,
    Progress,
    RenderedVideo,
    RenderError,
)
from daemon.lora_probe import LoraFacts
from daemon.safetensors_header import SafetensorsHeader
from daemon.samplers import make_scheduler
from daemon.spec import LoraUse, RenderSpec

HUNYUAN_VIDEO_PIPELINE = "HunyuanVideoPipeline"
HUNYUAN_VIDEO15_PIPELINE = "HunyuanVideo15Pipeline"
V10, V15 = "1.0", "1.5"
SINGLE_FILE = "single-file"  # checkpoint variant: a transformer-only file (not loadable yet)

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
    config = dict(pipe.lorafarm_scheduler_config)
    shift = spec.extra.get("flow_shift")
    if shift is not None:
        config["shift"] = float(shift)
        config.pop("flow_shift", None)
    return make_scheduler(config, spec.sampler, spec.schedule, kind=kind)


# A1111's explicit prompt weights, `(text:1.2)`; nothing weights prompts for these encoders.
_WEIGHTED = re.compile(r"(?<!\\)\(([^():]+):\s*-?\d+(?:\.\d+)?\s*\)")


def strip_prompt_weights(prompt: str) -> tuple[str, list[str]]:
    """(prompt with `(text:1.2)` read as plain `text`, the weighted parts found)."""
    found = [match.group(0) for match in _WEIGHTED.finditer(prompt)]
    return _WEIGHTED.sub(lambda match: match.group(1).strip(), prompt), found


class _HunyuanBase(Family):
    """What both HunyuanVideo versions share: folders only, video output, flow-matching
    Euler, transformer-only LoRAs, VAE tiling and slicing."""

    sampler_kind = "flow"
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
        # A transformer-only file (ComfyUI's hunyuan_video_*.safetensors) is recognised so
        # that the user is told it cannot be used yet, rather than "unknown model".
        keys = set(source.header.tensors) if source.header else set()
        if self.single_file_tells and any(
                all(prefix + tell in keys for tell in self.single_file_tells)
                for prefix in ("", "diffusion_model.", "model.diffusion_model.")):
            return CheckpointProbe(family=self.name, score=0.9, variant=SINGLE_FILE,
                                   reason="original-layout transformer (img_attn_qkv, token "
                                          "refiner)")
        return None

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
        """No prompt conventions; A1111 weights are read as plain text, with a warning,
        because nothing weights prompts for Llama / Qwen2.5 encoders."""
        notes = []
        prompt, weighted = strip_prompt_weights(prompt)
        negative = self.defaults.negative_prompt if negative_prompt is None else negative_prompt
        negative, weighted_negative = strip_prompt_weights(negative)
        if weighted or weighted_negative:
            shown = ", ".join([*weighted, *weighted_negative][:3])
            notes.append(f"{self.display_name} has no prompt weighting: {shown} read as plain "
                         "text")
        return prompt, negative, notes

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
        pipe.lorafarm_scheduler_config = dict(pipe.scheduler.config)
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
        return fields


class HunyuanVideoFamily(_HunyuanBase):
    name = "hunyuan-video"
    architecture = "hunyuan_video"
    display_name = "HunyuanVideo"
    pipeline_class_name = HUNYUAN_VIDEO_PIPELINE
    version = V10
    single_file_tells = ("double_blocks.0.img_attn_qkv.weight",
                         "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight")
    bytes_per_token = 0.29e6
    text_tokens = 256  # Llama tokens after the template is cropped
    supports_negative_prompt = False  # unless the job sets true_cfg
    supports_true_cfg = True  # HunyuanVideoPipeline's true_cfg_scale
    # 1280x720 is the released default; 960x544 renders in about a third of the time.
    defaults = FamilyDefaults(width=1280, height=720, steps=50, cfg=1.0, sampler="Euler",
                              schedule=None, size_multiple=16, guidance=6.0, frames=129, fps=24,
                              frame_step=4, flow_shift=7.0, cfg_fixed=1.0)

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> Any:
        from diffusers import HunyuanVideoPipeline

        pipe = HunyuanVideoPipeline.from_pretrained(checkpoint.path, dtype=self._dtypes(dtype),
                                                    local_files_only=True)
        pipe.lorafarm_prompt_template = hunyuan_prompt_template(pipe.tokenizer)
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
                       "negative_prompt": [spec.negative_prompt for spec in specs]}
        result = pipe(
            prompt=[spec.prompt for spec in specs],
            height=first.height,
            width=first.width,
            num_frames=int(first.extra["frames"]),
            num_inference_steps=first.steps,
            guidance_scale=float(first.extra["guidance"]),  # embedded, not CFG
            generator=generators,
            prompt_template=pipe.lorafarm_prompt_template,
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
        from families.hunyuan_video_tiny import build_tiny_hunyuan_video_pipeline, save_tiny_folder

        save_tiny_folder(build_tiny_hunyuan_video_pipeline(seed=0), models_dir / DEMO_V10)
        return DemoAssets(jobs={"hunyuan-video.toml": DEMO_JOB.format(
            name=DEMO_V10, seed=5000, extra="guidance = 6.0\n")})


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
                prompt=[spec.prompt for spec in specs],
                negative_prompt=[spec.negative_prompt for spec in specs],
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
        from families.hunyuan_video_tiny import (
            build_tiny_hunyuan_video15_pipeline,
            save_tiny_folder,
        )

        save_tiny_folder(build_tiny_hunyuan_video15_pipeline(seed=0), models_dir / DEMO_V15)
        # One clip: with CFG and 1.5's ~2000 text and image tokens it is the demo's slowest.
        job = DEMO_JOB.format(name=DEMO_V15, seed=6000, extra="cfg = 6.0\n")
        return DemoAssets(jobs={"hunyuan-video-1.5.toml": job.replace("count = 2", "count = 1")})


DEMO_V10 = "tiny-hunyuan-video"
DEMO_V15 = "tiny-hunyuan-video-1.5"
DEMO_JOB = ('checkpoint = "{name}"\n'
            'prompt = "a paper boat drifting down a rain-soaked street, slow camera pan"\n'
            "seed = {seed}\ncount = 2\nsteps = 2\n{extra}"
            "width = 64\nheight = 64\nframes = 5\nfps = 8\n")


@hookimpl
def register_families(register: Any) -> None:
    register(HunyuanVideoFamily())
    register(HunyuanVideo15Family())
