"""Tiny, random-weight but structurally real HunyuanVideo (and HunyuanVideo 1.5) checkpoints
and LoRA files, built offline from a seed.

No model hub is reachable here or in CI, so the HunyuanVideo demos and tests run on these.
They keep each model's real *layout* and shrink only widths and depths:

HunyuanVideo (`HunyuanVideoPipeline`):
* a Llama text encoder (`LlamaModel`, the pipeline reads the hidden state two layers before
  the last) with a BPE tokenizer trained in memory that pads on the right and keeps the
  prompt template's `<|start_header_id|>`-style markers as single tokens, as the real
  Llama 3 tokenizer does;
* a CLIP text encoder whose pooled output conditions the transformer (CLIP-L's role);
* the HunyuanVideo transformer: double-stream and single-stream blocks, the token refiner,
  embedded guidance, 2x2 latent patches;
* the HunyuanVideo causal 3D VAE with 4 levels: 8x spatial and 4x temporal compression, so
  that, as for the real model, sides are multiples of 16 and clips have 4k+1 frames;
* the flow-matching Euler scheduler with HunyuanVideo's shift of 7.

HunyuanVideo 1.5 (`HunyuanVideo15Pipeline`): a Qwen2.5-VL text model with a byte-level
tokenizer and a Qwen chat template, a ByT5 glyph encoder, the 1.5 transformer (double-stream
blocks only), the 1.5 VAE (16x spatial, 4x temporal) and the classifier-free guider.

The real prompt templates crop a fixed number of tokens (`crop_start`: 95 for HunyuanVideo,
108 for 1.5) computed for the real tokenizers; these tiny tokenizers need their own counts,
which `families.hunyuan_video.hunyuan_video` computes from the template at render time.

LoRA files for the tiny HunyuanVideo transformer are written in every layout the family
accepts (diffusers, original with `diffusion_model.` or `transformer.` prefix, original with
kohya-style `lora_down`/`lora_up`/`alpha`, musubi-tuner). All of them describe one and the
same low-rank update, so every layout must give the same video.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from safetensors.torch import save_file
from torch import Tensor
from transformers import (
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizerFast,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen2TokenizerFast,
    T5Config,
    T5EncoderModel,
)

from families.shared.quantized_tiny import write_fp8_safetensors, write_gguf
from families.shared.tiny_files import save_safetensors_atomically as _save_atomically

__all__ = [
    "DOUBLE_BLOCKS",
    "GGUF_HEADS",
    "SINGLE_BLOCKS",
    "TRANSFORMER_WIDTH",
    "TinyHunyuanLora",
    "build_tiny_hunyuan_video15_pipeline",
    "build_tiny_hunyuan_video_pipeline",
    "make_tiny_hunyuan_lora",
    "hunyuan_transformer_to_original",
    "read_model_index",
    "save_tiny_folder",
    "save_tiny_hunyuan_transformer_fp8",
    "save_tiny_hunyuan_transformer_gguf",
    "tiny_llama_tokenizer",
    "write_hunyuan_lora",
    "write_hunyuan_video15_lora",
    "write_real_size_lora_header",
]

# --- tiny sizes (real HunyuanVideo in the comments) -----------------------------------------
LLAMA_HIDDEN = 16  # 4096
LLAMA_LAYERS = 4  # 32; the pipeline reads hidden_states[-3], so at least 3 layers
LLAMA_HEADS = 2
LLAMA_VOCAB = 512  # 128k
LLAMA_MAX_POSITIONS = 1024  # prompts are padded to 256 tokens after the cropped template
CLIP_HIDDEN = 8  # 768 (CLIP-L); its pooled output is the transformer's pooled projection
CLIP_LAYERS = 2
CLIP_MAX_TOKENS = 77

TRANSFORMER_HEADS = 3  # 24
TRANSFORMER_HEAD_DIM = 8  # 128
# Differs from the text widths on purpose: a swapped dimension cannot go unnoticed.
TRANSFORMER_WIDTH = TRANSFORMER_HEADS * TRANSFORMER_HEAD_DIM  # 3072
ROPE_AXES = (2, 2, 4)  # (16, 56, 56): frame, height and width axes, summing to the head dim
# The quantized demo checkpoints' transformer: 4 heads, 32 wide, so that its Linears take
# multiples of 32 inputs, the block size of GGUF's Q8_0 / Q4_0.
GGUF_HEADS = 4
DOUBLE_BLOCKS = 2  # 20
SINGLE_BLOCKS = 2  # 40
REFINER_BLOCKS = 1  # 2
LATENT_CHANNELS = 4  # 16
VAE_WIDTHS = (8, 8, 8, 8)  # (128, 256, 512, 512); 4 levels = 8x spatial, 4x temporal
VAE_NORM_GROUPS = 4  # 32
HUNYUAN_VIDEO_SHIFT = 7.0  # scheduler_config.json of the released diffusers folder

# HunyuanVideo 1.5 (real values in the comments).
QWEN_HIDDEN = 16  # 3584 (Qwen2.5-VL 7B)
QWEN_LAYERS = 4  # 28
QWEN_HEADS = 2
QWEN_MAX_POSITIONS = 2048  # the pipeline pads every prompt to 1000 tokens plus the template
BYT5_WIDTH = 8  # 1472
V15_HEADS = 3  # 16
V15_HEAD_DIM = 8  # 128
V15_BLOCKS = 2  # 54
V15_IMAGE_EMBED = 8  # 1152 (SigLIP); text-to-video feeds zeros
V15_LATENT_CHANNELS = 4  # 32
V15_VAE_WIDTHS = (8, 8, 8, 8, 8)  # (128, 256, 512, 1024, 1024); 16x spatial, 4x temporal
V15_SHIFT = 5.0  # stand-in; the checkpoint's own scheduler config decides
V15_CFG = 6.0

# Llama 3 chat markers used by HunyuanVideo's prompt template; the real tokenizer has each as
# one special token, so the tiny one must too or the template would tokenize very differently.
LLAMA_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA_PAD = "<pad>"
# Sentences the tiny BPE is trained on: the template's text and a few prompts. Printable
# ASCII is always in the alphabet, so any ASCII prompt tokenizes without <unk>.
_TRAINING_TEXT = (
    DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", ""),
    "a red lighthouse on a cliff at dusk, waves crashing below",
    "a paper lantern floating over a misty lake at dawn",
    "a cat walks on the grass, realistic",
    "the quick brown fox jumps over the lazy dog",
    "slow camera pan across a neon city street in the rain at night",
    "close-up of a hummingbird drinking from a red flower",
    "an astronaut riding a horse on the moon, cinematic lighting",
    "time-lapse of clouds rolling over snowy mountains",
)
_ASCII = [chr(code) for code in range(32, 127)]

# Qwen2.5's chat markers and a template for `apply_chat_template`, written for this project:
# system turn, user turn, then the assistant header (add_generation_prompt), as Qwen's own.
QWEN_PAD = "<|endoftext|>"
QWEN_IM_START, QWEN_IM_END = "<|im_start|>", "<|im_end|>"
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Bytes that byte-level BPE shows as themselves; the rest become chr(256 + n) (GPT-2 order).
_PRINTABLE_BYTE_RANGES = ((ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ")))
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


# --- tokenizers -----------------------------------------------------------------------------


def tiny_llama_tokenizer() -> LlamaTokenizerFast:
    """A Llama BPE tokenizer trained in memory on a dozen sentences.

    Deterministic: with `min_frequency=2` on this corpus the trainer has no ties left to break
    by hash order (checked in fresh processes with different hash seeds; the test suite
    retrains it in-process, where the trainer's hash maps are reseeded too). BOS is
    added as Llama 3 adds `<|begin_of_text|>`, and padding is on the right, as in
    HunyuanVideo's tokenizer (Llama's default is left, which would shift every prompt).
    """
    # Settings given to the untrained tokenizer are carried into the trained one and saved in
    # tokenizer_config.json; set on the trained one, padding_side would not survive a reload.
    untrained = LlamaTokenizerFast(padding_side="right", add_bos_token=True, pad_token=LLAMA_PAD)
    return untrained.train_new_from_iterator(
        _TRAINING_TEXT,
        vocab_size=LLAMA_VOCAB,
        min_frequency=2,
        initial_alphabet=_ASCII,
        new_special_tokens=[LLAMA_PAD, *LLAMA_MARKERS],
    )


def _byte_level_alphabet() -> list[str]:
    shown_as_self = [b for lo, hi in _PRINTABLE_BYTE_RANGES for b in range(lo, hi + 1)]
    kept = set(shown_as_self)
    remapped = [b for b in range(256) if b not in kept]
    return [chr(b) for b in shown_as_self] + [chr(256 + n) for n in range(len(remapped))]


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level CLIP vocabulary built by hand (BPE training is not deterministic across
    processes): every byte, every byte ending a word, then BOS and EOS as the two highest ids,
    which CLIP's pooling (first EOS) relies on. Pads with EOS, as CLIP-L does."""
    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(f"{char}</w>" for char in alphabet), CLIP_BOS, CLIP_EOS]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[],
                         bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS,
                         pad_token=CLIP_EOS, model_max_length=CLIP_MAX_TOKENS)


