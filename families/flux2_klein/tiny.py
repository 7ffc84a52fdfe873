"""Tiny, random-weight but structurally real FLUX.2 [klein] checkpoints and LoRAs, built
offline from a seed.

No model hub is reachable here or in CI, so Klein demos and tests run on these. They keep
Klein's real *layout* and shrink only widths and depths:

* a Qwen3 causal LM text encoder with 28 layers (the pipeline stacks the hidden states of
  layers 9, 18 and 27, so fewer layers cannot work) at width 16;
* a Flux 2 transformer (double-stream and single-stream blocks, shared modulation, fused
  single-block QKV+MLP projection, SwiGLU MLP ratio 3) whose context width is three times the
  text width, as Klein's is (7680 = 3 x 2560 for 4B);
* the Flux 2 VAE with four levels (scale factor 8; with the 2x2 latent patches, image sides
  are multiples of 16, as for the real model) and its latent batch-norm statistics;
* Klein's flow-matching Euler scheduler config (dynamic shifting);
* a byte-level BPE `Qwen2TokenizerFast` built in memory with Qwen's chat markers and a chat
  template that honours `enable_thinking=False`, which the pipeline passes.

The distilled and base variants differ, in diffusers, only by `is_distilled` in
model_index.json (the pipeline config): with it set, the pipeline never runs classifier-free
guidance. The transformers have the same architecture.

On-disk forms, each loaded back through diffusers' real loading path:

* a diffusers folder (`save_pretrained`);
* a transformer-only single file, as BFL and ComfyUI distribute Klein, with BFL's original
  key names (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...) or diffusers'
  names, optionally under ComfyUI's `model.diffusion_model.` prefix.

And LoRA files for the tiny transformer in the layouts diffusers' Flux 2 loader accepts:
diffusers (`transformer.*`), raw PEFT (`base_model.model.*`), ai-toolkit / BFL original
names (`diffusion_model.*`) and kohya (`lora_unet_*`). All writers describe one and the same
low-rank update, so every layout must give the same image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from torch import Tensor
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

from families.shared.tiny_files import save_safetensors_atomically as _save_atomically

__all__ = [
    "TEXT_HIDDEN",
    "TRANSFORMER_WIDTH",
    "TinyKleinLora",
    "build_tiny_klein_pipeline",
    "diffusers_transformer_to_original",
    "make_tiny_klein_lora",
    "patched_module_count",
    "save_tiny_klein_folder",
    "save_tiny_klein_transformer_file",
    "tiny_qwen_tokenizer",
    "write_klein_lora_ai_toolkit",
    "write_klein_lora_diffusers",
    "write_klein_lora_kohya",
    "write_klein_lora_original_down",
    "write_klein_lora_peft",
    "write_real_size_klein_lora",
]

# --- tiny sizes -----------------------------------------------------------------------------
TEXT_HIDDEN = 16  # Qwen3-4B: 2560, Qwen3-8B: 4096
TEXT_LAYERS = 28  # the pipeline reads hidden_states[27]; Qwen3-4B has 36 layers
TEXT_HEADS = 2
TEXT_KV_HEADS = 1  # grouped-query attention, as Qwen3
TEXT_HEAD_DIM = 8  # set explicitly: Qwen3Config's default is 128, whatever the width
TEXT_LAYERS_STACKED = 3  # hidden states of three layers are concatenated per token
MAX_TOKENS = 512  # the pipeline pads every prompt to 512 tokens

TRANSFORMER_HEADS = 3
TRANSFORMER_HEAD_DIM = 8  # real: 128
# Differs from TEXT_HIDDEN on purpose: a swapped dimension cannot go unnoticed.
TRANSFORMER_WIDTH = TRANSFORMER_HEADS * TRANSFORMER_HEAD_DIM  # real: 3072 (4B), 4096 (9B)
ROPE_AXES = (2, 2, 2, 2)  # four position axes (t, h, w, l), summing to the head dim
DOUBLE_BLOCKS = 2  # real: 5 (4B), 8 (9B)
SINGLE_BLOCKS = 2  # real: 20 (4B), 24 (9B)
MLP_RATIO = 3.0  # as Klein; SwiGLU doubles the input projection (6x width)
TIMESTEP_CHANNELS = 16  # real: 256

VAE_WIDTHS = (8, 16, 32, 32)  # real: (128, 256, 512, 512); 4 levels = scale factor 8
LATENT_CHANNELS = 4  # real: 32; the transformer sees 2x2 patches, 4x as many channels
NORM_GROUPS = 4

# Qwen's chat markers; the pipeline wraps every prompt in a user turn and opens the
# assistant turn with an empty thinking block.
PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Written for this project (Jinja, as transformers' apply_chat_template runs it): one turn
# per message, then the assistant turn; `enable_thinking=False` pre-fills an empty thinking
# block, as Qwen3's own template does, so the encoded text matches what the real model sees.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Klein's scheduler_config.json: flow matching with resolution-dependent (dynamic) shift;
# the pipeline computes `mu` per image size and step count and passes it in.
_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Bytes that byte-level BPE shows as themselves; the rest become chr(256 + n). Same order as
# GPT-2 / Qwen, so the first 256 ids are the byte alphabet in the real tokenizers' order.
_PRINTABLE_BYTE_RANGES = ((ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ")))


# --- tokenizer ------------------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    shown_as_self = [b for lo, hi in _PRINTABLE_BYTE_RANGES for b in range(lo, hi + 1)]
    kept = set(shown_as_self)
    remapped = [b for b in range(256) if b not in kept]
    return [chr(b) for b in shown_as_self] + [chr(256 + n) for n in range(len(remapped))]


def tiny_qwen_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE tokenizer with no merges: every byte is one token.

    Built by hand, not trained: `tokenizers`' BPE trainer is not deterministic across
    processes. Specials follow Qwen3: pad `<|endoftext|>`, end of turn `<|im_end|>`.
    """
    tokens = [*_byte_level_alphabet(), PAD_TOKEN, IM_START, IM_END, THINK_OPEN, THINK_CLOSE]
    tokenizer = Qwen2TokenizerFast(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[],
        unk_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, THINK_OPEN, THINK_CLOSE],
        model_max_length=MAX_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --- models ---------------------------------------------------------------------------------


