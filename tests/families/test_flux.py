"""FLUX.1 [dev] and [schnell]: tiny checkpoints built offline and loaded back exactly (diffusers
folders and BFL single files), jobs through the hot folder with Forge's metadata, and LoRAs in
every layout users bring."""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: they read this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from sd_parsers import ParserManager

from daemon.contract.family import CheckpointSource, LoadedCheckpoint, Progress, RenderError
from daemon.contract.spec import LoraUse, RenderSpec
from daemon.formats.lora_probe import probe_lora_file
from daemon.formats.safetensors_header import read_header
from daemon.output.files import read_spec
from daemon.render.lora_patching import count_patched_modules
from families.flux.bfl import BflLayoutError, bfl_to_diffusers, diffusers_to_bfl
from families.flux.flux import (
    DEMO_DEV,
    DEMO_DEV_BFL,
    DEMO_DEV_FP8,
    DEMO_DEV_GGUF,
    DEMO_SCHNELL,
    SCHEDULER_SETTINGS,
    FluxDevFamily,
    FluxSchnellFamily,
    load_bfl_transformer,
)
from families.flux.tiny import (
    CLIP_HIDDEN,
    LORA_LAYOUTS,
    T5_HIDDEN,
    TRANSFORMER_WIDTH,
    TinyFluxLora,
    build_tiny_flux_pipeline,
    build_tiny_flux_transformer,
    make_tiny_flux_lora,
    save_tiny_flux_folder,
    save_tiny_flux_transformer_single_file,
    write_lora,
)
from families.sdxl.tiny_loras import make_tiny_lora as make_tiny_sdxl_lora
from families.sdxl.tiny_loras import write_flux_like, write_kohya_original
from tests.support.helpers import job_text, pixels_of

DEV, SCHNELL = FluxDevFamily(), FluxSchnellFamily()
CPU = torch.device("cpu")
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
XLABS_TARGETS = tuple(f"double_blocks.0.{m}" for m in (
    "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj"))


@pytest.fixture(scope="module")
def dev() -> FluxPipeline:
    return build_tiny_flux_pipeline("dev", seed=0)