def _tiny_qwen_tokenizer() -> Qwen2TokenizerFast:
    """Byte-level BPE without merges (every byte one token), Qwen's specials, and a chat
    template with system and user turns, which HunyuanVideo 1.5 encodes its prompts with."""
    tokens = [*_byte_level_alphabet(), QWEN_PAD, QWEN_IM_START, QWEN_IM_END]
    tokenizer = Qwen2TokenizerFast(
        vocab={token: index for index, token in enumerate(tokens)}, merges=[], unk_token=None,
        eos_token=QWEN_IM_END, pad_token=QWEN_PAD, extra_special_tokens=[QWEN_IM_START],
        model_max_length=QWEN_MAX_POSITIONS, padding_side="right")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


# --- models ---------------------------------------------------------------------------------


def _tiny_llama(tokenizer: LlamaTokenizerFast) -> LlamaModel:
    return LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LLAMA_HIDDEN, intermediate_size=2 * LLAMA_HIDDEN,
        num_hidden_layers=LLAMA_LAYERS, num_attention_heads=LLAMA_HEADS,
        num_key_value_heads=LLAMA_HEADS, max_position_embeddings=LLAMA_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def _tiny_clip(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_HIDDEN, intermediate_size=4 * CLIP_HIDDEN,
        projection_dim=CLIP_HIDDEN, num_hidden_layers=CLIP_LAYERS, num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_TOKENS, hidden_act="quick_gelu",
        # CLIPTextConfig defaults to the real ids 49406/49407, which do not exist here; the
        # EOS id decides which position is pooled.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def _tiny_transformer(heads: int = TRANSFORMER_HEADS) -> HunyuanVideoTransformer3DModel:
    return HunyuanVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_attention_heads=heads, attention_head_dim=TRANSFORMER_HEAD_DIM,
        num_layers=DOUBLE_BLOCKS, num_single_layers=SINGLE_BLOCKS,
        num_refiner_layers=REFINER_BLOCKS, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=LLAMA_HIDDEN, pooled_projection_dim=CLIP_HIDDEN,
        rope_axes_dim=ROPE_AXES)


