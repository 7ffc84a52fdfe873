"""A tiny, random-weight but structurally real SDXL checkpoint, built offline from a seed.

No model hub is reachable here or in CI, so SDXL demos and tests run on this checkpoint. It
keeps SDXL's real *layout* (3 UNet levels, the first without attention, two resnets per level,
a 4-level VAE with scale factor 8, CLIP-L plus OpenCLIP-G text encoders, "text_time" added
conditioning) and shrinks only the widths, so that every name-based mapping real SDXL files
need (original-layout single files, kohya LoRA names) works on it unchanged.

Three on-disk forms, all loaded back through the real loading paths:

* a diffusers folder (`save_pretrained`, safetensors);
* one original-layout `.safetensors` file (A1111 / ComfyUI / SGM key names), written here by
  inverting diffusers' single-file converters (`diffusers.loaders.single_file_utils`);
* a config-only folder (configs, tokenizers, scheduler; no weights), which is what
  `from_single_file(config=...)` needs to build the pipeline without asking the hub.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from daemon.plugin_api import (
    CLIP_BOS_TOKEN,
    CLIP_EOS_TOKEN,
    tiny_clip_tokenizer,
    tiny_clip_vocab,
)

__all__ = [
    "TE1_HIDDEN",
    "TE2_HIDDEN",
    "build_tiny_sdxl_pipeline",
    "diffusers_unet_key_to_original",
    "load_tiny_sdxl_single_file",
    "save_tiny_sdxl_config_folder",
    "save_tiny_sdxl_folder",
    "save_tiny_sdxl_single_file",
]

# --- tiny sizes -----------------------------------------------------------------------------
# The two text encoders MUST differ in width: diffusers' single-file loader tells CLIP-L from
# OpenCLIP-G by the width of the position embedding, and with equal widths it silently loads
# CLIP-L's weights into both encoders.
TE1_HIDDEN = 16  # CLIP-L stand-in (real: 768, 12 layers)
TE2_HIDDEN = 32  # OpenCLIP-G stand-in (real: 1280, 32 layers)
TE1_LAYERS = 3
# 10 layers, not fewer: diffusers (and other tools) recognise an SDXL base checkpoint by the
# key `conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`; with fewer
# layers `infer_diffusers_model_type` calls the file SD 1.x ("v1").
TE2_LAYERS = 10
MAX_TOKENS = 77  # CLIP's context length; prompts are padded to it as with the real model
ADDITION_TIME_EMBED_DIM = 8  # real: 256; six size/crop numbers are embedded at this width

UNET_WIDTHS = (8, 16, 32)  # real: (320, 640, 1280)
# Heads per level, proportional to width as in SDXL (5, 10, 20): head size 4 throughout.
UNET_HEADS = (2, 4, 8)
# Real SDXL: (1, 2, 10); the first level has no attention, so its value is unused. A depth of
# 3 on the last level keeps `transformer_blocks.2` in the key set, a trait LoRA sniffers use
# to tell SDXL from SD 1.x/2.x.
UNET_TRANSFORMER_DEPTH = (1, 2, 3)
LAYERS_PER_BLOCK = 2  # fixed by the SDXL layout; the original key indices depend on it
VAE_WIDTHS = (8, 16, 32, 32)  # real: (128, 256, 512, 512); 4 levels = scale factor 8
NORM_GROUPS = 4  # divides every width above and every concatenated skip width (16, 24, 48)
SDXL_VAE_SCALING_FACTOR = 0.13025

BOS_TOKEN = CLIP_BOS_TOKEN
EOS_TOKEN = CLIP_EOS_TOKEN
TE2_PAD_TOKEN = "!"  # SDXL's second tokenizer pads with "!", the first with <|endoftext|>
# The offline tokenizer builders are lorafarm's (the plugin API); these names stay for callers.
_tiny_clip_vocab = tiny_clip_vocab
_tiny_clip_tokenizer = tiny_clip_tokenizer


# --- models ---------------------------------------------------------------------------------


def _clip_text_config(hidden: int, layers: int, pad_id: int, hidden_act: str) -> CLIPTextConfig:
    vocab = _tiny_clip_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,  # SDXL's OpenCLIP-G projects 1280 -> 1280
        num_hidden_layers=layers,
        num_attention_heads=hidden // 8,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        # CLIPTextConfig defaults to the real ids 49406/49407, which do not exist here; the
        # EOS id drives the pooled output (first EOS position).
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=pad_id,
    )


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,  # latent side; the pipeline's default image side is 8 * 8 = 64 px
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_WIDTHS,
        layers_per_block=LAYERS_PER_BLOCK,
        transformer_layers_per_block=UNET_TRANSFORMER_DEPTH,
        attention_head_dim=UNET_HEADS,  # diffusers' legacy name: these are head counts
        norm_num_groups=NORM_GROUPS,
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,  # the pipeline concatenates both
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # pooled OpenCLIP-G embedding + 6 embedded numbers (original size, crop, target size)
        projection_class_embeddings_input_dim=TE2_HIDDEN + 6 * ADDITION_TIME_EMBED_DIM,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_WIDTHS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_WIDTHS),
        block_out_channels=VAE_WIDTHS,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=NORM_GROUPS,
        sample_size=64,
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
        force_upcast=True,  # as SDXL's own VAE config; only matters in float16
    )


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    """The scheduler config SDXL base ships with (its scheduler_config.json)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def _perturb_constant_parameters(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Add small noise to every parameter that is initialised to a constant.

    Norm scales start at 1 and most biases at 0. Left that way, two such tensors are equal,
    and a converter that swaps them (ln_1 for ln_2, norm1 for norm2) would still pass a
    weight-equality round trip. With every tensor distinct, a wrong mapping cannot hide.
    """
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            flat = param.reshape(-1)
            if flat.numel() > 0 and bool(torch.all(flat == flat[0])):
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.add_(0.05 * noise)


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build the tiny SDXL pipeline; the same seed gives bit-identical weights.

    The caller's global torch RNG state is left untouched. Each component is initialised from
    its own seed offset, so resizing one component never changes the others' weights.
    """
    tokenizer = _tiny_clip_tokenizer(pad_token=EOS_TOKEN)
    tokenizer_2 = _tiny_clip_tokenizer(pad_token=TE2_PAD_TOKEN)
    te1_config = _clip_text_config(
        TE1_HIDDEN, TE1_LAYERS, pad_id=tokenizer.pad_token_id, hidden_act="quick_gelu"
    )
    te2_config = _clip_text_config(
        TE2_HIDDEN, TE2_LAYERS, pad_id=tokenizer_2.pad_token_id, hidden_act="gelu"
    )

    builders = {
        "unet": _tiny_unet,
        "vae": _tiny_vae,
        "text_encoder": lambda: CLIPTextModel(te1_config),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(te2_config),
    }
    models: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed * 1000 + offset)
            model = build()
            generator = torch.Generator().manual_seed(seed * 1000 + 100 + offset)
            _perturb_constant_parameters(model, generator)
            models[name] = model.eval().requires_grad_(False)

    pipe = StableDiffusionXLPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=models["unet"],
        scheduler=_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- diffusers folder and config-only folder -------------------------------------------------