@pytest.fixture(scope="module")
def dev_folder(dev: FluxPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flux") / "tiny-flux-dev"
    save_tiny_flux_folder(dev, folder)
    return folder


def _same_weights(want: torch.nn.Module, got: torch.nn.Module) -> None:
    """Every tensor present, materialised and bit-identical: a weight a loader failed to fill
    stays on the meta device or keeps its random init without any error."""
    expected, actual = want.state_dict(), got.state_dict()
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert actual[key].device.type == "cpu", key
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def _render(pipe: FluxPipeline, family: FluxDevFamily | FluxSchnellFamily = DEV,
            seeds: tuple[int, ...] = (11,), **extra: object) -> list[np.ndarray]:
    if not hasattr(pipe, "lorafarm_scheduler_config"):
        pipe.lorafarm_scheduler_config = dict(pipe.scheduler.config)
    specs = [RenderSpec(family=family.name, checkpoint="x", prompt="a red ball",
                        negative_prompt=str(extra.pop("negative_prompt", "")), seed=seed,
                        steps=2, cfg=1.0, sampler="Euler", schedule=None, width=32, height=32,
                        extra=dict(extra))
             for seed in seeds]
    return [np.asarray(image, dtype=np.int16) for image in family.render_batch(pipe, specs, CPU)]


def _infotext(path: Path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def _job(checkpoint: str = DEMO_DEV, prompt: str = "a lighthouse at dusk", extra: str = "") -> str:
    return job_text(checkpoint=checkpoint, prompt=prompt, seed=21, steps=2, width=64,
                    height=64) + extra


def _probe_lora(path: Path):  # type: ignore[no-untyped-def]
    header = read_header(path)
    return DEV.probe_lora(header, probe_lora_file(header))


def _header_only(path: Path, shapes: dict[str, tuple[int, int]],
                 metadata: dict[str, str] | None = None) -> Path:
    """A rank-1 float16 kohya-style LoRA with module -> (in, out) shapes, for probe tests."""
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        tensors[f"{module}.lora_down.weight"] = torch.zeros(1, fan_in, dtype=torch.float16)
        tensors[f"{module}.lora_up.weight"] = torch.zeros(fan_out, 1, dtype=torch.float16)
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    return path


# --- the tiny checkpoints ----------------------------------------------------------------------


def test_tiny_flux_has_flux_structure(dev: FluxPipeline) -> None:
    t = dev.transformer.config
    assert t.in_channels == 64 and dev.vae.config.latent_channels == 16
    assert dev.vae_scale_factor == 8 and dev.vae.config.use_quant_conv is False
    assert t.guidance_embeds is True and t.num_layers == 1 and t.num_single_layers == 2
    assert t.joint_attention_dim == T5_HIDDEN and t.pooled_projection_dim == CLIP_HIDDEN
    assert t.num_attention_heads * t.attention_head_dim == TRANSFORMER_WIDTH
    assert sum(t.axes_dims_rope) == t.attention_head_dim
    # CLIP pools at the first EOS: it must be this vocabulary's, and the highest id.
    assert dev.tokenizer.eos_token_id == len(dev.tokenizer) - 1
    assert dev.text_encoder.config.eos_token_id == dev.tokenizer.eos_token_id
    assert dev.tokenizer.model_max_length == 77 and dev.tokenizer_2.model_max_length == 512
    ids = dev.tokenizer_2("a red ball, 2 cubes!").input_ids
    assert ids[-1] == dev.tokenizer_2.eos_token_id and dev.tokenizer_2.unk_token_id not in ids
    assert dev.text_encoder_2.config.vocab_size >= len(dev.tokenizer_2)
    assert dict(dev.scheduler.config) | SCHEDULER_SETTINGS["dev"] == dict(dev.scheduler.config)
    schnell = build_tiny_flux_transformer("schnell", seed=0)
    assert schnell.config.guidance_embeds is False


def test_builds_are_deterministic_and_leave_the_callers_rng_alone(dev: FluxPipeline) -> None:
    rng = torch.get_rng_state()
    same = build_tiny_flux_pipeline("dev", seed=0)
    other = build_tiny_flux_pipeline("dev", seed=1)
    alone = build_tiny_flux_transformer("dev", seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    for name in COMPONENTS:
        _same_weights(getattr(dev, name), getattr(same, name))
        want, got = getattr(dev, name).state_dict(), getattr(other, name).state_dict()
        assert any(not torch.equal(want[k], got[k]) for k in want), name
    _same_weights(dev.transformer, alone)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_folder_round_trip(variant: str, tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(variant, seed=2)  # type: ignore[arg-type]
    save_tiny_flux_folder(pipe, tmp_path / "f")
    loaded = FluxPipeline.from_pretrained(tmp_path / "f", local_files_only=True)
    for name in COMPONENTS:
        _same_weights(getattr(pipe, name), getattr(loaded, name))
    for name in ("tokenizer", "tokenizer_2"):
        prompt = "A red ball, two cubes & a (cat:1.2)!"
        assert getattr(loaded, name)(prompt).input_ids == getattr(pipe, name)(prompt).input_ids
    public = {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    assert public["use_dynamic_shifting"] is (variant == "dev")


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file_round_trips_every_weight(variant: str, prefix: str, dev_folder: Path,
                                                  tmp_path: Path) -> None:
    transformer = build_tiny_flux_transformer(variant, seed=3)  # type: ignore[arg-type]
    path = tmp_path / "flux1.safetensors"
    save_tiny_flux_transformer_single_file(transformer, path, prefix=prefix,
                                           metadata={"modelspec.title": "tiny"})
    tensors = load_file(str(path))
    # diffusers' own file sniffer calls it what BFL's release is.
    assert infer_diffusers_model_type(tensors) == f"flux-{variant}"
    assert all(key.startswith(prefix) for key in tensors)

    # The base folder is dev; a schnell file still loads as schnell (no guidance weights).
    loaded = load_bfl_transformer(path, dev_folder, torch.float32)

    assert loaded.config.guidance_embeds is (variant == "dev")
    _same_weights(transformer, loaded)


def test_bfl_file_uses_the_original_names_and_shapes(dev: FluxPipeline, tmp_path: Path) -> None:
    path = tmp_path / "flux1-dev.safetensors"
    save_tiny_flux_transformer_single_file(dev.transformer, path)
    tensors = load_file(str(path))
    w = TRANSFORMER_WIDTH
    expected = {
        "img_in.weight": (w, 64), "txt_in.weight": (w, T5_HIDDEN),
        "vector_in.in_layer.weight": (w, CLIP_HIDDEN), "time_in.out_layer.bias": (w,),
        "guidance_in.in_layer.weight": (w, 256),
        "double_blocks.0.img_attn.qkv.weight": (3 * w, w),
        "double_blocks.0.txt_attn.qkv.bias": (3 * w,),
        "double_blocks.0.img_mod.lin.weight": (6 * w, w),
        "double_blocks.0.txt_mlp.2.weight": (w, 4 * w),
        "double_blocks.0.img_attn.norm.query_norm.scale": (16,),
        "single_blocks.1.linear1.weight": (7 * w, w),
        "single_blocks.1.linear2.weight": (w, 5 * w),
        "single_blocks.0.modulation.lin.weight": (3 * w, w),
        "single_blocks.0.norm.key_norm.scale": (16,),
        "final_layer.linear.weight": (64, w),
        "final_layer.adaLN_modulation.1.weight": (2 * w, w),
    }
    for key, shape in expected.items():
        assert tuple(tensors[key].shape) == shape, key
    state = dev.transformer.state_dict()
    # BFL's final modulation is (shift, scale); diffusers' norm_out is (scale, shift).
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    assert torch.equal(tensors["final_layer.adaLN_modulation.1.weight"],
                       torch.cat([shift, scale]))
    assert torch.equal(tensors["single_blocks.1.linear1.weight"][3 * w:],
                       state["single_transformer_blocks.1.proj_mlp.weight"])


def test_diffusers_own_converter_only_works_at_the_real_width(dev: FluxPipeline) -> None:
    """Why lorafarm converts BFL files itself: diffusers 0.42 splits single_blocks linear1
    with sizes hard-coded for width 3072. If this test starts failing, diffusers fixed it."""
    config = dev.transformer.config
    bfl = diffusers_to_bfl(dev.transformer.state_dict(), config.num_layers,
                           config.num_single_layers, True)
    with pytest.raises(RuntimeError, match=r"split_sizes=\[3072, 3072, 3072, 12288\]"):
        convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))


def _real_width_bfl() -> dict[str, torch.Tensor]:
    """A FLUX.1-dev-shaped BFL state dict (one block of each kind) that costs almost nothing:
    each tensor is one int16 column broadcast along its input dimension (stride 0), with
    values distinct per row and per key, so any misplaced row shows."""
    w, mlp = 3072, 12288
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, fan_out: int, fan_in: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)

    for name, fan_in in (("img_in", 64), ("txt_in", 4096), ("time_in.in_layer", 256),
                         ("vector_in.in_layer", 768), ("guidance_in.in_layer", 256)):
        linear(name, w, fan_in)
    for name in ("time_in.out_layer", "vector_in.out_layer", "guidance_in.out_layer"):
        linear(name, w, w)
    linear("final_layer.linear", 64, w)
    linear("final_layer.adaLN_modulation.1", 2 * w, w)
    for stream in ("img", "txt"):
        linear(f"double_blocks.0.{stream}_mod.lin", 6 * w, w)
        linear(f"double_blocks.0.{stream}_attn.qkv", 3 * w, w)
        linear(f"double_blocks.0.{stream}_attn.proj", w, w)
        linear(f"double_blocks.0.{stream}_mlp.0", mlp, w)
        linear(f"double_blocks.0.{stream}_mlp.2", w, mlp)
        for norm in ("query_norm", "key_norm"):
            shapes[f"double_blocks.0.{stream}_attn.norm.{norm}.scale"] = (128,)
    linear("single_blocks.0.modulation.lin", 3 * w, w)
    linear("single_blocks.0.linear1", 3 * w + mlp, w)
    linear("single_blocks.0.linear2", w, w + mlp)
    for norm in ("query_norm", "key_norm"):
        shapes[f"single_blocks.0.norm.{norm}.scale"] = (128,)
    tensors = {}
    for index, (key, shape) in enumerate(sorted(shapes.items())):
        rows = torch.arange(shape[0], dtype=torch.int32) * 7 + index * 1009
        column = (rows % 32749).to(torch.int16)
        tensors[key] = column[:, None].expand(shape) if len(shape) == 2 else column
    return tensors


def test_lorafarms_converter_matches_diffusers_at_the_real_width() -> None:
    """Real files go through lorafarm's converter; at FLUX.1's real sizes diffusers' own
    converter works, and both must give the same tensor for every key."""
    source = _real_width_bfl()
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(source))
    ours = bfl_to_diffusers(source)
    assert ours.guidance and (ours.double_blocks, ours.single_blocks) == (1, 1)
    assert ours.state_dict.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours.state_dict[key].shape == tensor.shape, key
        assert torch.equal(ours.state_dict[key], tensor), key


def test_damaged_bfl_files_are_refused_with_the_reason(dev: FluxPipeline) -> None:
    config = dev.transformer.config
    bfl = diffusers_to_bfl(dev.transformer.state_dict(), config.num_layers,
                           config.num_single_layers, True)
    missing = {k: v for k, v in bfl.items() if k != "double_blocks.0.txt_mlp.2.bias"}
    with pytest.raises(BflLayoutError, match="'double_blocks.0.txt_mlp.2.bias' is missing"):
        bfl_to_diffusers(missing)
    gap = {k: v for k, v in bfl.items() if not k.startswith("single_blocks.0.")}
    with pytest.raises(BflLayoutError, match=r"single_blocks \[0\] are missing"):
        bfl_to_diffusers(gap)
    # A scaled-fp8 save carries per-weight scales this layout has no place for.
    extra = {**bfl, "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1)}
    with pytest.raises(BflLayoutError, match="1 keys this Flux.1 layout does not know"):
        bfl_to_diffusers(extra)
    # Other components of an all-in-one file are not the transformer's business.
    full = {**{f"model.diffusion_model.{k}": v for k, v in bfl.items()},
            "vae.decoder.conv_in.weight": torch.ones(1),
            "text_encoders.clip_l.transformer.foo": torch.ones(1)}
    assert bfl_to_diffusers(full).state_dict.keys() == dev.transformer.state_dict().keys()


# --- recognition -------------------------------------------------------------------------------


def test_checkpoints_are_recognised_by_variant(dev_folder: Path, tmp_path: Path) -> None:
    save_tiny_flux_folder(build_tiny_flux_pipeline("schnell", seed=0), tmp_path / "schnell")
    for variant in ("dev", "schnell"):
        save_tiny_flux_transformer_single_file(
            build_tiny_flux_transformer(variant, seed=0),  # type: ignore[arg-type]
            tmp_path / f"{variant}.safetensors", prefix="model.diffusion_model.")

    def probes(source: CheckpointSource) -> list[str]:
        return [p.family for f in (DEV, SCHNELL) if (p := f.probe_checkpoint(source))]

    def single(path: Path) -> CheckpointSource:
        return CheckpointSource(name=path.stem, path=path, kind="single_file",
                                header=read_header(path))

    assert probes(CheckpointSource.for_folder("d", dev_folder)) == ["flux-dev"]
    assert probes(CheckpointSource.for_folder("s", tmp_path / "schnell")) == ["flux-schnell"]
    assert probes(single(tmp_path / "dev.safetensors")) == ["flux-dev"]
    assert probes(single(tmp_path / "schnell.safetensors")) == ["flux-schnell"]
    probe = DEV.probe_checkpoint(single(tmp_path / "dev.safetensors"))
    assert probe is not None and "BFL layout" in probe.reason and "dev" in probe.reason

    # FLUX.1 Fill takes 384 input channels (image + mask): not a text-to-image model.
    tensors = load_file(str(tmp_path / "dev.safetensors"))
    key = "model.diffusion_model.img_in.weight"
    tensors[key] = torch.zeros(TRANSFORMER_WIDTH, 384)
    save_file(tensors, str(tmp_path / "fill.safetensors"))
    assert probes(single(tmp_path / "fill.safetensors")) == []
    # An SDXL file is not Flux.
    lora = write_kohya_original(make_tiny_sdxl_lora(seed=0), tmp_path / "sdxl.safetensors")
    assert probes(single(lora)) == []


def test_a_single_file_says_what_it_still_needs(dev_folder: Path, tmp_path: Path) -> None:
    def need(config: Path | None) -> str | None:
        return DEV.missing_requirements(LoadedCheckpoint(
            name="flux1-dev", path=tmp_path / "flux1-dev.safetensors", kind="single_file",
            config_path=config))

    text = need(None)
    assert text is not None
    assert '[checkpoints.flux1-dev] config = "path/to/FLUX.1-dev"' in text
    assert "never downloads" in text
    assert "no readable model_index.json" in (need(tmp_path) or "")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "model_index.json").write_text(
        (dev_folder / "model_index.json").read_text())
    (config_only / "transformer").mkdir()
    (config_only / "transformer" / "config.json").write_text("{}")
    assert "no text_encoder weights" in (need(config_only) or "")
    assert need(dev_folder) is None
    assert DEV.missing_requirements(LoadedCheckpoint(
        name="x", path=dev_folder, kind="folder", config_path=None)) is None


def test_flux1_loras_are_recognised_in_every_layout(dev: FluxPipeline, tmp_path: Path) -> None:
    lora = make_tiny_flux_lora(dev, seed=1)
    xlabs = make_tiny_flux_lora(dev, seed=1, alpha=4.0, modules=XLABS_TARGETS,
                                text_encoder_modules=())
    for layout in LORA_LAYOUTS:
        path = write_lora(xlabs if layout == "xlabs" else lora,
                          tmp_path / f"{layout}.safetensors", layout)
        probe = _probe_lora(path)
        assert probe is not None, layout
        assert (probe.family, probe.architecture, probe.variant) == ("flux-dev", "flux1", None)
        assert probe.score >= 0.7 and "Flux.1 LoRA" in probe.reason, layout
    # A header-realistic sd-scripts file for the real model: blocks 18 / 37, width 3072.
    probe = _probe_lora(write_flux_like(tmp_path / "real.safetensors"))
    assert probe is not None and probe.score == 0.95
    assert "double blocks 0..18" in probe.reason and "single blocks 0..37" in probe.reason
    assert SCHNELL.probe_lora(read_header(path), probe_lora_file(read_header(path))) is None


@pytest.mark.parametrize("case, shapes", [
    # HunyuanVideo (musubi-tuner): shares double_blocks/img_attn_qkv, but fc1 and block 19
    ("hunyuan-fc1", {"lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216),
                     "lora_unet_double_blocks_0_img_mlp_fc1": (3072, 12288)}),
    ("hunyuan-deep", {"lora_unet_double_blocks_19_img_attn_qkv": (3072, 9216)}),
    ("hunyuan-single", {"lora_unet_single_blocks_39_linear1": (3072, 21504)}),
    # Flux 2: fused single-block projection, SwiGLU MLP ratio, other widths
    ("flux2-fused", {"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj":
                     (3072, 27648)}),
    ("flux2-swiglu", {"lora_unet_double_blocks_0_img_mlp_0": (3072, 18432)}),
    ("klein-9b", {"lora_unet_double_blocks_0_img_attn_qkv": (4096, 12288)}),
    # SDXL's UNet and Wan's blocks are no Flux.1 modules
    ("sdxl", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640)}),
    ("wan", {"diffusion_model.blocks.0.self_attn.q": (5120, 5120)}),
])
def test_other_models_loras_are_not_claimed(case: str, shapes: dict[str, tuple[int, int]],
                                            tmp_path: Path) -> None:
    assert _probe_lora(_header_only(tmp_path / f"{case}.safetensors", shapes)) is None