def _tiny_vae() -> AutoencoderKLHunyuanVideo:
    return AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS, block_out_channels=VAE_WIDTHS, layers_per_block=1,
        norm_num_groups=VAE_NORM_GROUPS, spatial_compression_ratio=8,
        temporal_compression_ratio=4)


def _tiny_qwen(tokenizer: Qwen2TokenizerFast) -> Qwen2_5_VLTextModel:
    head_dim = QWEN_HIDDEN // QWEN_HEADS
    return Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=2 * QWEN_HIDDEN,
        num_hidden_layers=QWEN_LAYERS, num_attention_heads=QWEN_HEADS,
        num_key_value_heads=QWEN_HEADS, max_position_embeddings=QWEN_MAX_POSITIONS,
        # Multimodal RoPE splits each head's rotary half into (time, height, width) sections.
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                         "mrope_section": [1, 1, head_dim // 2 - 2]},
        # The config defaults to Qwen's real BOS id (151643), outside this vocabulary.
        bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id))


def _tiny_byt5(tokenizer: ByT5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=BYT5_WIDTH, d_kv=4, d_ff=2 * BYT5_WIDTH,
        num_layers=1, num_heads=2, relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id))


def _tiny_v15_transformer() -> HunyuanVideo15Transformer3DModel:
    return HunyuanVideo15Transformer3DModel(
        # Noisy latents, the (zero) condition latents and a mask channel, concatenated.
        in_channels=2 * V15_LATENT_CHANNELS + 1, out_channels=V15_LATENT_CHANNELS,
        num_attention_heads=V15_HEADS, attention_head_dim=V15_HEAD_DIM, num_layers=V15_BLOCKS,
        num_refiner_layers=REFINER_BLOCKS, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
        text_embed_dim=QWEN_HIDDEN, text_embed_2_dim=BYT5_WIDTH,
        image_embed_dim=V15_IMAGE_EMBED, rope_axes_dim=ROPE_AXES, target_size=32,
        task_type="t2v")


def _tiny_v15_vae() -> AutoencoderKLHunyuanVideo15:
    return AutoencoderKLHunyuanVideo15(
        latent_channels=V15_LATENT_CHANNELS, block_out_channels=V15_VAE_WIDTHS,
        layers_per_block=1, spatial_compression_ratio=16, temporal_compression_ratio=4)


