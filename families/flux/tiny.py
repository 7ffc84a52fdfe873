"""Tiny, random-weight but structurally real Flux.1 checkpoints (dev and schnell), built offline.

No model hub is reachable here or in CI, so Flux demos and tests run on these. They keep Flux.1's
*structure* (double-stream then single-stream blocks, in_channels 64 = 16 latent channels packed
2x2, CLIP-L pooled text + T5 sequence text, a 16-channel VAE with scale factor 8, RMS q/k norms,
guidance embedding on dev only) and shrink only widths and depths.

On-disk forms, all loaded back through the real loading paths:

* a diffusers folder (`save_pretrained`), which is also what a BFL single file needs as its
  "base" (text encoders, VAE, tokenizers, scheduler and the transformer's config);
* the transformer alone as one `.safetensors` file in Black Forest Labs' original layout
  (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...), written by
  `families.flux.bfl.diffusers_to_bfl`;
* the same transformer quantized: a GGUF file (Q8_0 or Q4_0, as city96's converter writes
  them) or an FP8 safetensors file (float8_e4m3fn weights). The tiny width (32) and MLP
  (128) are multiples of GGUF's 32-wide blocks, so every block linear is quantized; the
  embeddings the converter keeps precise stay F32 either way.

Tiny LoRA files in the layouts users bring for Flux.1 are written here too (see
`make_tiny_flux_lora` and `write_lora`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from torch import Tensor
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from families.flux.bfl import ModuleGroup, diffusers_to_bfl, module_groups, split_sizes
from families.flux.settings import SCHEDULER_SETTINGS
from families.shared.quantized_tiny import write_fp8_safetensors, write_gguf

__all__ = [
    "CLIP_HIDDEN",
    "DEFAULT_LORA_MODULES",
    "LORA_LAYOUTS",
    "NUM_DOUBLE_BLOCKS",
    "NUM_SINGLE_BLOCKS",
    "T5_HIDDEN",
    "TRANSFORMER_WIDTH",
    "TinyFluxLora",
    "Variant",
    "build_tiny_flux_pipeline",
    "build_tiny_flux_transformer",
    "make_tiny_flux_lora",
    "save_tiny_flux_folder",
    "save_tiny_flux_transformer_fp8",
    "save_tiny_flux_transformer_gguf",
    "save_tiny_flux_transformer_single_file",
    "write_lora",
]

Variant = Literal["dev", "schnell"]

# --- tiny sizes -----------------------------------------------------------------------------
# Three different widths (transformer 32, CLIP 24, T5 40): a component wired to the wrong
# encoder fails with a shape error instead of running by accident.
TRANSFORMER_HEADS = 2  # real: 24
TRANSFORMER_HEAD_DIM = 16  # real: 128
TRANSFORMER_WIDTH = TRANSFORMER_HEADS * TRANSFORMER_HEAD_DIM  # real: 3072
# Rotary axes (index, height, width) must add up to the head size; real: (16, 56, 56).
ROPE_AXES = (4, 6, 6)
NUM_DOUBLE_BLOCKS = 1  # real: 19
NUM_SINGLE_BLOCKS = 2  # real: 38
CLIP_HIDDEN = 24  # CLIP-L stand-in (real 768); the pooled output feeds `vector_in`
CLIP_LAYERS = 2
CLIP_MAX_TOKENS = 77
T5_HIDDEN = 40  # T5-XXL stand-in (real 4096); the sequence feeds `txt_in`
T5_LAYERS = 2
T5_MAX_TOKENS = 512  # the tokenizer's limit; the pipeline pads to max_sequence_length
LATENT_CHANNELS = 16  # as Flux's VAE; in_channels 64 = 16 x (2 x 2 packing)
VAE_WIDTHS = (8, 16, 32, 32)  # real: (128, 256, 512, 512); 4 levels = scale factor 8
VAE_NORM_GROUPS = 4
FLUX_VAE_SCALING_FACTOR = 0.3611  # Flux's ae.safetensors statistics, as in its vae config
FLUX_VAE_SHIFT_FACTOR = 0.1159

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


# --- tokenizers -----------------------------------------------------------------------------


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every word spelled out in byte-level characters.

    Built by hand because BPE training in `tokenizers` is not deterministic across processes.
    The 256 byte-level characters are sorted by code point (the order does not matter to a
    random model, determinism does), then each again with `</w>` (end of word), then BOS and EOS
    as the two highest ids: CLIP pools the hidden state at the EOS position.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [f"{char}</w>" for char in alphabet] + [CLIP_BOS, CLIP_EOS]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[],
                         bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS,
                         pad_token=CLIP_EOS, model_max_length=CLIP_MAX_TOKENS)


def _tiny_t5_vocab() -> list[tuple[str, float]]:
    """A hand-made Unigram vocabulary in T5's order: <pad>, </s>, <unk>, then pieces.

    Word-initial pieces (`▁a`) score above bare characters so that the segmentation is the
    usual SentencePiece shape; characters outside the list become <unk>.
    """
    characters = ("abcdefghijklmnopqrstuvwxyz" "ABCDEFGHIJKLMNOPQRSTUVWXYZ" "0123456789"
                  ".,;:!?'\"-()[]/&%+*=<>_#@")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{char}", -3.0) for char in characters]
    vocab += [(char, -4.0) for char in characters]
    return vocab


def _tiny_t5_tokenizer() -> T5TokenizerFast:
    # No sentinel <extra_id_N> tokens: only span-corruption pre-training uses them.
    return T5TokenizerFast(vocab=_tiny_t5_vocab(), extra_ids=0, model_max_length=T5_MAX_TOKENS)


# --- models ---------------------------------------------------------------------------------


def _tiny_transformer(variant: Variant) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=NUM_DOUBLE_BLOCKS,
        num_single_layers=NUM_SINGLE_BLOCKS,
        attention_head_dim=TRANSFORMER_HEAD_DIM,
        num_attention_heads=TRANSFORMER_HEADS,
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=variant == "dev",
        axes_dims_rope=ROPE_AXES,
    )


def _tiny_clip(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=4 * CLIP_HIDDEN,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_TOKENS,
        hidden_act="quick_gelu",  # CLIP-L's activation
        # The defaults (49406/49407) are ids of the real vocabulary; the pooled output is taken
        # at the first EOS id, so it must be this vocabulary's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def _tiny_t5(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_HIDDEN,
        d_kv=8,
        d_ff=2 * T5_HIDDEN,
        num_layers=T5_LAYERS,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as Flux's T5-XXL encoder
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_WIDTHS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_WIDTHS),
        block_out_channels=VAE_WIDTHS,
        layers_per_block=2,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=VAE_NORM_GROUPS,
        sample_size=64,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,  # Flux's VAE has no quant convs
        use_post_quant_conv=False,
        force_upcast=True,
    )


def _perturb_constant_parameters(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every constant-initialised tensor (norm scales of 1, zero biases) some noise.

    Two equal tensors would let a layout converter that swaps them (query_norm for key_norm,
    shift for scale) pass an exact round trip; distinct tensors make such a bug visible.
    """
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            flat = param.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _seeded(build: Callable[[], torch.nn.Module], seed: int, offset: int) -> torch.nn.Module:
    """Build one component from its own seed (call inside `torch.random.fork_rng`)."""
    torch.manual_seed(seed * 1000 + offset)
    model = build()
    _perturb_constant_parameters(model, torch.Generator().manual_seed(seed * 1000 + 100 + offset))
    return model.eval().requires_grad_(False)