def test_metadata_naming_another_model_wins_over_ambiguous_names(tmp_path: Path) -> None:
    shapes = {"lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216)}
    plain = _probe_lora(_header_only(tmp_path / "plain.safetensors", shapes))
    assert plain is not None and plain.score == 0.6 and "HunyuanVideo" in plain.reason
    hunyuan = _header_only(tmp_path / "hy.safetensors", shapes,
                           {"modelspec.architecture": "hunyuan-video/lora"})
    assert _probe_lora(hunyuan) is None


def test_lora_strengths_cover_the_transformer_and_clip() -> None:
    assert DEV.lora_strengths(LoraUse("x", strength=0.8)) == {"transformer": 0.8,
                                                               "text_encoder": 0.8}
    assert SCHNELL.lora_strengths(LoraUse("x", strength=0.8, text_encoder_strength=0.0)) == {
        "transformer": 0.8, "text_encoder": 0.0}


# --- LoRA layouts on the tiny model --------------------------------------------------------------


def _load(pipe: FluxPipeline, source: str | dict[str, torch.Tensor], name: str) -> dict[str, int]:
    pipe.load_lora_weights(source, adapter_name=name)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)  # as the worker does: bit-exact kernels
    return count_patched_modules(pipe, name)


@pytest.mark.parametrize("layout", LORA_LAYOUTS)
def test_each_layout_patches_the_expected_modules_and_changes_the_image(
        layout: str, dev: FluxPipeline, tmp_path: Path) -> None:
    base = _render(dev)[0]
    transformer_only = make_tiny_flux_lora(dev, seed=5, text_encoder_modules=())
    lora: TinyFluxLora = (make_tiny_flux_lora(dev, seed=5, alpha=4.0, modules=XLABS_TARGETS,
                                              text_encoder_modules=())
                          if layout == "xlabs" else make_tiny_flux_lora(dev, seed=5))
    path = write_lora(lora, tmp_path / f"{layout}.safetensors", layout)
    reference = write_lora(transformer_only, tmp_path / "reference.safetensors", "diffusers")
    try:
        patched = _load(dev, DEV.lora_for_loading(path), "tested")
        assert patched == lora.expected_patches(layout)
        assert layout == "xlabs" or patched["transformer"] == 18  # q, k, v count 3 each
        with_lora = _render(dev)[0]
        assert np.abs(with_lora - base).max() > 0
        if layout != "xlabs":
            # Same transformer numbers in every layout: with CLIP switched off, the image is
            # the diffusers layout's exactly.
            dev.set_adapters(["tested"], adapter_weights=[{"transformer": 1.0,
                                                            "text_encoder": 0.0}])
            _load(dev, str(reference), "reference")
            dev.set_adapters(["tested"], adapter_weights=[{"transformer": 1.0,
                                                            "text_encoder": 0.0}])
            mine = _render(dev)[0]
            dev.set_adapters(["reference"])
            assert np.abs(_render(dev)[0] - mine).max() <= 1
    finally:
        dev.delete_adapters([n for n in ("tested", "reference")
                             if n in dev.get_list_adapters().get("transformer", [])])
    assert np.array_equal(_render(dev)[0], base)


