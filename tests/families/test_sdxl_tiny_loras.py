"""Tiny LoRA files for the tiny SDXL: every layout diffusers accepts patches the same modules
and renders the same image; the refusal files are refused (or load nothing), as observed with
diffusers 0.42.1 / peft 0.21.2 / transformers 5.x."""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: they read this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils.error import NoMatchingPeftModuleError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from families.sdxl.tiny import build_tiny_sdxl_pipeline
from families.sdxl.tiny_loras import (
    LORA_COMPONENTS,
    LoraWeights,
    TinyLora,
    count_patched_modules,
    make_tiny_lora,
    write_diffusers,
    write_flux_like,
    write_kohya_diffusers_names,
    write_kohya_original,
    write_loha_header_only,
    write_sd15_like,
    write_unmatched,
)

ADAPTER = "x"
SEED = 7
RANK = 4
# Mean absolute pixel change (float image in [0, 1]) a LoRA must cause to count as "clearly
# visible". Observed: 0.061 at alpha = rank, 0.052 at alpha = rank / 2.
VISIBLE_MEAN_CHANGE = 0.02
# Only for `alpha_in="up_weights"` with alpha / rank not a power of two: (up * s) @ down and
# (up @ down) * s round differently. Observed max 1.1e-6 at alpha 3 / rank 4, 0 in uint8.
BAKED_ALPHA_TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any internet connection attempt fails the test (HF_HUB_OFFLINE alone proves less)."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address!r}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def render(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    image = pipe(
        "a red lighthouse",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    ).images[0]
    return np.asarray(image, dtype=np.float32)


def freeze(pipe: StableDiffusionXLPipeline) -> None:
    # PEFT creates the UNet's LoRA parameters with requires_grad=True. With autograd
    # bookkeeping on, torch may pick other CPU kernels (outputs drift by ~5e-7) unless every
    # component is frozen after a load; lorafarm
    # freezes, so the tests do the same. (Not reproduced here: see the module report.)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)


def load(path: Path) -> StableDiffusionXLPipeline:
    pipe = build_tiny_sdxl_pipeline(0)
    pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    freeze(pipe)
    return pipe


def few_modules(lora: TinyLora, text_encoders: bool = True) -> TinyLora:
    """Two UNet modules and, per text encoder, layer 0's q_proj and out_proj: loads in
    milliseconds, where PEFT takes ~1 s to wrap all 276 modules. For tests about what gets
    patched, not about images. out_proj must be there: see test_kohya_clip_part_without_...
    """

    def clip(weights: LoraWeights) -> LoraWeights:
        if not text_encoders:
            return {}
        return {k: v for k, v in weights.items() if k.endswith(TE_LAYER_0)}

    return TinyLora(
        unet=dict(list(lora.unet.items())[:2]),
        text_encoder=clip(lora.text_encoder),
        text_encoder_2=clip(lora.text_encoder_2),
        rank=lora.rank,
        alpha=lora.alpha,
    )


TE_LAYER_0 = ("layers.0.self_attn.q_proj", "layers.0.self_attn.out_proj")


def no_counts() -> dict[str, int]:
    return dict.fromkeys(LORA_COMPONENTS, 0)


@pytest.fixture(scope="module")
def lora() -> TinyLora:
    return make_tiny_lora(seed=SEED, rank=RANK)


@pytest.fixture(scope="module")
def base_image() -> np.ndarray:
    return render(build_tiny_sdxl_pipeline(0))


@pytest.fixture(scope="module")
def diffusers_images(
    lora: TinyLora, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, np.ndarray]:
    """The reference: the diffusers file's render, and the render at adapter weight 0."""
    pipe = load(write_diffusers(lora, tmp_path_factory.mktemp("d") / "lora.safetensors"))
    assert count_patched_modules(pipe, ADAPTER) == lora.module_counts()
    with_lora = render(pipe)
    pipe.set_adapters([ADAPTER], adapter_weights=[0.0])
    return {"lora": with_lora, "weight_0": render(pipe)}