def build_tiny_flux_pipeline(variant: Variant = "dev", seed: int = 0) -> FluxPipeline:
    """The tiny Flux.1 pipeline; the same (variant, seed) gives bit-identical weights.

    The caller's global torch RNG is left untouched, and each component draws from its own
    seed, so resizing one component never changes another's weights.
    """
    tokenizer = _tiny_clip_tokenizer()
    tokenizer_2 = _tiny_t5_tokenizer()
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "transformer": lambda: _tiny_transformer(variant),  # offset 0, see below
        "vae": _tiny_vae,
        "text_encoder": lambda: _tiny_clip(tokenizer),
        "text_encoder_2": lambda: _tiny_t5(tokenizer_2),
    }
    with torch.random.fork_rng(devices=[]):
        models = {name: _seeded(build, seed, offset)
                  for offset, (name, build) in enumerate(builders.items())}
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_SETTINGS[variant]),
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tokenizer,
        text_encoder_2=models["text_encoder_2"],
        tokenizer_2=tokenizer_2,
        transformer=models["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux_transformer(variant: Variant = "dev", seed: int = 0) -> FluxTransformer2DModel:
    """The transformer of `build_tiny_flux_pipeline(variant, seed)` alone, bit-identical to it
    and built without the other components (a single-file demo needs nothing else)."""
    with torch.random.fork_rng(devices=[]):
        model = _seeded(lambda: _tiny_transformer(variant), seed, offset=0)
    assert isinstance(model, FluxTransformer2DModel)
    return model


# --- writers --------------------------------------------------------------------------------


def save_tiny_flux_folder(pipe: FluxPipeline, folder: Path) -> None:
    """Write a regular diffusers folder (model_index.json, one subfolder per component)."""
    pipe.save_pretrained(folder, safe_serialization=True)


def save_tiny_flux_transformer_single_file(
    transformer: FluxTransformer2DModel, path: Path, *, prefix: str = "",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the transformer alone in BFL's layout, as `flux1-dev.safetensors` is shipped.

    `prefix="model.diffusion_model."` writes the key names ComfyUI / Forge full checkpoints
    use. `metadata` goes into the safetensors header (string values only).
    """
    config = transformer.config
    bfl = diffusers_to_bfl(transformer.state_dict(), config.num_layers, config.num_single_layers,
                           bool(config.guidance_embeds))
    save_file({prefix + key: value for key, value in bfl.items()}, str(path),
              metadata=dict(metadata or {}))


# Tensors city96's Flux converter keeps in F32 whatever the quantization: the input and
# output projections and the time / guidance / pooled-text embedders.
GGUF_KEEP_PRECISE = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
                     "final_layer.")


def _bfl_state(transformer: FluxTransformer2DModel) -> dict[str, Tensor]:
    config = transformer.config
    return diffusers_to_bfl(transformer.state_dict(), config.num_layers, config.num_single_layers,
                            bool(config.guidance_embeds))


def save_tiny_flux_transformer_gguf(transformer: FluxTransformer2DModel, path: Path,
                                    quantization: str = "Q8_0") -> Path:
    """Write the transformer as a GGUF file in BFL's layout, as `flux1-dev-Q8_0.gguf`."""
    return write_gguf(_bfl_state(transformer), path, architecture="flux",
                      quantization=quantization, keep_precise=GGUF_KEEP_PRECISE)


def save_tiny_flux_transformer_fp8(transformer: FluxTransformer2DModel, path: Path) -> Path:
    """Write the transformer in BFL's layout with float8_e4m3fn weights (norm scales in
    bfloat16), as the fp8 Flux files ComfyUI users share."""
    return write_fp8_safetensors(_bfl_state(transformer), path,
                                 metadata={"modelspec.architecture": "flux-1-dev"})


# --- LoRA files -----------------------------------------------------------------------------

LORA_LAYOUTS = ("diffusers", "kohya", "xlabs", "original_lora_A", "original_lora_down")

# BFL modules the default tiny LoRA targets: every Linear of the double block and of each
# single block except `linear1`. diffusers' kohya converter splits `single_blocks.N.linear1`
# with sizes hard-coded for the real model (3072, 3072, 3072, 12288), so a tiny kohya file with
# it cannot load; real ones load fine.
DEFAULT_LORA_MODULES = tuple(
    [f"double_blocks.0.{name}" for name in (
        "img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj",
        "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")]
    + [f"single_blocks.{i}.{name}" for i in range(NUM_SINGLE_BLOCKS)
       for name in ("modulation.lin", "linear2")]
)
# XLabs' trainer patches only the double blocks' attention: q/k/v (`qkv_lora1` image stream,
# `qkv_lora2` text stream) and the output projections (`proj_lora1` / `proj_lora2`).
XLABS_MODULES = {
    "img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2",
    "img_attn.proj": "proj_lora1", "txt_attn.proj": "proj_lora2",
}
# CLIP-L modules (paths as transformers 5 names them: no `text_model.` level). All four
# attention projections, as sd-scripts trains them: diffusers 0.42 recognises kohya's CLIP
# attention names only when `out_proj` is among them (it looks for "to_out_lora" to pick the
# conversion) and otherwise drops q/k/v silently; see the tests.
DEFAULT_TEXT_ENCODER_MODULES = ("encoder.layers.0.self_attn.q_proj",
                                "encoder.layers.0.self_attn.k_proj",
                                "encoder.layers.0.self_attn.v_proj",
                                "encoder.layers.0.self_attn.out_proj",
                                "encoder.layers.1.mlp.fc1")

LoraWeights = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True, eq=False)  # eq=False: comparing dicts of tensors has no single truth
class TinyFluxLora:
    """A Flux.1 LoRA's content, independent of the file layout.

    `transformer` keys are BFL module names (`double_blocks.0.img_attn.qkv`): a fused module
    has ONE down matrix shared by q, k and v and an up matrix with their outputs stacked, which
    is what kohya and XLabs files hold; the diffusers layout writes the same numbers as three
    LoRAs with equal down matrices, so every layout patches the same weights by the same
    amount. `text_encoder` keys are CLIP-L module paths. Values are (down [rank, in],
    up [out, rank]); a module's weight changes by (alpha / rank) * up @ down.
    """

    transformer: LoraWeights
    text_encoder: LoraWeights
    rank: int
    alpha: float

    def groups(self) -> list[ModuleGroup]:
        by_bfl = {g.bfl: g for g in module_groups(NUM_DOUBLE_BLOCKS, NUM_SINGLE_BLOCKS, True)}
        return [by_bfl[name] for name in self.transformer]

    def expected_patches(self, layout: str) -> dict[str, int]:
        """Modules per pipeline component that a load of this layout must patch."""
        counts = {"transformer": sum(len(g.diffusers) for g in self.groups())}
        if self.text_encoder and layout in ("diffusers", "kohya"):
            counts["text_encoder"] = len(self.text_encoder)
        return counts


def make_tiny_flux_lora(pipe: FluxPipeline, seed: int = 0, *, rank: int = 4, alpha: float = 2.0,
                        modules: tuple[str, ...] = DEFAULT_LORA_MODULES,
                        text_encoder_modules: tuple[str, ...] = DEFAULT_TEXT_ENCODER_MODULES,
                        scale: float = 0.5) -> TinyFluxLora:
    """Random LoRA content for the tiny Flux pipeline's modules, from a seed.

    `scale` sets the size of the up matrices: large enough that the change shows in an 8-bit
    image of a 2-step render. rank 4 is not a multiple of 3 on purpose: diffusers' kohya
    converter then never takes its "block-sparse qkv" branch, which needs hand-made weights.
    """
    generator = torch.Generator().manual_seed(seed)
    transformer_modules = dict(pipe.transformer.named_modules())
    by_bfl = {g.bfl: g for g in module_groups(NUM_DOUBLE_BLOCKS, NUM_SINGLE_BLOCKS, True)}

    def draw(fan_in: int, fan_out: int) -> tuple[Tensor, Tensor]:
        down = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
        up = scale * torch.randn(fan_out, rank, generator=generator)
        return down, up

    transformer: LoraWeights = {}
    for name in modules:
        parts = [transformer_modules[d] for d in by_bfl[name].diffusers]
        transformer[name] = draw(parts[0].in_features, sum(p.out_features for p in parts))
    te_modules = dict(pipe.text_encoder.named_modules())
    text_encoder = {name: draw(te_modules[name].in_features, te_modules[name].out_features)
                    for name in text_encoder_modules}
    return TinyFluxLora(transformer=transformer, text_encoder=text_encoder, rank=rank,
                        alpha=alpha)


def _split_up(group: ModuleGroup, down: Tensor, up: Tensor) -> list[Tensor]:
    """A fused module's up matrix, split like its weight: a single block's linear1 is q, k, v
    (width rows each) and the MLP input (the rest)."""
    return list(up.split(split_sizes(group, (up.shape[0], down.shape[1])), dim=0))


def _write_diffusers(lora: TinyFluxLora, path: Path) -> None:
    """Through diffusers' own `save_lora_weights`: alpha travels in its `lora_adapter_metadata`
    header entry (r, lora_alpha, target_modules per component)."""
    layers: dict[str, dict[str, Tensor]] = {"transformer": {}, "text_encoder": {}}
    for group in lora.groups():
        down, up = lora.transformer[group.bfl]
        for name, part in zip(group.diffusers, _split_up(group, down, up), strict=True):
            layers["transformer"][f"{name}.lora_A.weight"] = down.clone()
            layers["transformer"][f"{name}.lora_B.weight"] = part.contiguous()
    for name, (down, up) in lora.text_encoder.items():
        # Written as trainers on transformers 4 write CLIP (`text_model.` level); diffusers
        # drops that level when the loaded CLIP has none.
        layers["text_encoder"][f"text_model.{name}.lora_A.weight"] = down.clone()
        layers["text_encoder"][f"text_model.{name}.lora_B.weight"] = up.clone()

    def config(targets: list[str]) -> dict[str, object] | None:
        # target_modules are the model's own paths: PEFT matches them as dotted suffixes.
        return {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": targets} \
            if targets else None

    FluxPipeline.save_lora_weights(
        save_directory=str(path.parent),
        weight_name=path.name,
        transformer_lora_layers=layers["transformer"] or None,
        text_encoder_lora_layers=layers["text_encoder"] or None,
        transformer_lora_adapter_metadata=config(
            sorted(d for g in lora.groups() for d in g.diffusers)),
        text_encoder_lora_adapter_metadata=config(sorted(lora.text_encoder)),
    )


def _kohya_tensors(lora: TinyFluxLora, prefix: str, te_prefix: str | None,
                   down_name: str, up_name: str) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    alpha = torch.tensor(float(lora.alpha))

    def put(name: str, down: Tensor, up: Tensor) -> None:
        tensors[f"{name}.{down_name}.weight"] = down.clone()
        tensors[f"{name}.{up_name}.weight"] = up.clone()
        tensors[f"{name}.alpha"] = alpha.clone()

    for name, (down, up) in lora.transformer.items():
        put(prefix + (name.replace(".", "_") if prefix == "lora_unet_" else name), down, up)
    if te_prefix is not None:
        for name, (down, up) in lora.text_encoder.items():
            put(te_prefix + "text_model_" + name.replace(".", "_"), down, up)
    return tensors


_KOHYA_FLUX_METADATA = {
    "ss_network_module": "networks.lora_flux",
    "ss_base_model_version": "flux1",
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "flux-1-dev/lora",
    "modelspec.implementation": "https://github.com/black-forest-labs/flux",
}


def write_lora(lora: TinyFluxLora, path: Path, layout: str,
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write `lora` in one of `LORA_LAYOUTS`:

    * `diffusers`: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` / `lora_B`
      (ai-toolkit's and diffusers' own), CLIP as `text_encoder.text_model.*`; alpha in the
      `lora_adapter_metadata` header entry, as `save_lora_weights` writes it.
    * `kohya`: sd-scripts' `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
      `.lora_up.weight`, `.alpha`; CLIP as `lora_te1_text_model_encoder_layers_0_...`.
    * `xlabs`: `double_blocks.0.processor.qkv_lora1.down.weight` / `.up.weight` (no alpha:
      XLabs applies its LoRAs unscaled, so alpha = rank is the only faithful content).
    * `original_lora_A` / `original_lora_down`: BFL module names under `diffusion_model.`
      (ComfyUI / ai-toolkit "comfy" saves), PEFT- or kohya-style suffixes, with `.alpha`.

    CLIP-L parts are written in the `diffusers` and `kohya` layouts only (XLabs and the
    original-name saves carry none). `metadata` goes into the header (not for `diffusers`,
    whose header diffusers writes).
    """
    path = Path(path)
    header = dict(metadata or {})
    if layout == "diffusers":
        if header:
            raise ValueError("the diffusers layout is written by diffusers, without extra "
                             "metadata")
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_diffusers(lora, path)
        return path
    if layout == "kohya":
        if any(name.endswith(".linear1") for name in lora.transformer):
            raise ValueError("diffusers' kohya converter hard-codes the real single_blocks "
                             "linear1 split (3072 x 3 + 12288); leave linear1 out of tiny LoRAs")
        tensors = _kohya_tensors(lora, "lora_unet_", "lora_te1_", "lora_down", "lora_up")
        header = {**_KOHYA_FLUX_METADATA, "ss_network_dim": str(lora.rank),
                  "ss_network_alpha": f"{lora.alpha:g}", **header}
    elif layout == "xlabs":
        if lora.alpha != lora.rank:
            raise ValueError("XLabs files carry no alpha: make the LoRA with alpha = rank")
        tensors = {}
        for name, (down, up) in lora.transformer.items():
            block, _, module = name.partition(".")[2].partition(".")
            if not name.startswith("double_blocks.") or module not in XLABS_MODULES:
                raise ValueError(f"XLabs LoRAs patch double-block attention only, not {name}")
            key = f"double_blocks.{block}.processor.{XLABS_MODULES[module]}"
            tensors[f"{key}.down.weight"] = down.clone()
            tensors[f"{key}.up.weight"] = up.clone()
    elif layout in ("original_lora_A", "original_lora_down"):
        names = ("lora_A", "lora_B") if layout == "original_lora_A" else ("lora_down", "lora_up")
        tensors = _kohya_tensors(lora, "diffusion_model.", None, *names)
    else:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LORA_LAYOUTS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temp), metadata=header)
    temp.replace(path)
    return path
