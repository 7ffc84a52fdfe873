"""A tiny, random-weight Stable Diffusion 1.5, built offline from a seed, for the demo and
tests: the real SD 1.x layout (CLIP ViT-L text encoder with its real 768 width, a UNet with
cross-attention on that 768-wide context and one transformer block per attention, an LDM
VAE) with every other size shrunk.

Three on-disk forms, each loaded back through diffusers' real loading paths: a diffusers
folder, one original-layout `.safetensors` file (A1111 / ComfyUI key names, written by
inverting diffusers' single-file converters), and a config-only folder for
`from_single_file(config=...)`. `write_kohya_lora` writes a kohya-format SD 1.x LoRA for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from daemon.plugin_api import CLIP_BOS_TOKEN, CLIP_EOS_TOKEN, tiny_clip_tokenizer, tiny_clip_vocab

CONTEXT_WIDTH = 768  # CLIP ViT-L/14's width: the real SD 1.x value, which LoRA probes read
TEXT_LAYERS = 2  # two, so that clip skip 2 (the penultimate layer) differs from 1
UNET_WIDTHS = (8, 16, 32)  # real: (320, 640, 1280, 1280)
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
LAYERS_PER_BLOCK = 2  # as SD 1.x: original block indices depend on it
VAE_WIDTHS = (8, 16, 32, 32)  # real: (128, 256, 512, 512); 4 levels = scale factor 8
NORM_GROUPS = 4
SD1_VAE_SCALING_FACTOR = 0.18215


def build_tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline; the same seed gives the same weights, and the caller's torch RNG
    state is left alone."""
    tokenizer = tiny_clip_tokenizer()
    vocab = tiny_clip_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CONTEXT_WIDTH, intermediate_size=64,
        projection_dim=CONTEXT_WIDTH, num_hidden_layers=TEXT_LAYERS, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=vocab[CLIP_BOS_TOKEN],
        eos_token_id=vocab[CLIP_EOS_TOKEN], pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, down_block_types=DOWN_BLOCKS,
            up_block_types=UP_BLOCKS, block_out_channels=UNET_WIDTHS,
            layers_per_block=LAYERS_PER_BLOCK, attention_head_dim=2,
            norm_num_groups=NORM_GROUPS, cross_attention_dim=CONTEXT_WIDTH)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=VAE_WIDTHS,
            layers_per_block=2, latent_channels=4, norm_num_groups=NORM_GROUPS,
            sample_size=64, scaling_factor=SD1_VAE_SCALING_FACTOR)
        text_encoder = CLIPTextModel(text_config)
        for model in (unet, vae, text_encoder):
            with torch.no_grad():  # no two norm scales or biases alike: a swap cannot hide
                for _, param in sorted(model.named_parameters()):
                    if param.numel() and bool(torch.all(param == param.reshape(-1)[0])):
                        param.add_(0.05 * torch.randn(param.shape))
            model.eval().requires_grad_(False)
    # The scheduler SD 1.5 ships with (its scheduler_config.json).
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_config_folder(pipe: StableDiffusionPipeline, folder: Path) -> None:
    """The diffusers layout with configs, tokenizer and scheduler, no weights: what a single
    file needs as its local `config` folder."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_pretrained(folder / "scheduler")


# --- original (A1111 / LDM) key layout --------------------------------------------------------

_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key_to_original(key: str) -> str:
    """A diffusers UNet key -> its LDM name (without `model.diffusion_model.`). Level b's
    resnet i is `input_blocks.{1 + 3b + i}.0` (attention `.1`), its downsampler
    `input_blocks.{3 + 3b}.0.op`; up level b's resnet i is `output_blocks.{3b + i}.0`
    (attention `.1`), its upsampler after them (slot 2 with attention, 1 without)."""
    parts = key.split(".")
    per_level = LAYERS_PER_BLOCK + 1
    head, rest = parts[0], parts[1:]
    if head in ("down_blocks", "up_blocks"):
        level, kind, index, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
        if kind == "resnets":
            tail = [_RESNET[tail[0]], *tail[1:]]
        if head == "down_blocks":
            if kind == "downsamplers":
                return ".".join([f"input_blocks.{per_level * (level + 1)}.0.op", *tail[1:]])
            slot = 0 if kind == "resnets" else 1
            return ".".join([f"input_blocks.{1 + per_level * level + index}.{slot}", *tail])
        if kind == "upsamplers":
            slot = 2 if UP_BLOCKS[level].startswith("CrossAttn") else 1
            return ".".join([f"output_blocks.{per_level * level + LAYERS_PER_BLOCK}.{slot}",
                             *tail])
        slot = 0 if kind == "resnets" else 1
        return ".".join([f"output_blocks.{per_level * level + index}.{slot}", *tail])
    if head == "mid_block":
        kind, index, tail = rest[0], int(rest[1]), rest[2:]
        if kind == "resnets":
            return ".".join([f"middle_block.{2 * index}", _RESNET[tail[0]], *tail[1:]])
        return ".".join(["middle_block.1", *tail])
    for width in (2, 1):
        if ".".join(parts[:width]) in _UNET_TOP:
            return ".".join([_UNET_TOP[".".join(parts[:width])], *parts[width:]])
    raise KeyError(f"no original SD 1.x UNet name for {key!r}")


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out": "proj_out"}


def _vae_key_to_original(key: str) -> str:
    """A diffusers AutoencoderKL key -> its LDM name (without `first_stage_model.`); the
    decoder's levels are numbered in reverse in the original."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    coder, module, rest = parts[0], parts[1], parts[2:]
    if module in ("conv_in", "conv_out", "conv_norm_out"):
        return ".".join([coder, "norm_out" if module == "conv_norm_out" else module, *rest])
    if module in ("down_blocks", "up_blocks"):
        level, kind, index, tail = int(rest[0]), rest[1], rest[2], rest[3:]
        name = "down" if module == "down_blocks" else "up"
        level = level if name == "down" else len(VAE_WIDTHS) - 1 - level
        if kind == "resnets":
            tail = ["nin_shortcut" if t == "conv_shortcut" else t for t in tail]
            return ".".join([f"{coder}.{name}.{level}.block.{index}", *tail])
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return ".".join([f"{coder}.{name}.{level}.{sampler}", *tail])
    kind, index, tail = rest[0], int(rest[1]), rest[2:]
    if kind == "resnets":
        return ".".join([f"{coder}.mid.block_{index + 1}", *tail])
    if tail[:2] == ["to_out", "0"]:
        tail = ["to_out", *tail[2:]]
    return ".".join([f"{coder}.mid.attn_1.{_VAE_ATTENTION[tail[0]]}", *tail[1:]])


