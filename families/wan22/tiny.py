"""Tiny, random-weight but structurally real Wan 2.2 checkpoints and LoRAs, built offline
from a seed.

No model hub is reachable here or in CI, so Wan 2.2 demos and tests run on these. They keep
the real *layout* of each Wan 2.2 release and shrink only widths and depths:

* A14B text-to-video: `WanPipeline` with two experts (`transformer` = high noise,
  `transformer_2` = low noise) switched at `boundary_ratio` 0.875, the Wan 2.1 VAE (16 latent
  channels, 8x spatial / 4x temporal compression);
* A14B image-to-video: `WanImageToVideoPipeline`, the same two experts with 36 input channels
  (16 noise + 4 first-frame mask + 16 image latents), boundary 0.9, and no CLIP image encoder
  or processor: Wan 2.2 conditions on the image latents alone (only Wan 2.1 I2V has one);
* TI2V-5B: `WanPipeline` with one transformer, `expand_timesteps=True` (a per-token timestep,
  which is how it conditions on a first frame) and the Wan 2.2 VAE (48 latent channels,
  residual blocks, 2x2 pixel patches: 16x spatial compression).

A T2V-A14B built with `head_dim=16` (32 wide) is what the quantized demo checkpoints are made
of: its experts written as GGUF files (Q8_0, Q4_0) in the original key layout, as city96's and
QuantStack's Wan 2.2 GGUF files are.

All three share a tiny UMT5 encoder with a hand-built Unigram tokenizer (`T5Tokenizer`, the
class the real checkpoints name), and Wan's flow UniPC scheduler. The A14B experts and the
5B transformer have different tiny widths, so a tiny 14B LoRA can no more load into the tiny
5B than a real one can.

LoRA writers cover the layouts Wan LoRAs come in: diffusers, raw PEFT, the original module
names under `diffusion_model.` (lightx2v, diffusion-pipe: lora_A/lora_B; ComfyUI and kohya
style: lora_down/lora_up/alpha) and musubi-tuner (`lora_unet_blocks_N_...`). Every writer
describes one and the same low-rank update, so every layout must give the same video.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from torch import Tensor
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from families.shared.quantized_tiny import write_gguf
from families.shared.tiny_files import save_safetensors_atomically as _save_atomically
from families.wan22.variants import I2V_A14B, T2V_A14B, TI2V_5B, VARIANT_SETTINGS

__all__ = [
    "LORA_LAYOUTS",
    "TEXT_WIDTH",
    "TINY_WIDTHS",
    "TinyWanLora",
    "build_tiny_wan_pipeline",
    "make_tiny_wan_lora",
    "save_tiny_wan_folder",
    "save_tiny_wan_transformer_gguf",
    "tiny_umt5_tokenizer",
    "wan_transformer_to_original",
    "write_real_size_wan_lora",
    "write_tiny_input_image",
    "write_wan_lora",
]

# --- tiny sizes -----------------------------------------------------------------------------
TEXT_WIDTH = 16  # UMT5-XXL: 4096
TEXT_LAYERS = 2  # UMT5-XXL encoder: 24
MAX_TOKENS = 512  # the pipelines pad every prompt to 512 tokens, as Wan's text_len
HEAD_DIM = 12  # real: 128; Wan's 3-D RoPE splits it 4/4/4 over frames, height and width
BLOCKS = 2  # real: 40 (A14B), 30 (5B)
FFN_WIDTH = 32  # real: 13824 (A14B), 14336 (5B)
# Heads per variant: the widths (24 and 36) differ as the real ones do (5120 vs 3072).
HEADS = {T2V_A14B: 2, I2V_A14B: 2, TI2V_5B: 3}
TINY_WIDTHS = {variant: heads * HEAD_DIM for variant, heads in HEADS.items()}
# Transformer input channels: latents, plus for A14B I2V the first-frame mask (4) and the
# image latents (16) concatenated on the channel axis.
IN_CHANNELS = {T2V_A14B: 16, I2V_A14B: 36, TI2V_5B: 48}
OUT_CHANNELS = {T2V_A14B: 16, I2V_A14B: 16, TI2V_5B: 48}
VAE_BASE = 4  # real: 96 (Wan 2.1 VAE), 160 (Wan 2.2 VAE encoder)
VAE22_DECODER_BASE = 6  # real: 256; the Wan 2.2 VAE decoder is wider than its encoder
SEED_STRIDE = 1000

# Unigram pieces: special tokens first (ids 0-2 as in UMT5: pad, eos, unk), then the word
# boundary marker, single characters, and whole words that the demo prompts use, so that a
# prompt becomes a short sequence of real pieces rather than a row of <unk>.
_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-:;()"
_WORDS = ("a", "an", "the", "of", "on", "in", "at", "and", "with", "over", "red", "blue",
          "green", "cat", "dog", "boat", "lake", "lantern", "lighthouse", "sea", "sky",
          "city", "night", "rain", "walking", "flying", "slow", "camera", "pan", "video")
_SPECIALS = ("<pad>", "</s>", "<unk>")


# --- tokenizer and models -------------------------------------------------------------------


def tiny_umt5_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer with UMT5's special tokens, built in memory.

    Hand-built rather than trained: the same pieces and scores in every process. Words score
    higher than their spelling, so the Unigram model prefers them; unknown characters (the
    Chinese default negative prompt, for one) become <unk>, as rare pieces would.
    """
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in _SPECIALS]
    pieces.append(("\u2581", -2.0))
    pieces += [(char, -4.0) for char in _CHARACTERS]
    pieces += [("\u2581" + word, -1.0) for word in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def _tiny_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_WIDTH,
        d_kv=4,
        d_ff=2 * TEXT_WIDTH,
        num_layers=TEXT_LAYERS,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # UMT5's
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ))