def test_diffusers_loads_nothing_from_original_lora_A_files_without_the_rename(
        dev: FluxPipeline, tmp_path: Path) -> None:
    """A silent no-op worth a test: `diffusion_model.*.lora_A` Flux.1 files patch
    no module in diffusers 0.42, without an error. `lora_for_loading` renames them."""
    path = write_lora(make_tiny_flux_lora(dev, seed=2, text_encoder_modules=()),
                      tmp_path / "comfy.safetensors", "original_lora_A")
    try:
        assert _load(dev, str(path), "plain") == {}
    finally:
        dev.delete_adapters(["plain"])
    assert isinstance(DEV.lora_for_loading(path), dict)
    kohya = write_lora(make_tiny_flux_lora(dev, seed=2), tmp_path / "k.safetensors", "kohya")
    assert DEV.lora_for_loading(kohya) == str(kohya)  # every other layout: the path


def test_kohya_clip_attention_needs_out_proj_to_load(dev: FluxPipeline, tmp_path: Path) -> None:
    """diffusers 0.42 picks its kohya CLIP conversion by looking for `out_proj`: without it,
    q/k/v LoRAs are dropped silently and only the MLP ones load. sd-scripts always trains
    all four projections, so real files load; a count check catches the rest."""
    lora = make_tiny_flux_lora(dev, seed=4, modules=XLABS_TARGETS[:1], text_encoder_modules=(
        "encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj",
        "encoder.layers.1.mlp.fc1"))
    path = write_lora(lora, tmp_path / "no-out-proj.safetensors", "kohya")
    try:
        assert _load(dev, str(path), "partial") == {"transformer": 3, "text_encoder": 1}
    finally:
        dev.delete_adapters(["partial"])