def _perturb_constants(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Add small noise to every parameter that starts as a constant (norm scales at 1, biases
    at 0): left equal, two tensors a wrong key mapping swaps would still compare equal."""
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = param.reshape(-1)
            if flat.numel() > 0 and bool(torch.all(flat == flat[0])):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _build_models(seed: int, builders: Mapping[str, object]) -> dict[str, torch.nn.Module]:
    """Build each model from its own seed offset (resizing one never changes the others)
    without disturbing the caller's global RNG."""
    models: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed * 1000 + offset)
            model = build()  # type: ignore[operator]
            _perturb_constants(model, torch.Generator().manual_seed(seed * 1000 + 100 + offset))
            models[name] = model.eval().requires_grad_(False)
    return models


def build_tiny_hunyuan_video_pipeline(seed: int = 0,
                                      heads: int = TRANSFORMER_HEADS) -> HunyuanVideoPipeline:
    """A tiny HunyuanVideo pipeline; the same seed gives bit-identical weights. `heads` sets
    the transformer's width (8 per head): `GGUF_HEADS` makes it 32 wide, which GGUF's 32-wide
    quantization blocks need; the other components do not change with it."""
    tokenizer = tiny_llama_tokenizer()
    tokenizer_2 = _tiny_clip_tokenizer()
    models = _build_models(seed, {
        "transformer": lambda: _tiny_transformer(heads),
        "vae": _tiny_vae,
        "text_encoder": lambda: _tiny_llama(tokenizer),
        "text_encoder_2": lambda: _tiny_clip(tokenizer_2),
    })
    pipe = HunyuanVideoPipeline(
        text_encoder=models["text_encoder"], tokenizer=tokenizer,
        transformer=models["transformer"], vae=models["vae"],
        scheduler=FlowMatchEulerDiscreteScheduler(shift=HUNYUAN_VIDEO_SHIFT),
        text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_hunyuan_video15_pipeline(seed: int = 0) -> HunyuanVideo15Pipeline:
    """A tiny HunyuanVideo 1.5 text-to-video pipeline; the same seed gives the same weights.

    The ByT5 projection's middle width is fixed at 2048 by diffusers (not a config value):
    its 4M weights dominate. They are rounded to bfloat16 here and `save_tiny_folder` stores
    the transformer in bfloat16, as the released 1.5 transformer is stored (~9 MB instead of
    ~17), while the loaded float32 model still equals this one exactly.
    """
    tokenizer = _tiny_qwen_tokenizer()
    tokenizer_2 = ByT5Tokenizer()
    models = _build_models(seed, {
        "transformer": _tiny_v15_transformer,
        "vae": _tiny_v15_vae,
        "text_encoder": lambda: _tiny_qwen(tokenizer),
        "text_encoder_2": lambda: _tiny_byt5(tokenizer_2),
    })
    pipe = HunyuanVideo15Pipeline(
        text_encoder=models["text_encoder"], tokenizer=tokenizer,
        transformer=models["transformer"], vae=models["vae"],
        scheduler=FlowMatchEulerDiscreteScheduler(shift=V15_SHIFT),
        text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=V15_CFG))
    with torch.no_grad():
        for param in pipe.transformer.parameters():
            param.copy_(param.to(torch.bfloat16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_folder(pipe: HunyuanVideoPipeline | HunyuanVideo15Pipeline, folder: Path) -> Path:
    """Write a regular diffusers folder (model_index.json, one subfolder per component); a
    HunyuanVideo 1.5 transformer in bfloat16 (see `build_tiny_hunyuan_video15_pipeline`)."""
    pipe.save_pretrained(folder, safe_serialization=True)
    if isinstance(pipe, HunyuanVideo15Pipeline):
        weights = Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"
        state = {key: value.to(torch.bfloat16).contiguous()
                 for key, value in pipe.transformer.state_dict().items()}
        save_file(state, str(weights), metadata={"format": "pt"})
    return Path(folder)


def read_model_index(folder: Path) -> dict[str, object]:
    return json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))


# --- transformer-only files (original layout), plain and quantized --------------------------