def _tiny_text_encoder(tokenizer: Qwen2TokenizerFast) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=TEXT_HEAD_DIM,
        max_position_embeddings=MAX_TOKENS,
        tie_word_embeddings=True,  # as Qwen3-4B; the LM head is never used here anyway
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3ForCausalLM(config)


def _tiny_transformer() -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # 2x2 latent patches, packed into channels
        num_layers=DOUBLE_BLOCKS,
        num_single_layers=SINGLE_BLOCKS,
        attention_head_dim=TRANSFORMER_HEAD_DIM,
        num_attention_heads=TRANSFORMER_HEADS,
        joint_attention_dim=TEXT_LAYERS_STACKED * TEXT_HIDDEN,
        timestep_guidance_channels=TIMESTEP_CHANNELS,
        mlp_ratio=MLP_RATIO,
        axes_dims_rope=ROPE_AXES,
        guidance_embeds=False,  # Klein (both variants) has no embedded guidance
    )


def _tiny_vae() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        block_out_channels=VAE_WIDTHS,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=NORM_GROUPS,
        sample_size=64,
    )


def _perturb_constants(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Add small noise to every parameter or float buffer that starts as a constant.

    RMSNorm scales start at 1 and the VAE's latent batch-norm statistics at 0 / 1. Left that
    way, tensors that a wrong key mapping swaps (query norm for key norm) would still compare
    equal, and a statistic the loader failed to fill would look right.
    """
    with torch.no_grad():
        named = [*model.named_parameters(), *model.named_buffers()]
        for _, tensor in sorted(named, key=lambda item: item[0]):
            if not tensor.is_floating_point():
                continue
            flat = tensor.reshape(-1)
            if flat.numel() > 0 and bool(torch.all(flat == flat[0])):
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                if flat[0] > 0:  # variances must stay positive
                    tensor.mul_(1.0 + 0.05 * noise.abs())
                else:
                    tensor.add_(0.05 * noise)


def build_tiny_klein_pipeline(seed: int = 0, *, distilled: bool = True) -> Flux2KleinPipeline:
    """Build a tiny Klein pipeline; the same seed (and variant) gives bit-identical weights.

    The caller's global torch RNG is left untouched. Each component has its own seed offset,
    so resizing one component never changes the others' weights.
    """
    tokenizer = tiny_qwen_tokenizer()
    builders = {
        "transformer": _tiny_transformer,
        "vae": _tiny_vae,
        "text_encoder": lambda: _tiny_text_encoder(tokenizer),
    }
    models: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed * 1000 + offset)
            model = build()
            _perturb_constants(model, torch.Generator().manual_seed(seed * 1000 + 100 + offset))
            models[name] = model.eval().requires_grad_(False)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tokenizer,
        transformer=models["transformer"],
        is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_klein_folder(pipe: Flux2KleinPipeline, folder: Path) -> Path:
    """Write a regular diffusers folder (model_index.json, one subfolder per component)."""
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# --- BFL original key layout of the transformer ----------------------------------------------

# diffusers module -> BFL module, outside the blocks.
_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# Inside double block N (diffusers `transformer_blocks.N.` -> BFL `double_blocks.N.`).
_DOUBLE_BLOCK = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
# BFL fuses each stream's q, k, v into one projection; diffusers splits them.
_FUSED_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
# Inside single block N (`single_transformer_blocks.N.` -> `single_blocks.N.`).
_SINGLE_BLOCK = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
_NORM_MODULES = frozenset(
    {"img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
     "txt_attn.norm.key_norm", "norm.query_norm", "norm.key_norm"}
)


def diffusers_module_to_original(module: str) -> str:
    """Map a diffusers Flux 2 transformer module path to BFL's name for it.

    Fused q/k/v projections have no one-to-one name (see `diffusers_transformer_to_original`).

    Raises:
        KeyError: for a module with no single BFL counterpart; a guess would put weights in
            the wrong place without an error.
    """
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    parts = module.split(".")
    head, index, inner = parts[0], parts[1] if len(parts) > 2 else "", ".".join(parts[2:])
    if head == "transformer_blocks" and index.isdigit() and inner in _DOUBLE_BLOCK:
        return f"double_blocks.{index}.{_DOUBLE_BLOCK[inner]}"
    if head == "single_transformer_blocks" and index.isdigit() and inner in _SINGLE_BLOCK:
        return f"single_blocks.{index}.{_SINGLE_BLOCK[inner]}"
    raise KeyError(f"no BFL name for diffusers Flux 2 module {module!r}")


def _swap_halves(weight: Tensor) -> Tensor:
    # BFL's final adaLN projection outputs (shift, scale); diffusers' norm_out (scale, shift).
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_transformer_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers Flux 2 transformer state dict in BFL's original layout (the inverse of
    diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`): fused q/k/v, RMSNorm
    weights named `.scale`, the final adaLN halves swapped."""
    remaining = dict(state_dict)
    out: dict[str, Tensor] = {}
    block_indices = sorted({int(k.split(".")[1]) for k in remaining
                            if k.startswith("transformer_blocks.")})
    for index in block_indices:
        prefix = f"transformer_blocks.{index}."
        for fused, parts in _FUSED_QKV.items():
            keys = [f"{prefix}{part}.weight" for part in parts]
            out[f"double_blocks.{index}.{fused}.weight"] = torch.cat(
                [remaining.pop(key) for key in keys], dim=0)
    for key, tensor in remaining.items():
        module, param = key.rsplit(".", 1)
        original = diffusers_module_to_original(module)
        leaf = original.rsplit(".", 2)
        if param == "weight" and ".".join(leaf[-2:]) in _NORM_MODULES:
            param = "scale"  # BFL's QKNorm keeps its RMSNorm weight as `scale`
        if module == "norm_out.linear":
            tensor = _swap_halves(tensor)
        out[f"{original}.{param}"] = tensor
    return out


def save_tiny_klein_transformer_file(
    pipe: Flux2KleinPipeline,
    path: Path,
    *,
    layout: str = "original",
    prefix: str = "",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the transformer alone as one `.safetensors` file, as Klein is distributed.

    `layout` "original" uses BFL's key names (the official `flux-2-klein-*.safetensors`),
    "diffusers" the diffusers names; `prefix` (e.g. ComfyUI's "model.diffusion_model.") goes
    in front of every key.
    """
    state = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
    if layout == "original":
        state = diffusers_transformer_to_original(state)
    elif layout != "diffusers":
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    tensors = {f"{prefix}{key}": value for key, value in state.items()}
    _save_atomically(tensors, Path(path), dict(metadata or {}))
    return Path(path)


# --- LoRAs ----------------------------------------------------------------------------------

# The BFL modules the tiny LoRA patches: fused q/k/v of both streams, an output projection,
# both MLP halves and both single-block projections: what diffusers converts in every layout.
_TINY_LORA_MODULES = (
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.txt_attn.qkv",
    "double_blocks.1.img_attn.proj",
    "double_blocks.0.img_mlp.0",
    "double_blocks.1.txt_mlp.2",
    "single_blocks.0.linear1",
    "single_blocks.1.linear2",
)
# Outside the blocks, where diffusers 0.42 needs lorafarm's help in some layouts (see
# `families.flux2_klein.flux2_klein.lora_for_diffusers`): the shared modulation (kohya drops
# it), the final adaLN (BFL and diffusers order its halves differently) and the image input.
_TINY_LORA_EXTRA_MODULES = (
    "double_stream_modulation_img.lin",
    "single_stream_modulation.lin",
    "final_layer.adaLN_modulation.1",
    "img_in",
)


@dataclass(frozen=True)
class TinyKleinLora:
    """A low-rank update of the tiny transformer, by BFL module name: (down [r, in],
    up [out, r]). The update of a module is `alpha / rank * up @ down`."""

    modules: dict[str, tuple[Tensor, Tensor]]
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def diffusers_modules(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The same update by diffusers module name; a fused q/k/v becomes three modules that
        share the down matrix and each take a third of the up matrix."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        reverse = _original_to_diffusers_modules()
        for module, (down, up) in self.modules.items():
            block, index, inner = (module.split(".", 2) + ["", ""])[:3]
            if module == "final_layer.adaLN_modulation.1":
                # BFL's (shift, scale) rows are diffusers' (scale, shift).
                out[reverse[module]] = (down, _swap_halves(up))
            elif block == "double_blocks" and inner in _FUSED_QKV:
                for part, up_part in zip(_FUSED_QKV[inner], up.chunk(3, dim=0), strict=True):
                    # Copies: safetensors refuses to save tensors that share memory.
                    out[f"transformer_blocks.{index}.{part}"] = (down.clone(), up_part.clone())
            else:
                out[reverse[module]] = (down, up)
        return out


def _original_to_diffusers_modules() -> dict[str, str]:
    reverse = {original: module for module, original in _TOP_LEVEL.items()}
    for index in range(max(DOUBLE_BLOCKS, SINGLE_BLOCKS)):
        for inner, original in _DOUBLE_BLOCK.items():
            reverse[f"double_blocks.{index}.{original}"] = f"transformer_blocks.{index}.{inner}"
        for inner, original in _SINGLE_BLOCK.items():
            reverse[f"single_blocks.{index}.{original}"] = (
                f"single_transformer_blocks.{index}.{inner}")
    return reverse


def make_tiny_klein_lora(
    transformer: Flux2Transformer2DModel, seed: int = 0, rank: int = 2, alpha: float = 1.0,
    *, extras: bool = False,
) -> TinyKleinLora:
    """A random LoRA for the tiny transformer, at the shapes of its modules; with `extras`
    also the modules outside the blocks (modulation, final adaLN, image input).

    Values are rounded to float16 so that files saved in float16 (as kohya does) hold the
    same numbers; large enough (0.3 std) to change a tiny render visibly.
    """
    original = diffusers_transformer_to_original(transformer.state_dict())
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    names = _TINY_LORA_MODULES + (_TINY_LORA_EXTRA_MODULES if extras else ())
    for module in names:
        out_features, in_features = original[f"{module}.weight"].shape
        down = torch.randn(rank, in_features, generator=generator) * 0.3
        up = torch.randn(out_features, rank, generator=generator) * 0.3
        modules[module] = (down.half().float(), up.half().float())
    return TinyKleinLora(modules=modules, rank=rank, alpha=alpha)


def patched_module_count(lora: TinyKleinLora) -> int:
    """How many transformer modules the LoRA patches once loaded (fused q/k/v count 3)."""
    return len(lora.diffusers_modules())


def write_klein_lora_diffusers(lora: TinyKleinLora, path: Path) -> Path:
    """diffusers' own layout, via `save_lora_weights`: `transformer.<module>.lora_A.weight`,
    with rank and alpha in the header's `lora_adapter_metadata` (as diffusers' trainers
    save them)."""
    modules = lora.diffusers_modules()
    layers: dict[str, Tensor] = {}
    for module, (down, up) in modules.items():
        layers[f"{module}.lora_A.weight"] = down
        layers[f"{module}.lora_B.weight"] = up
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Flux2KleinPipeline.save_lora_weights(
        save_directory=str(path.parent),
        weight_name=path.name,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={
            "r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(modules)},
    )
    return path


def write_klein_lora_peft(lora: TinyKleinLora, path: Path) -> Path:
    """A raw PEFT state dict (`get_peft_model_state_dict` of the transformer):
    `base_model.model.<diffusers module>.lora_A.weight`. No alpha in the file, so the
    scaling is folded into lora_B."""
    tensors: dict[str, Tensor] = {}
    for module, (down, up) in lora.diffusers_modules().items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = down
        tensors[f"base_model.model.{module}.lora_B.weight"] = up * lora.scaling
    _save_atomically(tensors, Path(path), {"format": "pt"})
    return Path(path)


def write_klein_lora_ai_toolkit(lora: TinyKleinLora, path: Path) -> Path:
    """ai-toolkit's Flux 2 layout, BFL module names under `diffusion_model.`:
    `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`. No alpha keys (diffusers'
    converter refuses them in this layout), so the scaling is folded into lora_B."""
    tensors: dict[str, Tensor] = {}
    for module, (down, up) in lora.modules.items():
        tensors[f"diffusion_model.{module}.lora_A.weight"] = down
        tensors[f"diffusion_model.{module}.lora_B.weight"] = up * lora.scaling
    _save_atomically(tensors, Path(path), {"format": "pt"})
    return Path(path)


def write_klein_lora_kohya(
    lora: TinyKleinLora, path: Path, *, dtype: torch.dtype = torch.float16
) -> Path:
    """kohya / sd-scripts / musubi naming: `lora_unet_<BFL module with _>.lora_down.weight`,
    `.lora_up.weight` and `.alpha`, saved in float16 as those trainers do."""
    alpha = torch.tensor(lora.alpha, dtype=dtype)
    if float(alpha) != lora.alpha:
        raise ValueError(f"alpha {lora.alpha} is not exactly representable in {dtype}")
    tensors: dict[str, Tensor] = {}
    for module, (down, up) in lora.modules.items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = alpha.clone()
    header = {"ss_network_dim": str(lora.rank), "ss_network_alpha": str(float(lora.alpha))}
    _save_atomically(tensors, Path(path), header)
    return Path(path)


def write_klein_lora_original_down(
    lora: TinyKleinLora, path: Path, *, dtype: torch.dtype = torch.float32
) -> Path:
    """BFL names under `diffusion_model.` with kohya's suffixes and alpha
    (`diffusion_model.single_blocks.0.linear1.lora_down.weight`, `.lora_up.weight`,
    `.alpha`), the form ComfyUI-side tools save."""
    tensors: dict[str, Tensor] = {}
    for module, (down, up) in lora.modules.items():
        name = f"diffusion_model.{module}"
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)
    _save_atomically(tensors, Path(path), {})
    return Path(path)


# --- header-only files at real Klein sizes (for recognition tests) ---------------------------

# Real widths: (hidden, context) per model; Flux 2's SwiGLU MLP ratio is 3 throughout.
REAL_SIZES = {"klein-4b": (3072, 7680), "klein-9b": (4096, 12288), "dev": (6144, 15360)}


def write_real_size_klein_lora(path: Path, size: str = "klein-4b", layout: str = "kohya") -> Path:
    """A rank-1 float16 Flux 2 LoRA with a few modules at a real model's shapes.

    For header recognition only (it would load into no tiny model): block 0's fused q/k/v and
    MLP input and single block 0's fused projection, in kohya naming or (q/k/v split) in
    diffusers naming. About 100-300 KB.
    """
    hidden, _ = REAL_SIZES[size]
    shapes = {  # BFL module -> (in, out)
        "double_blocks.0.img_attn.qkv": (hidden, 3 * hidden),
        "double_blocks.0.img_mlp.0": (hidden, 6 * hidden),
        "single_blocks.0.linear1": (hidden, 9 * hidden),
    }
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, Tensor] = {}
    reverse = _original_to_diffusers_modules()
    for module, (fan_in, fan_out) in shapes.items():
        down = torch.randn(1, fan_in, generator=generator).half()
        up = torch.randn(fan_out, 1, generator=generator).half()
        if layout == "kohya":
            name = "lora_unet_" + module.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(1.0, dtype=torch.float16)})
        elif layout == "diffusers":
            if module.endswith("qkv"):
                targets = [(f"transformer_blocks.0.{p}", u) for p, u in
                           zip(_FUSED_QKV["img_attn.qkv"], up.chunk(3), strict=True)]
            else:
                targets = [(reverse[module], up)]
            for target, up_part in targets:
                tensors[f"transformer.{target}.lora_A.weight"] = down.clone()
                tensors[f"transformer.{target}.lora_B.weight"] = up_part.clone()
        else:
            raise ValueError(f"layout must be 'kohya' or 'diffusers', got {layout!r}")
    _save_atomically(tensors, Path(path), {"format": "pt"})
    return Path(path)


# --- shared helpers --------------------------------------------------------------------------