def save_single_file(pipe: StableDiffusionPipeline, path: Path,
                     metadata: dict[str, str] | None = None) -> None:
    """The whole pipeline as one original-layout file: `model.diffusion_model.*` (UNet),
    `first_stage_model.*` (VAE), `cond_stage_model.transformer.text_model.*` (CLIP-L)."""
    out = {"model.diffusion_model." + _unet_key_to_original(k): v
           for k, v in pipe.unet.state_dict().items()}
    for key, value in pipe.vae.state_dict().items():
        original = _vae_key_to_original(key)
        if ".mid.attn_1." in original and original.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention uses 1x1 convolutions
        out["first_stage_model." + original] = value
    for key, value in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    save_file({k: v.detach().contiguous().clone() for k, v in out.items()}, str(path),
              metadata=metadata)


# --- a kohya LoRA -------------------------------------------------------------------------------


def write_kohya_lora(pipe: StableDiffusionPipeline, path: Path, seed: int, rank: int = 4,
                     scale: float = 2.0) -> int:
    """A kohya-format SD 1.x LoRA (as sd-scripts writes them: `lora_unet_` + the diffusers
    UNet module path, `lora_te_` + the CLIP module path, "." as "_") on every attention
    projection of the UNet and the text encoder; returns how many modules it patches."""
    generator = torch.Generator().manual_seed(seed)
    targets = [("lora_unet_", name, module) for name, module in pipe.unet.named_modules()
               if ".attn" in name and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    targets += [("lora_te_", "text_model." + name.removeprefix("text_model."), module)
                for name, module in pipe.text_encoder.named_modules()
                if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    tensors = {}
    for prefix, name, module in targets:
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = scale * torch.randn(
            rank, module.in_features, generator=generator) / module.in_features ** 0.5
        tensors[f"{key}.lora_up.weight"] = scale * torch.randn(
            module.out_features, rank, generator=generator) / rank ** 0.5
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata={"ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
                                            "ss_network_module": "networks.lora"})
    return len(targets)