# diffusers module names -> the original release's (Tencent's, ComfyUI's), applied in order
# after the block prefixes are renamed. q/k/v (and a single block's MLP input) are fused in
# the original and handled apart, as is the output head's modulation.
_TO_ORIGINAL_DOUBLE = (
    ("norm1.linear.", "img_mod.linear."), ("norm1_context.linear.", "txt_mod.linear."),
    ("attn.norm_q.", "img_attn_q_norm."), ("attn.norm_k.", "img_attn_k_norm."),
    ("attn.norm_added_q.", "txt_attn_q_norm."), ("attn.norm_added_k.", "txt_attn_k_norm."),
    ("attn.to_out.0.", "img_attn_proj."), ("attn.to_add_out.", "txt_attn_proj."),
    ("ff.net.0.proj.", "img_mlp.fc1."), ("ff.net.2.", "img_mlp.fc2."),
    ("ff_context.net.0.proj.", "txt_mlp.fc1."), ("ff_context.net.2.", "txt_mlp.fc2."),
)
_TO_ORIGINAL_SINGLE = (
    ("attn.norm_q.", "q_norm."), ("attn.norm_k.", "k_norm."), ("proj_out.", "linear2."),
    ("norm.linear.", "modulation.linear."),
)
_TO_ORIGINAL_REFINER = (
    ("attn.to_out.0.", "self_attn_proj."), ("ff.net.0.proj.", "mlp.fc1."),
    ("ff.net.2.", "mlp.fc2."), ("norm_out.linear.", "adaLN_modulation.1."),
)
_TO_ORIGINAL_TOP = (
    ("x_embedder.", "img_in."),
    ("context_embedder.proj_in.", "txt_in.input_embedder."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1.", "txt_in.t_embedder.mlp.0."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2.", "txt_in.t_embedder.mlp.2."),
    ("context_embedder.time_text_embed.text_embedder.", "txt_in.c_embedder."),
    ("time_text_embed.timestep_embedder.linear_1.", "time_in.mlp.0."),
    ("time_text_embed.timestep_embedder.linear_2.", "time_in.mlp.2."),
    ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer."),
    ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer."),
    ("time_text_embed.guidance_embedder.linear_1.", "guidance_in.mlp.0."),
    ("time_text_embed.guidance_embedder.linear_2.", "guidance_in.mlp.2."),
    ("proj_out.", "final_layer.linear."),
)
# Fused in the original layout, in this order: (diffusers names, original name).
_FUSED = (
    (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_qkv", "transformer_blocks"),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_qkv",
     "transformer_blocks"),
    (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1",
     "single_transformer_blocks"),
    (("attn.to_q", "attn.to_k", "attn.to_v"), "self_attn_qkv",
     "context_embedder.token_refiner.refiner_blocks"),
)
_ORIGINAL_BLOCKS = {"transformer_blocks": "double_blocks", "single_transformer_blocks":
                    "single_blocks", "context_embedder.token_refiner.refiner_blocks":
                    "txt_in.individual_token_refiner.blocks"}