# --- content -----------------------------------------------------------------------------------


def test_tiny_lora_targets_every_attention_projection(lora: TinyLora) -> None:
    # 28 transformer blocks x (attn1 + attn2) x (q, k, v, out); CLIP-L 3 and CLIP-G 10 layers.
    assert lora.module_counts() == {"unet": 224, "text_encoder": 12, "text_encoder_2": 40}
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0" in lora.unet
    assert "encoder.layers.0.self_attn.q_proj" in lora.text_encoder  # flat CLIPTextModel
    assert "text_model.encoder.layers.9.self_attn.out_proj" in lora.text_encoder_2
    down, up = lora.unet["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert down.shape == (RANK, 48) and up.shape == (16, RANK)  # cross-attn input 16 + 32
    for weights in lora.components().values():
        for down, up in weights.values():
            assert bool(up.abs().min() > 0) and bool(down.abs().sum() > 0)
            # float16-exact, so float16 files carry the same numbers
            assert torch.equal(up.half().float(), up) and torch.equal(down.half().float(), down)
    assert lora.alpha == RANK and lora.scaling == 1.0


def test_tiny_lora_is_deterministic_and_seeded(lora: TinyLora) -> None:
    again = make_tiny_lora(seed=SEED, rank=RANK)
    other = make_tiny_lora(seed=SEED + 1, rank=RANK)
    module = "mid_block.attentions.0.transformer_blocks.2.attn1.to_v"
    pairs = zip(lora.unet[module], again.unet[module], strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(lora.unet[module][1], other.unet[module][1])
    unet_only = make_tiny_lora(seed=SEED, include_text_encoders=False)
    assert unet_only.module_counts() == {"unet": 224, "text_encoder": 0, "text_encoder_2": 0}
    with pytest.raises(ValueError, match="unknown targets"):
        make_tiny_lora(seed=SEED, targets="everything")


# --- file layouts ------------------------------------------------------------------------------


def header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        keys = {k: (handle.get_slice(k).get_dtype(), handle.get_slice(k).get_shape())
                for k in handle.keys()}
        return keys, dict(handle.metadata() or {})


def test_diffusers_file_is_the_layout_diffusers_writes(lora: TinyLora, tmp_path: Path) -> None:
    path = write_diffusers(lora, tmp_path / "d.safetensors", {"note": "tiny"})
    keys, meta = header(path)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert len(keys) == 2 * sum(lora.module_counts().values())
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == RANK and adapter["unet.lora_alpha"] == RANK
    assert "encoder.layers.0.self_attn.q_proj" in adapter["text_encoder.target_modules"]
    assert meta["format"] == "pt" and meta["note"] == "tiny"
    with pytest.raises(ValueError, match="reserved"):
        write_diffusers(lora, tmp_path / "e.safetensors", {"format": "np"})


def test_kohya_files_use_sd_scripts_names(lora: TinyLora, tmp_path: Path) -> None:
    original = write_kohya_original(lora, tmp_path / "k.safetensors", {"ss_tag": "t"})
    keys, meta = header(original)
    module = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert {f"{module}.{leaf}" for leaf in ("lora_down.weight", "lora_up.weight", "alpha")} <= set(
        keys
    )
    assert keys[f"{module}.alpha"][1] == []  # a 0-d tensor, as sd-scripts writes it
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert "lora_te2_text_model_encoder_layers_9_self_attn_out_proj.alpha" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_2_attn2_to_out_0.lora_down.weight" in keys
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v.lora_up.weight" in keys
    assert len(keys) == 3 * sum(lora.module_counts().values())
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_tag"] == "t"

    renamed = write_kohya_diffusers_names(lora, tmp_path / "kd.safetensors", dtype=torch.float16)
    keys, _ = header(renamed)
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert keys[f"{module}.lora_down.weight"] == ("F16", [RANK, 16])
    assert keys[f"{module}.alpha"] == ("F16", [])
    with pytest.raises(ValueError, match="not exactly representable"):
        write_kohya_original(
            make_tiny_lora(seed=SEED, alpha=0.1), tmp_path / "x.safetensors", dtype=torch.float16
        )


# --- what diffusers applies --------------------------------------------------------------------


def test_diffusers_file_patches_every_module_and_changes_the_image(
    diffusers_images: dict[str, np.ndarray], base_image: np.ndarray
) -> None:
    # (the fixture already checked the patched-module counts)
    assert float(np.abs(diffusers_images["lora"] - base_image).mean()) > VISIBLE_MEAN_CHANGE


def test_adapter_weight_zero_gives_the_base_image_exactly(
    diffusers_images: dict[str, np.ndarray], base_image: np.ndarray
) -> None:
    assert np.array_equal(diffusers_images["weight_0"], base_image)


Writer = Callable[[TinyLora, Path], Path]
KOHYA_LAYOUTS: dict[str, Writer] = {
    "kohya_original": lambda lora, p: write_kohya_original(lora, p),
    "kohya_diffusers_names": lambda lora, p: write_kohya_diffusers_names(lora, p),
}


@pytest.mark.parametrize("layout", sorted(KOHYA_LAYOUTS))
def test_every_layout_patches_the_same_modules_and_renders_the_same_image(
    layout: str, lora: TinyLora, diffusers_images: dict[str, np.ndarray], tmp_path: Path
) -> None:
    pipe = load(KOHYA_LAYOUTS[layout](lora, tmp_path / f"{layout}.safetensors"))
    assert count_patched_modules(pipe, ADAPTER) == lora.module_counts()
    # Same numbers, same scaling (alpha = rank here): bit-identical (observed max diff 0.0).
    assert np.array_equal(render(pipe), diffusers_images["lora"])


def test_flat_clip_l_names_and_float16_files_load_the_same_numbers(
    lora: TinyLora, tmp_path: Path
) -> None:
    # Cheap stand-ins for two more full renders (each was bit-identical when rendered):
    # CLIP-L keys without `text_model.` (a save under transformers >= 5.6) reach the same
    # modules, and a float16 kohya file ends up as the same float32 LoRA parameters.
    few = few_modules(lora)
    flat = load(write_diffusers(few, tmp_path / "flat.safetensors", te1_text_model_prefix=False))
    assert count_patched_modules(flat, ADAPTER) == few.module_counts()
    half = load(write_kohya_original(few, tmp_path / "half.safetensors", dtype=torch.float16))
    assert count_patched_modules(half, ADAPTER) == few.module_counts()
    for component, weights in few.components().items():
        model = getattr(half, component)
        for module, (down, up) in weights.items():
            layer = model.get_submodule(module)
            assert layer.lora_A[ADAPTER].weight.dtype == torch.float32
            assert torch.equal(layer.lora_A[ADAPTER].weight, down)
            assert torch.equal(layer.lora_B[ADAPTER].weight, up)


@pytest.mark.parametrize("alpha", [RANK / 2, 3.0])
def test_kohya_alpha_matches_the_diffusers_file_with_the_same_scaling(
    alpha: float, base_image: np.ndarray, tmp_path: Path
) -> None:
    lora = make_tiny_lora(seed=SEED, rank=RANK, alpha=alpha)
    kohya = render(load(write_kohya_original(lora, tmp_path / "k.safetensors")))
    baked = render(load(write_diffusers(lora, tmp_path / "b.safetensors", alpha_in="up_weights")))
    assert float(np.abs(kohya - baked).max()) <= BAKED_ALPHA_TOLERANCE
    if alpha == RANK / 2:
        # alpha / rank as PEFT scaling in both files: exact (checked once, it costs a load).
        in_metadata = render(load(write_diffusers(lora, tmp_path / "d.safetensors")))
        assert np.array_equal(kohya, in_metadata)
        assert np.array_equal(kohya, baked)  # a power-of-two scaling commutes with rounding
    assert float(np.abs(kohya - base_image).mean()) > VISIBLE_MEAN_CHANGE


def test_unet_only_lora_patches_only_the_unet(lora: TinyLora, tmp_path: Path) -> None:
    # No text-encoder keys: diffusers logs "No LoRA keys associated to CLIPTextModel..." twice
    # and loads the UNet part.
    pipe = load(write_kohya_original(few_modules(lora, text_encoders=False), tmp_path / "u.st"))
    assert count_patched_modules(pipe, ADAPTER) == {"unet": 2, "text_encoder": 0,
                                                    "text_encoder_2": 0}
    # make_tiny_lora reads shapes through the PEFT wrappers a loaded adapter put in place.
    again = make_tiny_lora(pipe, seed=SEED, rank=RANK)
    assert again.module_counts() == lora.module_counts()
    module = next(iter(lora.unet))
    assert torch.equal(again.unet[module][1], lora.unet[module][1])
    pipe.delete_adapters(ADAPTER)
    assert count_patched_modules(pipe, ADAPTER) == no_counts()


# --- what diffusers refuses or silently ignores ------------------------------------------------


def test_unmatched_module_names_raise_and_patch_nothing(tmp_path: Path) -> None:
    pipe = build_tiny_sdxl_pipeline(0)
    # peft 0.21 raises for a UNet state dict whose every target is missing; diffusers removes
    # the half-made adapter again.
    with pytest.raises(NoMatchingPeftModuleError, match="not found in the base model"):
        pipe.load_lora_weights(str(write_unmatched(tmp_path / "u.safetensors")),
                               adapter_name=ADAPTER)
    assert count_patched_modules(pipe, ADAPTER) == no_counts()


def test_partly_unmatched_names_load_silently_except_a_warning(
    lora: TinyLora, tmp_path: Path
) -> None:
    # The dangerous case: matching modules load, the others are dropped with a log warning,
    # no error. Only comparing the count with the file's module count shows it.
    few = few_modules(lora)
    # (save_file below drops the header; alpha = rank needs none)
    tensors = load_file(str(write_diffusers(few, tmp_path / "d.safetensors")))
    tensors.update(load_file(str(write_unmatched(tmp_path / "u.safetensors"))))
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    pipe = load(tmp_path / "partial.safetensors")
    assert count_patched_modules(pipe, ADAPTER) == few.module_counts()  # 2, 2, 2


def test_raw_peft_names_load_nothing_without_an_error(lora: TinyLora, tmp_path: Path) -> None:
    # Raw PEFT (`base_model.model.<module>`) is not an SDXL layout diffusers converts: the
    # loader keeps only `unet.` / `text_encoder.` / `text_encoder_2.` keys, logs "No LoRA keys
    # associated to ..." three times, and returns. Hence no write_peft_raw in the module.
    tensors = {}
    for component, weights in lora.components().items():
        prefix = "base_model.model." + ("" if component == "unet" else f"{component}.")
        for module, (down, up) in weights.items():
            tensors[f"{prefix}{module}.lora_A.weight"] = down
            tensors[f"{prefix}{module}.lora_B.weight"] = up
    save_file(tensors, str(tmp_path / "peft.safetensors"))
    pipe = load(tmp_path / "peft.safetensors")
    assert count_patched_modules(pipe, ADAPTER) == no_counts()
    assert pipe.get_list_adapters() == {}


def test_a_load_failing_midway_leaves_earlier_components_patched(
    lora: TinyLora, tmp_path: Path
) -> None:
    # CLIP-G keys without `text_model.` match no module; diffusers then fails building the
    # config (IndexError) AFTER the UNet and CLIP-L got the adapter. Callers must delete the
    # adapter on any load error.
    few = few_modules(lora)
    # (save_file below drops the header; alpha = rank needs none)
    tensors = load_file(str(write_diffusers(few, tmp_path / "d.safetensors")))
    flat = {k.replace("text_encoder_2.text_model.", "text_encoder_2."): v
            for k, v in tensors.items()}
    save_file(flat, str(tmp_path / "flat.safetensors"))
    pipe = build_tiny_sdxl_pipeline(0)
    with pytest.raises(IndexError):
        pipe.load_lora_weights(str(tmp_path / "flat.safetensors"), adapter_name=ADAPTER)
    assert count_patched_modules(pipe, ADAPTER) == {"unet": 2, "text_encoder": 2,
                                                    "text_encoder_2": 0}
    pipe.delete_adapters(ADAPTER)
    assert count_patched_modules(pipe, ADAPTER) == no_counts()


def test_kohya_clip_part_without_out_proj_fails_after_the_unet_loaded(
    lora: TinyLora, tmp_path: Path
) -> None:
    # diffusers renames kohya CLIP keys to its old `to_q_lora` form and then guesses the
    # form from the keys: without any `out_proj` module (`to_out_lora`) the guess fails.
    # sd-scripts always trains out_proj, other trainers may not.
    few = few_modules(lora)
    only_q = TinyLora(
        unet=few.unet,
        text_encoder={k: v for k, v in few.text_encoder.items() if k.endswith("q_proj")},
        text_encoder_2={},
        rank=few.rank,
        alpha=few.alpha,
    )
    pipe = build_tiny_sdxl_pipeline(0)
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        pipe.load_lora_weights(str(write_kohya_original(only_q, tmp_path / "q.safetensors")),
                               adapter_name=ADAPTER)
    assert count_patched_modules(pipe, ADAPTER) == {"unet": 2, "text_encoder": 0,
                                                    "text_encoder_2": 0}


def test_loha_file_is_refused(tmp_path: Path) -> None:
    path = write_loha_header_only(tmp_path / "loha.safetensors")
    keys, meta = header(path)
    assert any(k.endswith(".hada_w1_a") for k in keys)
    assert not any("lora_down" in k or "lora_A" in k for k in keys)
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"
    pipe = build_tiny_sdxl_pipeline(0)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    assert count_patched_modules(pipe, ADAPTER) == no_counts()


def test_flux_like_file_has_flux_tells_and_is_refused(tmp_path: Path) -> None:
    path = write_flux_like(tmp_path / "flux.safetensors")
    assert path.stat().st_size < 200_000
    keys, meta = header(path)
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"][1] == [1, 3072]
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][1] == [9216, 1]
    assert "lora_unet_double_blocks_18_img_attn_qkv.alpha" in keys
    assert "lora_unet_single_blocks_37_modulation_lin.lora_down.weight" in keys
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    pipe = build_tiny_sdxl_pipeline(0)
    with pytest.raises(NoMatchingPeftModuleError):
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    assert count_patched_modules(pipe, ADAPTER) == no_counts()


def test_sd15_like_file_has_sd1_tells_and_is_refused(tmp_path: Path) -> None:
    path = write_sd15_like(tmp_path / "sd15.safetensors")
    assert path.stat().st_size < 200_000
    keys, meta = header(path)
    assert any(k.startswith("lora_te_") for k in keys)
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys)
    assert all("transformer_blocks_0_" in k for k in keys if k.startswith("lora_unet_"))
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert keys[f"{to_k}.lora_down.weight"][1] == [1, 768]
    assert keys[f"{to_k}.lora_up.weight"][1] == [320, 1]
    assert meta["ss_base_model_version"] == "sd_v1"
    pipe = build_tiny_sdxl_pipeline(0)
    # SD1's down_blocks 1-2 / mid / up_blocks 1 attention names exist in SDXL too, so PEFT
    # matches them and fails on the shapes (768 vs SDXL's 2048 context; 48 here).
    with pytest.raises(RuntimeError, match="size mismatch"):
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    assert count_patched_modules(pipe, ADAPTER) == no_counts()