def _tiny_transformer(variant: str, head_dim: int = HEAD_DIM) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS[variant],
        attention_head_dim=head_dim,
        in_channels=IN_CHANNELS[variant],
        out_channels=OUT_CHANNELS[variant],
        text_dim=TEXT_WIDTH,
        freq_dim=32,  # real: 256
        ffn_dim=FFN_WIDTH,
        num_layers=BLOCKS,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=None,  # Wan 2.2 has no CLIP image branch (Wan 2.1 I2V: 1280)
        rope_max_seq_len=64,
    )


def _tiny_vae_21() -> AutoencoderKLWan:
    """The Wan 2.1 VAE layout, used by both A14B releases. Its default latent statistics are
    the real VAE's, kept: the pipeline normalises latents with them."""
    return AutoencoderKLWan(base_dim=VAE_BASE, z_dim=16, dim_mult=[1, 1, 1, 1],
                            num_res_blocks=1, temperal_downsample=[False, True, True])


def _tiny_vae_22() -> AutoencoderKLWan:
    """The Wan 2.2 VAE layout: 48 latent channels, residual down/up sampling, and 2x2 pixel
    patches folded into 12 input channels (8x from the levels times 2 = 16x spatially)."""
    return AutoencoderKLWan(base_dim=VAE_BASE, decoder_base_dim=VAE22_DECODER_BASE, z_dim=48,
                            dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True,
                            in_channels=12, out_channels=12, patch_size=2,
                            scale_factor_spatial=16, scale_factor_temporal=4,
                            # A random VAE has no statistics worth recording.
                            latents_mean=[0.0] * 48, latents_std=[1.0] * 48)


