"""Tiny pipelines split the way ComfyUI users keep them, for tests and demos.

From any tiny diffusers pipeline (families/*_tiny.py) this writes:

* a config folder without weights: model_index.json, each component's config.json, the
  tokenizers and the scheduler (what a diffusers download holds minus the .safetensors);
* text encoder files as ComfyUI has them (`clip_l.safetensors`: transformers' CLIP names under
  `text_model.`, plus the projection some saves carry; `t5xxl_fp16.safetensors` /
  `umt5_xxl_fp16.safetensors` / Klein's `qwen_3_4b.safetensors`: transformers' names, without
  the tied copies: T5's embedding copy, Qwen3-4B's LM head);
* VAE files in the original layouts: the LDM layout of Flux's `ae.safetensors` and the Wan 2.1
  layout of `wan_2.1_vae.safetensors`;
* the Flux 2 VAE (Klein) in the two layouts that matter to lorafarm: diffusers' own, which it
  loads, and the original one of `flux2-vae.safetensors` (the LDM names plus the latent
  batch-norm statistics), which diffusers 0.42 has no loader for and lorafarm refuses.

diffusers converts the original VAE layouts on load but has no writer for them; the writers
here are the inverses of its converters, and check themselves against them on every write
(the Flux 2 one excepted: there is no converter to check it against).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from families.shared.components import tied_weight_names

__all__ = [
    "save_config_folder",
    "save_diffusers_model_file",
    "save_flux2_vae_original_file",
    "save_flux_ae_file",
    "save_text_encoder_file",
    "save_wan_vae_file",
    "tiny_wan21_vae",
]


def save_config_folder(pipe: Any, folder: Path) -> Path:
    """The pipeline's folder without any weights: configs, tokenizers and scheduler."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)  # model_index.json
    for name, component in pipe.components.items():
        if component is None:
            continue
        target = folder / name
        if hasattr(component, "save_vocabulary") or name.startswith("scheduler"):
            component.save_pretrained(target)  # tokenizers and schedulers carry no weights
        elif hasattr(component.config, "save_pretrained"):
            component.config.save_pretrained(target)  # transformers models
        else:
            component.save_config(target)  # diffusers models
    return folder