def hunyuan_transformer_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers HunyuanVideoTransformer3DModel state dict under the original release's
    names (`double_blocks.0.img_attn_qkv.weight`, `single_blocks.0.linear1.weight`,
    `txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight`, ...), q/k/v fused again,
    as the transformer-only files users download have it (city96's GGUF files, ComfyUI's
    `hunyuan_video_*.safetensors`). The inverse of diffusers'
    `convert_hunyuan_video_transformer_to_diffusers`, which a test checks."""
    state = dict(state_dict)
    out: dict[str, Tensor] = {}
    for parts, fused, block_prefix in _FUSED:
        pattern = re.compile(rf"^{re.escape(block_prefix)}\.(\d+)\.{re.escape(parts[0])}"
                             r"\.(weight|bias)$")
        for key in [k for k in state if pattern.match(k)]:
            match = pattern.match(key)
            assert match is not None
            index, suffix = match.groups()
            names = [f"{block_prefix}.{index}.{part}.{suffix}" for part in parts]
            if not all(name in state for name in names):
                continue  # e.g. a double block's to_q when looking for a single block's
            original = f"{_ORIGINAL_BLOCKS[block_prefix]}.{index}.{fused}.{suffix}"
            out[original] = torch.cat([state.pop(name) for name in names], dim=0)
    for key, tensor in state.items():
        name = key
        for block_prefix, table in (("transformer_blocks.", _TO_ORIGINAL_DOUBLE),
                                    ("single_transformer_blocks.", _TO_ORIGINAL_SINGLE),
                                    ("context_embedder.token_refiner.refiner_blocks.",
                                     _TO_ORIGINAL_REFINER)):
            if key.startswith(block_prefix):
                index, inner = key[len(block_prefix):].split(".", 1)
                for old, new in table:
                    if inner.startswith(old):
                        inner = new + inner[len(old):]
                        break
                name = f"{_ORIGINAL_BLOCKS[block_prefix.rstrip('.')]}.{index}.{inner}"
                break
        else:
            if key.startswith("norm_out.linear."):
                # diffusers keeps (scale, shift); the original head's modulation is (shift,
                # scale).
                scale, shift = tensor.chunk(2, dim=0)
                tensor = torch.cat([shift, scale], dim=0)
                name = "final_layer.adaLN_modulation.1." + key.removeprefix("norm_out.linear.")
            for old, new in _TO_ORIGINAL_TOP:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
        out[name] = tensor
    return out


# Tensors kept in F32 in the GGUF files: the patch and text input embeddings (not 2-D, or too
# narrow for a block), the timestep / guidance / pooled-text embedders and the output head,
# small and precision-critical, as city96's converter leaves such tensors.
GGUF_KEEP_PRECISE = ("img_in.", "txt_in.input_embedder.", "txt_in.t_embedder.",
                     "txt_in.c_embedder.", "time_in.", "vector_in.", "guidance_in.",
                     "final_layer.")


def save_tiny_hunyuan_transformer_gguf(transformer: HunyuanVideoTransformer3DModel, path: Path,
                                       quantization: str = "Q8_0") -> Path:
    """Write the transformer as a GGUF file in the original layout, as city96's
    `hunyuan-video-t2v-720p-Q8_0.gguf` (general.architecture "hyvid")."""
    return write_gguf(hunyuan_transformer_to_original(transformer.state_dict()), path,
                      architecture="hyvid", quantization=quantization,
                      keep_precise=GGUF_KEEP_PRECISE)


def save_tiny_hunyuan_transformer_fp8(transformer: HunyuanVideoTransformer3DModel,
                                      path: Path) -> Path:
    """Write the transformer in the original layout with float8_e4m3fn weights (norm scales
    in bfloat16), as ComfyUI's `hunyuan_video_720_cfgdistill_fp8_e4m3fn.safetensors`."""
    return write_fp8_safetensors(hunyuan_transformer_to_original(transformer.state_dict()),
                                 path)


# --- LoRA files -----------------------------------------------------------------------------

# Modules of the original (Tencent) layout a tiny LoRA patches, inside double block N and
# single block N, with the diffusers module(s) each becomes. A fused q/k/v projection becomes
# three modules sharing the down matrix, each taking a third of the up matrix.
# `single_blocks.N.linear1` is left out: diffusers' converter splits it with the real width
# (3072) hard-coded, which only a real-size file survives.
_DOUBLE_MODULES: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp.fc1": ("ff.net.0.proj",),
    "img_mlp.fc2": ("ff.net.2",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",),
    "txt_mlp.fc2": ("ff_context.net.2",),
    "img_mod.linear": ("norm1.linear",),
    "txt_mod.linear": ("norm1_context.linear",),
}
_SINGLE_MODULES: dict[str, tuple[str, ...]] = {
    "linear2": ("proj_out",),
    "modulation.linear": ("norm.linear",),
}
# Token-refiner attention, as diffusers-format trainers target it (PEFT's default
# `to_q/to_k/to_v/to_out.0` matches there too). Only HunyuanVideo has a token refiner, which
# tells its diffusers-format LoRAs apart from Flux.1's; the original layout's refiner q/k/v
# is not converted correctly by diffusers 0.42, so only the diffusers writer adds these.
_REFINER_MODULES = tuple(
    f"context_embedder.token_refiner.refiner_blocks.{index}.attn.{name}"
    for index in range(REFINER_BLOCKS) for name in ("to_q", "to_k", "to_v", "to_out.0"))

LAYOUTS = ("diffusers", "original", "original-transformer", "original-kohya", "musubi")