def test_kohya_single_block_linear1_needs_the_real_width(dev: FluxPipeline,
                                                          tmp_path: Path) -> None:
    lora = make_tiny_flux_lora(dev, seed=4, modules=("single_blocks.0.linear1",),
                               text_encoder_modules=())
    with pytest.raises(ValueError, match="hard-codes"):
        write_lora(lora, tmp_path / "l1.safetensors", "kohya")
    down, up = lora.transformer["single_blocks.0.linear1"]
    path = tmp_path / "l1.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": down,
               "lora_unet_single_blocks_0_linear1.lora_up.weight": up}, str(path))
    with pytest.raises(AssertionError):  # diffusers: assert sum(dims) == up_weight.shape[0]
        dev.load_lora_weights(str(path), adapter_name="l1")
    # The same module in the diffusers layout loads at any width.
    diffusers_path = write_lora(lora, tmp_path / "l1-diffusers.safetensors", "diffusers")
    try:
        assert _load(dev, str(diffusers_path), "l1d") == {"transformer": 4}
    finally:
        dev.delete_adapters(["l1d"])


# --- rendering ---------------------------------------------------------------------------------


def test_guidance_reaches_dev_and_true_cfg_runs_real_cfg(dev: FluxPipeline) -> None:
    at_35 = _render(dev, guidance=3.5)[0]
    assert not np.array_equal(at_35, _render(dev, guidance=1.0)[0])
    assert np.array_equal(at_35, _render(dev)[0])  # the family default is 3.5
    cfg = _render(dev, guidance=3.5, true_cfg=4.0, negative_prompt="blurry")[0]
    assert not np.array_equal(cfg, at_35)
    schnell = build_tiny_flux_pipeline("schnell", seed=0)
    assert np.array_equal(_render(schnell, SCHNELL, guidance=0.0)[0],
                          _render(schnell, SCHNELL, guidance=7.0)[0])  # no guidance input
    batch = _render(dev, seeds=(11, 12))
    assert np.abs(batch[0] - at_35).max() <= 1 and not np.array_equal(batch[0], batch[1])