def save_tiny_sdxl_folder(pipe: StableDiffusionXLPipeline, folder: Path) -> None:
    """Write a regular diffusers folder (model_index.json, one subfolder per component)."""
    pipe.save_pretrained(folder, safe_serialization=True)


def save_tiny_sdxl_config_folder(pipe: StableDiffusionXLPipeline, folder: Path) -> None:
    """Write the diffusers folder layout with configs, tokenizers and scheduler but no weights.

    `from_single_file` builds each component from these configs and fills in weights from the
    single file; without a local folder like this it asks the hub for SDXL's configs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)  # model_index.json
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.text_encoder_2.config.save_pretrained(folder / "text_encoder_2")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    pipe.scheduler.save_pretrained(folder / "scheduler")  # a scheduler is only its config


# --- original (A1111 / ComfyUI / SGM) key layout ---------------------------------------------

# Whole-module renames outside the down/mid/up blocks (diffusers module path -> original).
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Module names inside a UNet resnet (diffusers -> original ResBlock).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# SDXL's up blocks 0 and 1 (the two deepest) have attention. In the original layout an up
# block's upsampler sits after its last resnet and, where present, its attention: at index 2
# of that output block with attention, at index 1 without.
_SDXL_UP_BLOCKS_WITH_ATTENTION = frozenset({0, 1})


def diffusers_unet_key_to_original(key: str) -> str:
    """Map a diffusers SDXL UNet key to its name in the original (SGM / A1111) layout.

    Works on parameter keys and on module paths alike, and returns the name WITHOUT the
    `model.diffusion_model.` prefix of a full checkpoint, e.g.

        down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight
            -> input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight
        up_blocks.0.upsamplers.0.conv -> output_blocks.2.2.conv

    (kohya LoRA names are this with "." replaced by "_" and a `lora_unet_` prefix.)

    Original numbering, with L = 2 resnets per level: `input_blocks.0` is conv_in; level b's
    resnet i is `input_blocks.{1 + 3b + i}.0` and its attention `.1`; the level's downsampler
    is `input_blocks.{1 + 3b + L}.0.op`. The middle block is resnet, attention, resnet
    (`middle_block.0/1/2`). Up level b's resnet i (0..L) is `output_blocks.{3b + i}.0`, its
    attention `.1`. Inside attentions the names are the same in both layouts.

    Valid for the SDXL block layout only (3 levels, first without attention, 2 resnets per
    level), which every SDXL derivative keeps; widths do not matter.

    Raises:
        KeyError: for a key with no place in that layout; a mapping that guessed would load
            or write weights in the wrong place without an error.
    """
    parts = key.split(".")
    per_level = LAYERS_PER_BLOCK + 1  # original blocks per level: L resnets + a resampler
    try:
        head = parts[0]
        if head == "down_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets" and index < LAYERS_PER_BLOCK:
                return _join(f"input_blocks.{1 + per_level * level + index}.0", _resnet(rest))
            if kind == "attentions" and index < LAYERS_PER_BLOCK:
                return _join(f"input_blocks.{1 + per_level * level + index}.1", rest)
            if kind == "downsamplers" and index == 0 and rest[:1] == ["conv"]:
                block = 1 + per_level * level + LAYERS_PER_BLOCK
                return _join(f"input_blocks.{block}.0.op", rest[1:])
        elif head == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets" and index in (0, 1):
                return _join(f"middle_block.{2 * index}", _resnet(rest))
            if kind == "attentions" and index == 0:
                return _join("middle_block.1", rest)
        elif head == "up_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets" and index <= LAYERS_PER_BLOCK:
                return _join(f"output_blocks.{per_level * level + index}.0", _resnet(rest))
            if kind == "attentions" and index <= LAYERS_PER_BLOCK:
                return _join(f"output_blocks.{per_level * level + index}.1", rest)
            if kind == "upsamplers" and index == 0:
                slot = 2 if level in _SDXL_UP_BLOCKS_WITH_ATTENTION else 1
                return _join(f"output_blocks.{per_level * level + LAYERS_PER_BLOCK}.{slot}", rest)
        else:
            for width in (2, 1):
                module = ".".join(parts[:width])
                if module in _UNET_TOP_LEVEL:
                    return _join(_UNET_TOP_LEVEL[module], parts[width:])
    except (IndexError, ValueError):
        pass
    raise KeyError(f"no original SDXL UNet name for diffusers key {key!r}")


def _resnet(rest: list[str]) -> list[str]:
    if not rest:
        return rest
    if rest[0] not in _UNET_RESNET:
        raise KeyError(f"unknown resnet module {rest[0]!r}")
    return [_UNET_RESNET[rest[0]], *rest[1:]]


def _join(prefix: str, rest: list[str]) -> str:
    return ".".join([prefix, *rest])


_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out": "proj_out",
}
_VAE_TOP_LEVEL = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}


def _vae_key_to_original(key: str, num_levels: int) -> str:
    """Diffusers AutoencoderKL key -> original LDM name (without `first_stage_model.`).

    The decoder's up levels are numbered in reverse in the original: diffusers'
    `up_blocks.0` (the first run, lowest resolution) is `up.{num_levels - 1}`.
    """
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    coder, module, rest = parts[0], parts[1], parts[2:]
    if module in _VAE_TOP_LEVEL:
        return _join(f"{coder}.{_VAE_TOP_LEVEL[module]}", rest)
    if module in ("down_blocks", "up_blocks"):
        level, kind, index, tail = int(rest[0]), rest[1], rest[2], rest[3:]
        name, level = ("down", level) if module == "down_blocks" else ("up", num_levels - 1 - level)
        if kind == "resnets":
            tail = ["nin_shortcut" if t == "conv_shortcut" else t for t in tail]
            return _join(f"{coder}.{name}.{level}.block.{index}", tail)
        # the only resampler: downsamplers.0.conv / upsamplers.0.conv
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return _join(f"{coder}.{name}.{level}.{sampler}", tail)
    if module == "mid_block":
        kind, index, tail = rest[0], int(rest[1]), rest[2:]
        if kind == "resnets":
            return _join(f"{coder}.mid.block_{index + 1}", tail)
        if tail[:2] == ["to_out", "0"]:
            tail = ["to_out", *tail[2:]]  # diffusers' to_out is a ModuleList: drop its ".0"
        return _join(f"{coder}.mid.attn_1.{_VAE_ATTENTION[tail[0]]}", tail[1:])
    raise KeyError(f"no original VAE name for diffusers key {key!r}")


def _open_clip_state_dict(text_encoder_2: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """OpenCLIP-G weights in the original layout (keys without `conditioner.embedders.1.model.`).

    OpenCLIP stores q, k and v as one `in_proj` tensor (nn.MultiheadAttention), names the MLP
    `c_fc`/`c_proj`, and keeps `text_projection` as a (width, projection) matrix, i.e. the
    transpose of the diffusers/transformers Linear weight.
    """
    source = {_strip_text_model(k): v for k, v in text_encoder_2.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": source.pop("embeddings.token_embedding.weight"),
        "positional_embedding": source.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": source.pop("final_layer_norm.weight"),
        "ln_final.bias": source.pop("final_layer_norm.bias"),
        "text_projection": source.pop("text_projection.weight").T,
        # Real SDXL files carry OpenCLIP's logit scale (unused for text conditioning); loaders
        # must skip it, so the tiny file has it too.
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    renames = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for layer in range(text_encoder_2.config.num_hidden_layers):
        src = f"encoder.layers.{layer}."
        dst = f"transformer.resblocks.{layer}."
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{suffix}"] = torch.cat(
                [source.pop(f"{src}self_attn.{p}_proj.{suffix}") for p in ("q", "k", "v")]
            )
            for diffusers_name, original_name in renames.items():
                out[f"{dst}{original_name}.{suffix}"] = source.pop(
                    f"{src}{diffusers_name}.{suffix}"
                )
    if source:
        raise KeyError(f"text_encoder_2 keys left unmapped: {sorted(source)}")
    return out


def _strip_text_model(key: str) -> str:
    return key.removeprefix("text_model.")


def _original_layout_state_dict(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline under its name in an original SDXL checkpoint."""
    out: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + diffusers_unet_key_to_original(key)] = value

    num_levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        original = _vae_key_to_original(key, num_levels)
        if ".mid.attn_1." in original and original.endswith(".weight") and value.ndim == 2:
            # The original VAE attention uses 1x1 convolutions for q, k, v and proj_out.
            value = value[:, :, None, None]
        out["first_stage_model." + original] = value

    # CLIP-L is stored in the transformers layout under `text_model.`; transformers >= 5.6
    # dropped that prefix from CLIPTextModel's own state dict, so it is put back here.
    for key, value in pipe.text_encoder.state_dict().items():
        out["conditioner.embedders.0.transformer.text_model." + _strip_text_model(key)] = value

    for key, value in _open_clip_state_dict(pipe.text_encoder_2).items():
        out["conditioner.embedders.1.model." + key] = value

    # safetensors refuses views and shared storage: give every tensor its own memory.
    return {key: value.detach().contiguous().clone() for key, value in out.items()}


def save_tiny_sdxl_single_file(
    pipe: StableDiffusionXLPipeline, path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write the whole pipeline as ONE original-layout `.safetensors` file (A1111/ComfyUI).

    Keys: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
    `conditioner.embedders.0.transformer.text_model.*` (CLIP-L),
    `conditioner.embedders.1.model.*` (OpenCLIP-G). Tensors keep the pipeline's dtype.
    `metadata` goes into the safetensors header's `__metadata__` (string values only).
    """
    save_file(_original_layout_state_dict(pipe), str(path), metadata=metadata)


def load_tiny_sdxl_single_file(path: Path, config_folder: Path) -> StableDiffusionXLPipeline:
    """Load an original-layout SDXL file offline, configs from a `save_tiny_sdxl_config_folder`.

    `config=` must be a local folder: without it diffusers fetches SDXL's configs from the hub.
    """
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(config_folder), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