def _write(tensors: dict[str, Tensor], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views and shared storage: give every tensor its own memory.
    save_file({key: value.detach().contiguous().clone() for key, value in tensors.items()},
              str(path))
    return path


def save_text_encoder_file(model: torch.nn.Module, path: Path, *, prefix: str = "",
                           projection: bool = False, dtype: torch.dtype | None = None) -> Path:
    """A transformers text encoder as one file, as ComfyUI users have them.

    `prefix`: "text_model." writes CLIP the way clip_l.safetensors names it (transformers >=
    5.6 dropped that level from CLIPTextModel). `projection` adds a `text_projection.weight`, as
    some CLIP-L saves carry (the text model alone never uses it). Tied copies (T5's
    `encoder.embed_tokens.weight`, Qwen3-4B's `lm_head.weight`) are left out, as the released
    files leave them out.
    """
    tied = tied_weight_names(model)
    tensors = {prefix + key: value for key, value in model.state_dict().items()
               if key not in tied}
    if projection:
        width = int(model.config.hidden_size)
        tensors["text_projection.weight"] = torch.eye(width)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return _write(tensors, path)


def _ldm_vae_tensors(state: dict[str, Tensor], levels: int) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL-style state dict under the original LDM names."""
    from families.sdxl.tiny import _vae_key_to_original

    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        original = _vae_key_to_original(key, levels)
        if ".mid.attn_1." in original and original.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention is 1x1 convolutions
        tensors[original] = value
    return tensors


def save_flux_ae_file(vae: torch.nn.Module, path: Path) -> Path:
    """A diffusers AutoencoderKL in the original LDM layout, as Black Forest Labs ships Flux's
    `ae.safetensors` (no prefix, no quant convs, 1x1-conv attention weights)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = vae.state_dict()
    tensors = _ldm_vae_tensors(state, len(vae.config.block_out_channels))
    _check_inverse(convert_ldm_vae_checkpoint(dict(tensors), dict(vae.config)), state)
    return _write(tensors, path)


def save_diffusers_model_file(model: torch.nn.Module, path: Path) -> Path:
    """A diffusers model's state dict as it is, one file (the Flux 2 VAE in the only layout
    lorafarm takes it from as a file of its own)."""
    return _write(dict(model.state_dict()), path)


def save_flux2_vae_original_file(vae: torch.nn.Module, path: Path) -> Path:
    """A diffusers AutoencoderKLFlux2 under original names, as `flux2-vae.safetensors`
    holds it: the LDM names of Flux.1's `ae.safetensors` for the autoencoder, and the latent
    batch-norm statistics as `bn.*`. For refusal tests: diffusers 0.42 has no converter to
    check this layout against, nor one that would load it."""
    state = vae.state_dict()
    statistics = {key: value for key, value in state.items() if key.startswith("bn.")}
    rest = {key: value for key, value in state.items() if key not in statistics}
    return _write({**_ldm_vae_tensors(rest, len(vae.config.block_out_channels)), **statistics},
                  path)


def tiny_wan21_vae(seed: int = 0) -> torch.nn.Module:
    """A tiny Wan 2.1 VAE (the A14B releases' VAE) with the real one's layout: four levels in
    the proportions (1, 2, 4, 4) and two residual blocks per level. diffusers' converter of the
    original layout counts blocks by those numbers, so a file of any other layout (the
    smaller tiny VAE in families/wan22/tiny.py) would not convert."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               temperal_downsample=[False, True, True])
        with torch.no_grad():  # RMS-norm scales start equal; give them distinct values
            for name, param in vae.named_parameters():
                if name.endswith("gamma"):
                    param.add_(0.05 * torch.randn(param.shape))
    return vae.eval().requires_grad_(False)


_WAN_RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2",
                 "norm2.gamma": "residual.3.gamma", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}
_WAN_TOP = {"encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1",
            "encoder.norm_out.gamma": "encoder.head.0.gamma", "encoder.conv_out": "encoder.head.2",
            "decoder.norm_out.gamma": "decoder.head.0.gamma", "decoder.conv_out": "decoder.head.2",
            "quant_conv": "conv1", "post_quant_conv": "conv2"}


def _wan_residual(rest: str) -> str:
    for new, old in _WAN_RESIDUAL.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest  # resample.1.*, time_conv.*: the same names in both layouts


def _wan_vae_key_to_original(key: str, resnets_per_level: int) -> str:
    """A diffusers AutoencoderKLWan key under the Wan 2.1 release's name."""
    for new, old in _WAN_TOP.items():
        if key == new or key.startswith(new + "."):
            return old + key[len(new):]
    coder, _, rest = key.partition(".")
    if match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", rest):
        kind, index, tail = match.groups()
        slot = 1 if kind == "attentions" else 2 * int(index)  # resnet, attention, resnet
        return f"{coder}.middle.{slot}.{tail if kind == 'attentions' else _wan_residual(tail)}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{coder}.downsamples.{match.group(1)}.{_wan_residual(match.group(2))}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level, index, tail = (int(match.group(1)), int(match.group(2)), match.group(3))
        return (f"{coder}.upsamples.{level * (resnets_per_level + 1) + index}."
                f"{_wan_residual(tail)}")
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        level, tail = int(match.group(1)), match.group(2)
        return f"{coder}.upsamples.{level * (resnets_per_level + 1) + resnets_per_level}.{tail}"
    raise KeyError(f"no Wan 2.1 VAE name for diffusers key {key!r}")


def save_wan_vae_file(vae: torch.nn.Module, path: Path) -> Path:
    """A diffusers AutoencoderKLWan (Wan 2.1 layout) under the release's own names, as
    `wan_2.1_vae.safetensors` has them."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = vae.state_dict()
    resnets = int(vae.config.num_res_blocks) + 1
    tensors = {_wan_vae_key_to_original(key, resnets): value for key, value in state.items()}
    _check_inverse(convert_wan_vae_to_diffusers(dict(tensors)), state)
    return _write(tensors, path)


def _check_inverse(converted: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    """What diffusers makes of a written file must be the model's own state dict."""
    if set(converted) != set(state):
        raise ValueError(f"the written layout does not convert back: "
                         f"{sorted(set(converted) ^ set(state))[:5]}")
    for key, value in state.items():
        if tuple(converted[key].shape) != tuple(value.shape) or not torch.equal(
                converted[key].reshape(value.shape), value):
            raise ValueError(f"{key} does not convert back to the same tensor")