def test_progress_sees_every_step(dev: FluxPipeline) -> None:
    steps: list[tuple[int, int]] = []
    progress = Progress(3, lambda done, total: steps.append((done, total)), lambda: False)
    spec = RenderSpec(family="flux-dev", checkpoint="x", prompt="p", negative_prompt="",
                      seed=1, steps=3, cfg=1.0, sampler="Euler", schedule=None, width=32,
                      height=32)
    DEV.render_batch(dev, [spec], CPU, progress)
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_a_cfg_scale_fails_clearly(dev: FluxPipeline) -> None:
    spec = RenderSpec(family="flux-dev", checkpoint="x", prompt="p", negative_prompt="",
                      seed=1, steps=2, cfg=5.0, sampler="Euler", schedule=None, width=32,
                      height=32)
    with pytest.raises(RenderError, match="no CFG scale.*`guidance`.*`true_cfg`"):
        DEV.render_batch(dev, [spec], CPU)


# --- through the hot folder --------------------------------------------------------------------


def test_demo_checkpoints_render_with_forge_metadata(make_farm, assets) -> None:
    farm = make_farm(checkpoints={DEMO_DEV_BFL: {"config": str(assets.models / DEMO_DEV)}})
    farm.drop("dev.toml", _job(DEMO_DEV, prompt="a lighthouse, in the rain", extra="count = 2\n"))
    farm.drop("schnell.toml", _job(DEMO_SCHNELL))
    farm.drop("bfl.toml", _job(DEMO_DEV_BFL, extra="guidance = 2.5\n"))
    assert farm.run() == 0
    assert farm.files_in("done") == ["bfl.toml", "dev.toml", "schnell.toml"]
    pngs = {p.parent.name.rsplit("-", 1)[0] + f"/{read_spec(p).seed}": p
            for p in farm.outputs.rglob("*.png")}
    assert sorted(pngs) == ["bfl/21", "dev/21", "dev/22", "schnell/21"]

    text = _infotext(pngs["dev/21"])
    prompt, params = text.split("\n")
    assert prompt == "a lighthouse, in the rain"
    assert params.startswith("Steps: 2, Sampler: Euler, CFG scale: 1, Seed: 21, Size: 64x64")
    assert "Distilled CFG Scale: 3.5" in params and f"Model: {DEMO_DEV}" in params
    assert "Negative prompt" not in text and "Schedule type" not in text
    parsed = ParserManager().parse(pngs["dev/21"])
    assert parsed is not None and parsed.full_prompt == "a lighthouse, in the rain"
    sampler = parsed.samplers[0]
    assert float(sampler.parameters["cfg_scale"]) == 1.0 and int(sampler.parameters["seed"]) == 21
    assert sampler.model is not None and sampler.model.name == DEMO_DEV
    spec = read_spec(pngs["dev/21"])
    assert spec.family == "flux-dev" and spec.extra == {"guidance": 3.5}

    schnell = _infotext(pngs["schnell/21"])
    assert "Distilled CFG Scale" not in schnell and "CFG scale: 1" in schnell
    assert read_spec(pngs["schnell/21"]).family == "flux-schnell"
    assert read_spec(pngs["schnell/21"]).extra == {}

    assert "Distilled CFG Scale: 2.5" in _infotext(pngs["bfl/21"])
    assert read_spec(pngs["bfl/21"]).family == "flux-dev"
    # The single file's transformer is not the folder's: a different image from one seed.
    assert not np.array_equal(pixels_of(pngs["bfl/21"]), pixels_of(pngs["dev/21"]))