def _flow_unipc(flow_shift: float) -> UniPCMultistepScheduler:
    """Wan's sampler as its diffusers checkpoints ship it: UniPC on flow-matching sigmas."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=flow_shift)


def build_tiny_wan_pipeline(variant: str, seed: int = 0, *, head_dim: int = HEAD_DIM,
                            ) -> WanPipeline | WanImageToVideoPipeline:
    """Build a tiny Wan 2.2 pipeline of `variant` (t2v-a14b, i2v-a14b, ti2v-5b); the same seed
    gives bit-identical weights, and the caller's global torch RNG state is left untouched.
    Each component is initialised from its own seed offset, so resizing one never changes the
    others' weights.

    `head_dim` 16 (instead of 12) makes the A14B experts 32 wide: every block linear then
    takes a multiple of 32 inputs, the block size of GGUF's Q8_0 / Q4_0 quantization, which
    the quantized demo checkpoints need."""
    if variant not in VARIANT_SETTINGS:
        raise ValueError(f"unknown Wan 2.2 variant {variant!r}; known: "
                         f"{', '.join(VARIANT_SETTINGS)}")
    settings = VARIANT_SETTINGS[variant]
    tokenizer = tiny_umt5_tokenizer()
    builders = {
        "text_encoder": lambda: _tiny_text_encoder(len(tokenizer)),
        "vae": _tiny_vae_22 if variant == TI2V_5B else _tiny_vae_21,
        "transformer": lambda: _tiny_transformer(variant, head_dim),
    }
    if settings.two_experts:
        builders["transformer_2"] = lambda: _tiny_transformer(variant, head_dim)
    models: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed * SEED_STRIDE + offset)
            models[name] = build().eval().requires_grad_(False)
    common = dict(tokenizer=tokenizer, text_encoder=models["text_encoder"], vae=models["vae"],
                  scheduler=_flow_unipc(settings.defaults.flow_shift or 5.0),
                  transformer=models["transformer"],
                  transformer_2=models.get("transformer_2"),
                  boundary_ratio=settings.boundary_ratio,
                  expand_timesteps=settings.expand_timesteps)
    pipe: WanPipeline | WanImageToVideoPipeline
    if variant == I2V_A14B:
        pipe = WanImageToVideoPipeline(**common)  # image_encoder / image_processor stay None
    else:
        pipe = WanPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_wan_folder(pipe: WanPipeline | WanImageToVideoPipeline, folder: Path) -> Path:
    """Write a regular diffusers folder (model_index.json, one subfolder per component)."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# diffusers module names -> the original release's, in the order they are applied (inside
# blocks; the top-level ones are handled by name). The inverse of diffusers'
# `convert_wan_transformer_to_diffusers`, which a test checks.
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
)
# Tensors kept in F32 in the GGUF files: the patch embedding (5-D, and GGUF quantizes 2-D
# weights only), the text / time embedders and the output head, small and precision-critical.
GGUF_KEEP_PRECISE = ("patch_embedding.", "text_embedding.", "time_embedding.",
                     "time_projection.", "head.")


def wan_transformer_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers WanTransformer3DModel state dict under the original release's names
    (`blocks.0.self_attn.q.weight`, `head.head.weight`, ...), as single files have them.
    diffusers' norm2 (cross-attention norm) is the original norm3, and the reverse."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "scale_shift_table":
            name = "head.modulation"
        elif key.startswith("proj_out."):
            name = "head.head." + key.removeprefix("proj_out.")
        else:
            name = key
            parts = name.split(".")
            if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "scale_shift_table":
                name = f"blocks.{parts[1]}.modulation"
            elif len(parts) > 3 and parts[0] == "blocks" and parts[2] in ("norm2", "norm3"):
                parts[2] = "norm3" if parts[2] == "norm2" else "norm2"
                name = ".".join(parts)
            for old, new in _TO_ORIGINAL:
                name = name.replace(old, new)
        out[name] = tensor
    return out


def save_tiny_wan_transformer_gguf(transformer: WanTransformer3DModel, path: Path,
                                   quantization: str = "Q8_0") -> Path:
    """Write one expert (or the 5B transformer) as a GGUF file in the original layout."""
    return write_gguf(wan_transformer_to_original(transformer.state_dict()), path,
                      architecture="wan", quantization=quantization,
                      keep_precise=GGUF_KEEP_PRECISE)