@dataclass(frozen=True)
class TinyHunyuanLora:
    """A low-rank update of the tiny transformer, by original module name: (down [r, in],
    up [out, r]); each module's update is `alpha / rank * up @ down`. `refiner` holds extra
    diffusers-named modules only the diffusers layout carries."""

    modules: dict[str, tuple[Tensor, Tensor]]
    refiner: dict[str, tuple[Tensor, Tensor]]
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def diffusers_modules(self, *, refiner: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for module, (down, up) in self.modules.items():
            targets = _diffusers_targets(module)
            ups = up.chunk(len(targets), dim=0)
            for target, up_part in zip(targets, ups, strict=True):
                # Copies: safetensors refuses tensors that share memory.
                out[target] = (down.clone(), up_part.clone())
        if refiner:
            out.update(self.refiner)
        return out

    def patched_modules(self, layout: str) -> int:
        """How many transformer modules the file of `layout` patches once loaded."""
        return len(self.diffusers_modules(refiner=layout == "diffusers"))


def _diffusers_targets(module: str) -> tuple[str, ...]:
    block, index, inner = module.split(".", 2)
    if block == "double_blocks":
        return tuple(f"transformer_blocks.{index}.{t}" for t in _DOUBLE_MODULES[inner])
    return tuple(f"single_transformer_blocks.{index}.{t}" for t in _SINGLE_MODULES[inner])


def make_tiny_hunyuan_lora(transformer: HunyuanVideoTransformer3DModel, seed: int = 0,
                           rank: int = 2, alpha: float = 1.0) -> TinyHunyuanLora:
    """A random LoRA at the shapes of the tiny transformer's modules.

    Values are rounded to float16, so files saved in float16 (as musubi-tuner does) hold the
    same numbers; 0.3 std is large enough to change a tiny render visibly.
    """
    linear = {name: module for name, module in transformer.named_modules()
              if isinstance(module, torch.nn.Linear)}
    generator = torch.Generator().manual_seed(seed)

    def pair(in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
        down = torch.randn(rank, in_features, generator=generator) * 0.3
        up = torch.randn(out_features, rank, generator=generator) * 0.3
        return down.half().float(), up.half().float()

    modules: dict[str, tuple[Tensor, Tensor]] = {}
    blocks = [("double_blocks", i, _DOUBLE_MODULES) for i in range(DOUBLE_BLOCKS)]
    blocks += [("single_blocks", i, _SINGLE_MODULES) for i in range(SINGLE_BLOCKS)]
    for block, index, table in blocks:
        for inner in table:
            name = f"{block}.{index}.{inner}"
            targets = [linear[t] for t in _diffusers_targets(name)]
            modules[name] = pair(targets[0].in_features, sum(t.out_features for t in targets))
    refiner = {name: pair(linear[name].in_features, linear[name].out_features)
               for name in _REFINER_MODULES}
    return TinyHunyuanLora(modules=modules, refiner=refiner, rank=rank, alpha=alpha)


def write_hunyuan_lora(lora: TinyHunyuanLora, path: Path, layout: str,
                       metadata: Mapping[str, str] | None = None, *,
                       refiner: bool = True) -> Path:
    """Write `lora` in one of `LAYOUTS`:

    * diffusers: `transformer.<diffusers module>.lora_A.weight` / `lora_B` (PEFT naming, as
      diffusers' trainers save), alpha folded into lora_B; with the token refiner's attention
      unless `refiner` is False (then the file is the other layouts' update exactly);
    * original: `diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight` (diffusion-pipe,
      ComfyUI), alpha folded; original-transformer: the same under `transformer.`;
    * original-kohya: original names with `lora_down` / `lora_up` / `alpha` (ComfyUI saves);
    * musubi: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`,
      `.alpha`, float16, with musubi-tuner's modelspec architecture in the header.
    """
    tensors: dict[str, Tensor] = {}
    header = dict(metadata or {})
    if layout == "diffusers":
        for module, (down, up) in lora.diffusers_modules(refiner=refiner).items():
            tensors[f"transformer.{module}.lora_A.weight"] = down
            tensors[f"transformer.{module}.lora_B.weight"] = up * lora.scaling
    elif layout in ("original", "original-transformer"):
        prefix = "diffusion_model." if layout == "original" else "transformer."
        for module, (down, up) in lora.modules.items():
            tensors[f"{prefix}{module}.lora_A.weight"] = down
            tensors[f"{prefix}{module}.lora_B.weight"] = up * lora.scaling
    elif layout in ("original-kohya", "musubi"):
        dtype = torch.float16 if layout == "musubi" else torch.float32
        alpha = torch.tensor(lora.alpha, dtype=dtype)
        if float(alpha) != lora.alpha:
            raise ValueError(f"alpha {lora.alpha} is not exactly representable in {dtype}")
        for module, (down, up) in lora.modules.items():
            name = ("lora_unet_" + module.replace(".", "_") if layout == "musubi"
                    else f"diffusion_model.{module}")
            tensors[f"{name}.lora_down.weight"] = down.to(dtype)
            tensors[f"{name}.lora_up.weight"] = up.to(dtype)
            tensors[f"{name}.alpha"] = alpha.clone()
        if layout == "musubi":
            header.setdefault("modelspec.architecture", "hunyuan-video/lora")
            header.setdefault("ss_network_dim", str(lora.rank))
            header.setdefault("ss_network_alpha", str(float(lora.alpha)))
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    _save_atomically(tensors, Path(path), header)
    return Path(path)


def write_hunyuan_video15_lora(transformer: HunyuanVideo15Transformer3DModel, path: Path,
                               seed: int = 0, rank: int = 2) -> tuple[Path, int]:
    """A diffusers-format LoRA for the tiny 1.5 transformer: attention of every double block
    and of the token refiner (PEFT's default targets), plus the ByT5 glyph projection
    (`context_embedder_2`), which only HunyuanVideo 1.5 has. Returns (path, module count)."""
    generator = torch.Generator().manual_seed(seed)
    targets = [name for name, module in transformer.named_modules()
               if isinstance(module, torch.nn.Linear)
               and (name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                    or name.endswith("to_out.0") or name == "context_embedder_2.linear_1")]
    modules = dict(transformer.named_modules())
    tensors: dict[str, Tensor] = {}
    for name in targets:
        linear = modules[name]
        assert isinstance(linear, torch.nn.Linear)
        down = torch.randn(rank, linear.in_features, generator=generator) * 0.3
        up = torch.randn(linear.out_features, rank, generator=generator) * 0.3
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
    _save_atomically(tensors, Path(path), {"format": "pt"})
    return Path(path), len(targets)


# --- header-only files at real sizes (for recognition tests) ---------------------------------

REAL_WIDTH = 3072  # HunyuanVideo and Flux.1 alike
REAL_V15_WIDTH = 2048


def write_real_size_lora_header(path: Path, kind: str) -> Path:
    """A rank-1 float16 LoRA with a few modules at a real model's shapes and block indices, for
    header recognition only (it loads into no tiny model). `kind`:

    * hv-musubi: HunyuanVideo, musubi-tuner names, attention only (the names Flux.1 kohya
      files share), double block 19 and single block 39, which only HunyuanVideo has;
    * hv-diffusers: HunyuanVideo, diffusers names, the same blocks;
    * hv15-diffusers: HunyuanVideo 1.5, diffusers names, double block 53, width 2048;
    * flux-kohya / flux-original / flux-diffusers: Flux.1 dev (19 double and 38 single
      blocks; `img_mlp.0`, `modulation.lin`).
    """
    w = REAL_WIDTH
    shapes: dict[str, tuple[int, int]]  # module -> (in, out)
    if kind == "hv-musubi":
        shapes = {"lora_unet_double_blocks_19_img_attn_qkv": (w, 3 * w),
                  "lora_unet_double_blocks_19_txt_attn_proj": (w, w),
                  "lora_unet_single_blocks_39_linear2": (5 * w, w)}
    elif kind == "hv-diffusers":
        shapes = {"transformer.transformer_blocks.19.attn.to_q": (w, w),
                  "transformer.single_transformer_blocks.39.attn.to_q": (w, w)}
    elif kind == "hv15-diffusers":
        v = REAL_V15_WIDTH
        shapes = {"transformer.transformer_blocks.53.attn.to_q": (v, v),
                  "transformer.transformer_blocks.53.attn.add_k_proj": (v, v)}
    elif kind == "flux-kohya":
        shapes = {"lora_unet_double_blocks_18_img_attn_qkv": (w, 3 * w),
                  "lora_unet_double_blocks_18_img_mlp_0": (w, 4 * w),
                  "lora_unet_single_blocks_37_linear1": (w, 7 * w)}
    elif kind == "flux-original":
        shapes = {"diffusion_model.double_blocks.18.img_attn.qkv": (w, 3 * w),
                  "diffusion_model.double_blocks.18.img_mlp.0": (w, 4 * w),
                  "diffusion_model.single_blocks.37.modulation.lin": (w, 3 * w)}
    elif kind == "flux-diffusers":
        shapes = {"transformer.transformer_blocks.18.attn.to_q": (w, w),
                  "transformer.single_transformer_blocks.37.attn.to_q": (w, w)}
    else:
        raise ValueError(f"unknown kind {kind!r}")
    kohya = kind.endswith(("musubi", "kohya"))
    down_suffix, up_suffix = ((".lora_down.weight", ".lora_up.weight") if kohya
                              else (".lora_A.weight", ".lora_B.weight"))
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, Tensor] = {}
    for module, (fan_in, fan_out) in shapes.items():
        tensors[module + down_suffix] = torch.randn(1, fan_in, generator=generator).half()
        tensors[module + up_suffix] = torch.randn(fan_out, 1, generator=generator).half()
        if kohya:
            tensors[module + ".alpha"] = torch.tensor(1.0, dtype=torch.float16)
    _save_atomically(tensors, Path(path), {"format": "pt"})
    return Path(path)