def test_jobs_flux_cannot_do_are_rejected_with_how_to_fix(make_farm, assets) -> None:
    # A farm whose models are the Flux folders plus a BFL transformer file with no base set.
    models = Path(assets.root) / "flux-alone-models"
    if not models.exists():
        models.mkdir()
        for name in (DEMO_DEV, DEMO_SCHNELL):
            (models / name).symlink_to(assets.models / name, target_is_directory=True)
        (models / "flux-alone.safetensors").write_bytes(
            (assets.models / f"{DEMO_DEV_BFL}.safetensors").read_bytes())
    farm = make_farm(paths={"models": str(models)})
    farm.drop("negative.toml", _job(extra='negative_prompt = "blurry"\n'))
    farm.drop("euler-a.toml", _job(extra='sampler = "Euler a"\n'))
    farm.drop("schnell-guidance.toml", _job(DEMO_SCHNELL, extra="guidance = 3.5\n"))
    farm.drop("size.toml", _job().replace("width = 64", "width = 72"))
    farm.drop("no-base.toml", _job("flux-alone"))
    farm.drop("cfg.toml", _job(extra="cfg = 3.5\n"))  # the commonest Flux mistake
    assert farm.run() == 0
    assert farm.files_in("done") == [] and not list(farm.outputs.rglob("*.png"))

    text = farm.rejection("negative.toml")
    assert "FLUX.1 [dev] takes no negative prompt" in text and "true_cfg" in text
    text = farm.rejection("euler-a.toml")
    assert "'Euler a'" in text and "does not fit a flow-matching model" in text
    assert "Euler" in text
    assert "FLUX.1 [schnell] has no embedded guidance" in farm.rejection("schnell-guidance.toml")
    assert "not a multiple of 16" in farm.rejection("size.toml")
    text = farm.rejection("no-base.toml")
    assert '[checkpoints.flux-alone] config = "path/to/FLUX.1-dev"' in text
    text = farm.rejection("cfg.toml")
    assert "distilled to run without CFG" in text and "`guidance` (default 3.5)" in text
    assert "`true_cfg`" in text


