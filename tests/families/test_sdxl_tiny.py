"""The tiny SDXL checkpoint: built offline, saved in three forms, loaded back exactly."""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: they read this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from families.sdxl.tiny import (
    TE1_HIDDEN,
    TE2_HIDDEN,
    build_tiny_sdxl_pipeline,
    diffusers_unet_key_to_original,
    load_tiny_sdxl_single_file,
    save_tiny_sdxl_config_folder,
    save_tiny_sdxl_folder,
    save_tiny_sdxl_single_file,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open an internet connection (HF_HUB_OFFLINE alone proves less)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionXLPipeline:
    return build_tiny_sdxl_pipeline(seed=0)


def state_dicts(pipe: StableDiffusionXLPipeline) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    for name in COMPONENTS:
        yield name, getattr(pipe, name).state_dict()


def assert_same_weights(expected: StableDiffusionXLPipeline, actual: StableDiffusionXLPipeline):
    """Every tensor of every component present, materialised and bit-identical.

    Key sets are compared first: a weight the loader failed to fill can stay on the meta
    device or keep its random init without any error being raised.
    """
    for (name, want), (_, got) in zip(state_dicts(expected), state_dicts(actual), strict=True):
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            loaded = got[key]
            assert loaded.device.type == "cpu", f"{name}.{key} not loaded ({loaded.device})"
            assert loaded.dtype == tensor.dtype, f"{name}.{key}"
            assert torch.equal(loaded, tensor), f"{name}.{key} differs"


def assert_same_tokenizers_and_scheduler(
    expected: StableDiffusionXLPipeline, actual: StableDiffusionXLPipeline
) -> None:
    prompt = "a Red ball, 2 cubes!"
    for name in ("tokenizer", "tokenizer_2"):
        want, got = getattr(expected, name), getattr(actual, name)
        assert got.pad_token == want.pad_token
        assert got.model_max_length == want.model_max_length == 77
        assert got(prompt).input_ids == want(prompt).input_ids
    assert type(actual.scheduler) is type(expected.scheduler)
    # Loaded configs also record which values were defaults (`_use_default_values`).
    public = {k: v for k, v in actual.scheduler.config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in expected.scheduler.config.items() if not k.startswith("_")}


def render(pipe: StableDiffusionXLPipeline) -> list[Image.Image]:
    generators = [torch.Generator().manual_seed(seed) for seed in (11, 12)]
    return pipe(
        prompt=["a red ball", "a blue cube"],
        negative_prompt=["blurry", ""],
        num_inference_steps=2,
        height=32,
        width=32,
        generator=generators,
    ).images


def test_shape_is_sdxl(pipe: StableDiffusionXLPipeline) -> None:
    unet = pipe.unet.config
    assert list(unet.down_block_types) == [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ]
    assert list(unet.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet.layers_per_block == 2
    assert unet.addition_embed_type == "text_time"
    assert TE1_HIDDEN != TE2_HIDDEN  # the single-file loader tells the encoders apart by width
    assert unet.cross_attention_dim == TE1_HIDDEN + TE2_HIDDEN
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2.pad_token == "!"
    # EOS is the highest id, as CLIP's pooling expects
    assert pipe.tokenizer.eos_token_id == len(pipe.tokenizer) - 1
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.text_encoder_2.config.pad_token_id == pipe.tokenizer_2.pad_token_id


def test_folder_round_trip(pipe: StableDiffusionXLPipeline, tmp_path: Path) -> None:
    save_tiny_sdxl_folder(pipe, tmp_path / "tiny-sdxl")
    assert list((tmp_path / "tiny-sdxl").rglob("*.safetensors"))

    loaded = StableDiffusionXLPipeline.from_pretrained(
        tmp_path / "tiny-sdxl", local_files_only=True
    )

    assert_same_weights(pipe, loaded)
    assert_same_tokenizers_and_scheduler(pipe, loaded)


def test_single_file_round_trip(pipe: StableDiffusionXLPipeline, tmp_path: Path) -> None:
    config_folder = tmp_path / "config"
    single_file = tmp_path / "tiny-sdxl.safetensors"
    save_tiny_sdxl_config_folder(pipe, config_folder)
    save_tiny_sdxl_single_file(pipe, single_file, metadata={"modelspec.title": "tiny"})
    assert not list(config_folder.rglob("*.safetensors")), "the config folder holds no weights"

    loaded = load_tiny_sdxl_single_file(single_file, config_folder)

    assert_same_weights(pipe, loaded)
    assert_same_tokenizers_and_scheduler(pipe, loaded)


def test_single_file_uses_the_original_layout(
    pipe: StableDiffusionXLPipeline, tmp_path: Path
) -> None:
    path = tmp_path / "tiny-sdxl.safetensors"
    save_tiny_sdxl_single_file(pipe, path, metadata={"ss_base_model_version": "sdxl_base_v1-0"})

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"ss_base_model_version": "sdxl_base_v1-0"}
    tensors = load_file(str(path))
    prefixes = {
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    }
    assert all(any(key.startswith(p) for p in prefixes) for key in tensors)
    # Names as they appear in real SDXL base / A1111 checkpoints.
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.0.out_layers.3.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.9.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
    ):
        assert key in tensors, key
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv
    in_proj = tensors["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.shape == (3 * TE2_HIDDEN, TE2_HIDDEN)
    # The same test diffusers (and tools built on it) use to call a file SDXL base.
    assert infer_diffusers_model_type(tensors) == "xl_base"


def test_unet_key_mapping() -> None:
    cases = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
        "add_embedding.linear_1.weight": "label_emb.0.0.weight",
        "down_blocks.0.resnets.1.norm1.weight": "input_blocks.2.0.in_layers.0.weight",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": (
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k"
        ),
        "down_blocks.1.downsamplers.0.conv.weight": "input_blocks.6.0.op.weight",
        "mid_block.resnets.1.time_emb_proj.weight": "middle_block.2.emb_layers.1.weight",
        "mid_block.attentions.0.proj_out.bias": "middle_block.1.proj_out.bias",
        "up_blocks.1.resnets.2.conv_shortcut.weight": "output_blocks.5.0.skip_connection.weight",
        "up_blocks.1.attentions.2.norm.weight": "output_blocks.5.1.norm.weight",
        "up_blocks.1.upsamplers.0.conv.bias": "output_blocks.5.2.conv.bias",
        "up_blocks.2.resnets.0.conv2.weight": "output_blocks.6.0.out_layers.3.weight",
        "conv_norm_out.bias": "out.0.bias",
    }
    for diffusers_key, original in cases.items():
        assert diffusers_unet_key_to_original(diffusers_key) == original
    for bad in ("down_blocks.0.resnets.2.conv1.weight", "mid_block.resnets.0.foo", "nope"):
        with pytest.raises(KeyError):
            diffusers_unet_key_to_original(bad)


def test_unet_key_mapping_is_one_to_one(pipe: StableDiffusionXLPipeline) -> None:
    keys = list(pipe.unet.state_dict())
    assert len({diffusers_unet_key_to_original(key) for key in keys}) == len(keys)


def test_render_is_deterministic(pipe: StableDiffusionXLPipeline) -> None:
    first, second = render(pipe), render(pipe)

    assert len(first) == 2
    assert all(isinstance(image, Image.Image) and image.size == (32, 32) for image in first)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in second]
    assert first[0].tobytes() != first[1].tobytes()  # two generators, two different images


def test_build_is_deterministic_per_seed(pipe: StableDiffusionXLPipeline) -> None:
    rng_before = torch.get_rng_state()
    same = build_tiny_sdxl_pipeline(seed=0)
    other = build_tiny_sdxl_pipeline(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG was disturbed"

    assert_same_weights(pipe, same)
    for (name, want), (_, got) in zip(state_dicts(pipe), state_dicts(other), strict=True):
        assert any(not torch.equal(want[key], got[key]) for key in want), name