def write_tiny_input_image(path: Path, size: tuple[int, int] = (48, 32), seed: int = 0) -> Path:
    """A small deterministic RGB picture (colour ramps plus a seeded offset) as PNG, for
    image-to-video jobs; two seeds give clearly different images."""
    width, height = size
    generator = torch.Generator().manual_seed(seed)
    offset = torch.randint(0, 256, (3,), generator=generator)
    x = torch.arange(width).view(1, width).expand(height, width)
    y = torch.arange(height).view(height, 1).expand(height, width)
    channels = [(x * 255 // max(width - 1, 1) + offset[0]) % 256,
                (y * 255 // max(height - 1, 1) + offset[1]) % 256,
                ((x + y) * 4 + offset[2]) % 256]
    array = torch.stack(channels, dim=-1).to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array, mode="RGB").save(temp, format="PNG")
    temp.replace(path)
    return path


# --- LoRAs ----------------------------------------------------------------------------------

# The ten linear layers of a Wan block: original module name -> diffusers module name.
BLOCK_LINEARS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
LORA_LAYOUTS = ("diffusers", "peft", "original", "comfy", "musubi")


@dataclass(frozen=True)
class TinyWanLora:
    """A low-rank update of a Wan transformer, by original module name (`blocks.0.self_attn.q`):
    (down [rank, in], up [out, rank]). The update of a module is `alpha / rank * up @ down`."""

    modules: dict[str, tuple[Tensor, Tensor]]
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def diffusers_modules(self) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for module, pair in self.modules.items():
            _, index, inner = module.split(".", 2)
            out[f"blocks.{index}.{BLOCK_LINEARS[inner]}"] = pair
        return out


def make_tiny_wan_lora(transformer: WanTransformer3DModel, seed: int = 0, rank: int = 2,
                       alpha: float = 1.0, layers: Iterable[str] | None = None) -> TinyWanLora:
    """A random LoRA at the shapes of `transformer`'s block linears (all ten of every block
    unless `layers` names some, e.g. ("self_attn.q", "cross_attn.k")).

    Values are rounded to float16 so that files saved in float16 (as kohya and musubi do)
    hold the same numbers; large enough (0.3 std) to change a tiny render visibly.
    """
    wanted = tuple(layers) if layers is not None else tuple(BLOCK_LINEARS)
    unknown = sorted(set(wanted) - set(BLOCK_LINEARS))
    if unknown:
        raise ValueError(f"not Wan block linears: {unknown}; known: {list(BLOCK_LINEARS)}")
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    for index in range(len(transformer.blocks)):
        for inner in wanted:
            # Module sizes, not state-dict keys: a transformer that holds LoRAs already names
            # its weights `base_layer.weight`.
            linear = transformer.get_submodule(f"blocks.{index}.{BLOCK_LINEARS[inner]}")
            out_features, in_features = linear.out_features, linear.in_features
            down = torch.randn(rank, in_features, generator=generator) * 0.3
            up = torch.randn(out_features, rank, generator=generator) * 0.3
            modules[f"blocks.{index}.{inner}"] = (down.half().float(), up.half().float())
    return TinyWanLora(modules=modules, rank=rank, alpha=alpha)


def write_wan_lora(lora: TinyWanLora, path: Path, layout: str,
                   metadata: Mapping[str, str] | None = None) -> Path:
    """Write `lora` in one of LORA_LAYOUTS:

    * diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight`, rank and alpha in the
      header's `lora_adapter_metadata` (diffusers' `save_lora_weights`, as its trainers do);
    * peft: a raw PEFT state dict, `base_model.model.blocks.0.attn1.to_q.lora_A.weight`;
    * original: `diffusion_model.blocks.0.self_attn.q.lora_A.weight` (lightx2v,
      diffusion-pipe), no alpha;
    * comfy: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `lora_up` / `.alpha`
      (ComfyUI-style exports, Kijai's extractions);
    * musubi: `lora_unet_blocks_0_self_attn_q.lora_down.weight` / `lora_up` / `.alpha`,
      float16, as musubi-tuner saves.

    Layouts without an alpha fold the scaling into the up matrix. `metadata` goes into the
    header (e.g. `modelspec.architecture`).
    """
    header = dict(metadata or {})
    tensors: dict[str, Tensor] = {}
    if layout == "diffusers":
        layers: dict[str, Tensor] = {}
        for module, (down, up) in lora.diffusers_modules().items():
            layers[f"{module}.lora_A.weight"] = down
            layers[f"{module}.lora_B.weight"] = up
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as temp:
            WanPipeline.save_lora_weights(
                save_directory=temp, weight_name=path.name, transformer_lora_layers=layers,
                transformer_lora_adapter_metadata={
                    "r": lora.rank, "lora_alpha": lora.alpha,
                    "target_modules": sorted(lora.diffusers_modules())})
            written = Path(temp) / path.name
            if header:  # save_lora_weights takes no free metadata: add it to the header
                from safetensors import safe_open
                with safe_open(str(written), "pt") as handle:
                    kept = dict(handle.metadata() or {})
                    state = {key: handle.get_tensor(key) for key in handle.keys()}
                _save_atomically(state, written, {**kept, **header})
            written.replace(path)
        return path
    if layout == "peft":
        for module, (down, up) in lora.diffusers_modules().items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = down
            tensors[f"base_model.model.{module}.lora_B.weight"] = up * lora.scaling
    elif layout == "original":
        for module, (down, up) in lora.modules.items():
            tensors[f"diffusion_model.{module}.lora_A.weight"] = down
            tensors[f"diffusion_model.{module}.lora_B.weight"] = up * lora.scaling
    elif layout in ("comfy", "musubi"):
        dtype = torch.float16 if layout == "musubi" else torch.float32
        alpha = torch.tensor(lora.alpha, dtype=dtype)
        for module, (down, up) in lora.modules.items():
            name = (f"diffusion_model.{module}" if layout == "comfy"
                    else "lora_unet_" + module.replace(".", "_"))
            tensors[f"{name}.lora_down.weight"] = down.to(dtype)
            tensors[f"{name}.lora_up.weight"] = up.to(dtype)
            tensors[f"{name}.alpha"] = alpha.clone()
        header.setdefault("ss_network_dim", str(lora.rank))
        header.setdefault("ss_network_alpha", str(float(lora.alpha)))
    else:
        raise ValueError(f"unknown LoRA layout {layout!r}; known: {', '.join(LORA_LAYOUTS)}")
    _save_atomically(tensors, Path(path), header)
    return Path(path)


# Real transformer widths and feed-forward widths per model size.
REAL_SIZES = {"14b": (5120, 13824), "5b": (3072, 14336), "1.3b": (1536, 8960)}


def write_real_size_wan_lora(path: Path, size: str = "14b", layout: str = "musubi",
                             metadata: Mapping[str, str] | None = None) -> Path:
    """A rank-1 float16 Wan LoRA with three modules of block 0 at a real model's shapes.

    For header recognition only (it loads into no tiny model): self-attention q, cross-
    attention k and the feed-forward input, named per `layout` (musubi, original,
    diffusers). A few tens of KB.
    """
    width, ffn = REAL_SIZES[size]
    shapes = {"self_attn.q": (width, width), "cross_attn.k": (width, width),
              "ffn.0": (width, ffn)}
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, Tensor] = {}
    for inner, (fan_in, fan_out) in shapes.items():
        down = torch.randn(1, fan_in, generator=generator).half()
        up = torch.randn(fan_out, 1, generator=generator).half()
        if layout == "musubi":
            name = "lora_unet_blocks_0_" + inner.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(1.0, dtype=torch.float16)})
        elif layout == "original":
            tensors.update({f"diffusion_model.blocks.0.{inner}.lora_A.weight": down,
                            f"diffusion_model.blocks.0.{inner}.lora_B.weight": up})
        elif layout == "diffusers":
            module = f"transformer.blocks.0.{BLOCK_LINEARS[inner]}"
            tensors.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})
        else:
            raise ValueError(f"layout must be musubi, original or diffusers, got {layout!r}")
    _save_atomically(tensors, Path(path), dict(metadata or {}))
    return Path(path)