def test_a_negative_prompt_with_true_cfg_renders(farm) -> None:
    farm.drop("cfg.toml", _job(extra='negative_prompt = "blurry"\ntrue_cfg = 3.0\n'))
    assert farm.run() == 0
    [png] = list(farm.outputs.rglob("*.png"))
    spec = read_spec(png)
    assert spec.negative_prompt == "blurry" and spec.extra == {"guidance": 3.5, "true_cfg": 3.0}
    assert "Negative prompt: blurry" in _infotext(png)


def test_a_flux_lora_renders_on_dev_and_schnell_alike(farm, dev: FluxPipeline) -> None:
    loras = farm.config.paths.loras
    loras.mkdir(parents=True, exist_ok=True)
    write_lora(make_tiny_flux_lora(dev, seed=9), loras / "ink.safetensors", "kohya")
    # ComfyUI-style names with PEFT suffixes: diffusers alone would patch nothing.
    write_lora(make_tiny_flux_lora(dev, seed=9, text_encoder_modules=()),
               loras / "comfy.safetensors", "original_lora_A")
    for checkpoint in (DEMO_DEV, DEMO_SCHNELL):
        farm.drop(f"{checkpoint}-plain.toml", _job(checkpoint))
        farm.drop(f"{checkpoint}-ink.toml", _job(checkpoint, prompt="a lighthouse <lora:ink:0.8>"))
    farm.drop("comfy.toml", _job(prompt="a lighthouse <lora:comfy:1>"))
    farm.drop("zero.toml", _job(prompt="a lighthouse at dusk <lora:ink:0>"))
    assert farm.run() == 0
    assert len(farm.files_in("done")) == 6
    by_job = {p.parent.name.rsplit("-", 1)[0]: p for p in farm.outputs.rglob("*.png")}
    for checkpoint in (DEMO_DEV, DEMO_SCHNELL):
        plain, ink = by_job[f"{checkpoint}-plain"], by_job[f"{checkpoint}-ink"]
        assert not np.array_equal(pixels_of(plain), pixels_of(ink))
        text = _infotext(ink)
        assert text.startswith("a lighthouse <lora:ink:0.8>\n") and "Lora hashes: " in text
    assert not np.array_equal(pixels_of(by_job["comfy"]), pixels_of(by_job[f"{DEMO_DEV}-plain"]))
    # strength 0 is the base model bit for bit
    assert np.array_equal(pixels_of(by_job["zero"]), pixels_of(by_job[f"{DEMO_DEV}-plain"]))

    # The history records what each LoRA patched: 18 transformer modules (fused q/k/v count
    # 3 each) and CLIP-L's 5.
    patches = {job["file"]: job["renders"][0]["lora_patches"] for job in farm.history()}
    ink = patches[f"{DEMO_SCHNELL}-ink.toml"]["ink"]
    assert (ink["transformer"], ink["text_encoder"]) == (18, 5)
    assert patches["comfy.toml"]["comfy"]["transformer"] == 18


def test_build_demo_writes_both_variants_a_bfl_file_and_their_jobs(tmp_path: Path) -> None:
    dev_assets = DEV.build_demo(tmp_path, tmp_path / "configs")
    schnell_assets = SCHNELL.build_demo(tmp_path, tmp_path / "configs")
    assert (tmp_path / DEMO_DEV / "model_index.json").is_file()
    assert (tmp_path / DEMO_SCHNELL / "transformer" / "config.json").is_file()
    single = tmp_path / f"{DEMO_DEV_BFL}.safetensors"
    assert single.stat().st_size < 500_000
    # The folder's transformer quantized too (tests/families/test_quantized.py renders them).
    quantized = [f"{name}.gguf" for name in DEMO_DEV_GGUF.values()] + [
        f"{DEMO_DEV_FP8}.safetensors"]
    assert all((tmp_path / name).stat().st_size < 250_000 for name in quantized)
    assert dev_assets.checkpoint_overrides == {
        name: {"config": f"models/{DEMO_DEV}"}
        for name in (DEMO_DEV_BFL, *DEMO_DEV_GGUF.values(), DEMO_DEV_FP8)}
    jobs = {**dev_assets.jobs, **schnell_assets.jobs}
    assert sorted(jobs) == ["flux-dev-single-file.toml", "flux-dev.toml", "flux-schnell.toml",
                            *sorted(f"{name}.toml" for name in (*DEMO_DEV_GGUF.values(),
                                                                 DEMO_DEV_FP8))]
    assert "guidance = 3.5" in jobs["flux-dev.toml"]
    assert all("width = 64" in text and "count = 2" in text for text in jobs.values())
