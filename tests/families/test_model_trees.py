"""Existing ComfyUI and A1111/Forge installs are indexed in place and rendered from, and not
a byte in them changes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from daemon.contract.family import LoadedCheckpoint
from daemon.contract.spec import RenderSpec
from daemon.plugin_api import pipeline_facts
from families.flux.flux import FluxDevFamily
from families.flux.tiny import build_tiny_flux_pipeline, save_tiny_flux_transformer_single_file
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from families.shared.components import align_keys
from families.shared.components_tiny import (
    save_config_folder,
    save_flux_ae_file,
    save_text_encoder_file,
    save_wan_vae_file,
    tiny_wan21_vae,
)
from families.wan22.tiny import (
    build_tiny_wan_pipeline,
    save_tiny_wan_folder,
    save_tiny_wan_transformer_gguf,
)
from families.wan22.wan22 import T2V_A14B, Wan22Family
from families.wan22.wan22 import demo_job as wan_demo_job
from tests.support.helpers import job_text, pixels_of


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_comfyui_and_a1111_trees_are_used_read_only(make_farm, assets, tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(assets.models / "tiny-sdxl-single.safetensors",
                comfy / "models" / "checkpoints" / "comfy-model.safetensors")
    comfy_loras = comfy / "models" / "loras"
    write_kohya_original(make_tiny_lora(seed=8), comfy_loras / "comfy-ink.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    webui = tmp_path / "stable-diffusion-webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(assets.models / "tiny-pony.safetensors",
                webui / "models" / "Stable-diffusion" / "webui-pony.safetensors")
    webui_loras = webui / "models" / "Lora"
    write_kohya_original(make_tiny_lora(seed=9), webui_loras / "webui-ink.safetensors",
                         metadata={"ss_sd_model_name": "ponyDiffusionV6XL"})
    for tree in (comfy, webui):
        (tree / "models" / "sd.ckpt").write_bytes(b"\x80pickle")  # listed, never loaded
    before = {tree: _snapshot(tree) for tree in (comfy, webui)}

    farm = make_farm(paths={"comfyui": [str(comfy)], "a1111": [str(webui)]},
                     checkpoints={"comfy-model": {"config": str(assets.configs / "tiny-sdxl")},
                                  "webui-pony": {"config": str(assets.configs / "tiny-sdxl")}})
    farm.drop("comfy.toml", 'checkpoint = "comfy-model"\nprompt = "a boat <lora:comfy-ink:0.8>"\n'
                            'seed = 1\nsteps = 2\nwidth = 64\nheight = 64\nsampler = "Euler"\n')
    farm.drop("webui.toml", 'checkpoint = "webui-pony"\nprompt = "a fox <lora:webui-ink:0.8>"\n'
                            'seed = 2\nsteps = 2\nwidth = 64\nheight = 64\n')
    assert farm.run() == 0
    assert farm.files_in("done") == ["comfy.toml", "webui.toml"], farm.files_in("rejected")
    assert len(list(farm.outputs.rglob("*.png"))) == 2
    for tree in (comfy, webui):
        assert _snapshot(tree) == before[tree], f"{tree} was modified"


# -- checkpoints split across ComfyUI's folders ------------------------------------------------


def _flux_job(name: str) -> str:
    return job_text(checkpoint=name, prompt="a lighthouse keeper reading by lamplight", seed=11,
                    steps=2, guidance=3.5, width=64, height=64)


def _comfyui_flux_tree(root: Path, pipe: Any) -> Path:
    """A ComfyUI install as users have it for Flux.1 [dev]: the BFL transformer in
    models/diffusion_models, clip_l and t5xxl in models/text_encoders, ae in models/vae."""
    models = root / "models"
    (models / "diffusion_models").mkdir(parents=True)
    save_tiny_flux_transformer_single_file(pipe.transformer,
                                           models / "diffusion_models" / "flux1-dev.safetensors")
    save_text_encoder_file(pipe.text_encoder, models / "text_encoders" / "clip_l.safetensors",
                           prefix="text_model.", projection=True)
    save_text_encoder_file(pipe.text_encoder_2,
                           models / "text_encoders" / "t5xxl_fp16.safetensors")
    save_flux_ae_file(pipe.vae, models / "vae" / "ae.safetensors")
    return root


def test_flux_split_across_comfyui_folders_renders_as_the_diffusers_folder(
        make_farm, assets, tmp_path: Path) -> None:
    """flux1-dev.safetensors + clip_l + t5xxl + ae from a ComfyUI tree, and a config folder
    with no weights at all, render the image the complete diffusers folder of the same
    weights renders; nothing in the tree changes."""
    pipe = build_tiny_flux_pipeline("dev", seed=0)  # the weights of the demo's tiny-flux-dev
    comfy = _comfyui_flux_tree(tmp_path / "ComfyUI", pipe)
    config_folder = save_config_folder(pipe, tmp_path / "FLUX.1-dev-configs")
    assert not list(config_folder.rglob("*.safetensors"))
    before = _snapshot(comfy)

    farm = make_farm(paths={"comfyui": [str(comfy)]},
                     checkpoints={"flux1-dev": {"config": str(config_folder)}})
    farm.drop("comfy.toml", _flux_job("flux1-dev"))
    farm.drop("folder.toml", _flux_job("tiny-flux-dev"))
    assert farm.run() == 0
    assert farm.files_in("done") == ["comfy.toml", "folder.toml"], farm.files_in("rejected")
    outputs = {job["file"]: Path(job["renders"][0]["output"]) for job in farm.history()}
    # PNGs are 8-bit: every pixel equal (measured: the float images are bit-identical too).
    assert np.abs(pixels_of(outputs["comfy.toml"]) - pixels_of(outputs["folder.toml"])).max() == 0
    # The checkpoint is the diffusion model file: its hash is the model hash.
    transformer_file = comfy / "models" / "diffusion_models" / "flux1-dev.safetensors"
    model_hash = hashlib.sha256(transformer_file.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {model_hash}" in Image.open(outputs["comfy.toml"]).info["parameters"]
    assert _snapshot(comfy) == before, "the ComfyUI tree was modified"
    # `lorafarm models` says which files the split checkpoint is assembled from.
    rows = farm.models()
    assert rows["flux1-dev"]["components"] == {
        "text_encoder": str(comfy / "models" / "text_encoders" / "clip_l.safetensors"),
        "text_encoder_2": str(comfy / "models" / "text_encoders" / "t5xxl_fp16.safetensors"),
        "vae": str(comfy / "models" / "vae" / "ae.safetensors")}
    assert rows["tiny-flux-dev"]["components"] == {}


def test_component_files_named_ambiguous_and_missing(make_farm, tmp_path: Path) -> None:
    """Two T5 files fit: the checkpoint that names its files renders, the one that names
    none is refused with both files and the key to set, and one naming a file that is not
    there is refused when it is indexed."""
    pipe = build_tiny_flux_pipeline("dev", seed=0)
    comfy = _comfyui_flux_tree(tmp_path / "ComfyUI", pipe)
    models = comfy / "models"
    save_text_encoder_file(pipe.text_encoder_2, models / "clip" / "t5xxl_fp8_e4m3fn.safetensors",
                           dtype=torch.bfloat16)
    for name in ("flux1-dev-named", "flux1-dev-unnamed", "flux1-dev-typo"):
        shutil.copy(models / "diffusion_models" / "flux1-dev.safetensors",
                    models / "diffusion_models" / f"{name}.safetensors")
    config_folder = save_config_folder(pipe, tmp_path / "FLUX.1-dev-configs")
    # Relative paths count from config.toml's folder, as every path there does.
    vae = str((models / "vae" / "ae.safetensors").relative_to(tmp_path))
    farm = make_farm(paths={"comfyui": [str(comfy)]}, checkpoints={
        "flux1-dev-named": {"config": str(config_folder), "text_encoder": "clip_l.safetensors",
                            "text_encoder_2": "t5xxl_fp16.safetensors", "vae": vae},
        "flux1-dev-unnamed": {"config": str(config_folder)},
        "flux1-dev-typo": {"config": str(config_folder), "vae": "ae_typo.safetensors"}})
    for name in ("named", "unnamed", "typo"):
        farm.drop(f"{name}.toml", _flux_job(f"flux1-dev-{name}"))
    assert farm.run() == 0
    assert farm.files_in("done") == ["named.toml"]

    ambiguous = farm.rejection("unnamed.toml")
    assert "t5xxl_fp16.safetensors" in ambiguous and "t5xxl_fp8_e4m3fn.safetensors" in ambiguous
    assert "[checkpoints.flux1-dev-unnamed] text_encoder_2 = " in ambiguous
    missing = farm.rejection("typo.toml")
    assert "ae_typo.safetensors" in missing and str(models / "vae") in missing
    assert "[checkpoints.flux1-dev-typo]" in missing


def test_component_keys_on_a_family_that_cannot_take_them_are_refused(
        make_farm, assets, tmp_path: Path) -> None:
    """SDXL loads its text encoders from the checkpoint (only its VAE may be a file of its
    own): a `text_encoder` key for it would be ignored without a word, so the checkpoint is
    refused, saying which key to remove."""
    clip = tmp_path / "clip_l.safetensors"
    shutil.copy(assets.models / "tiny-sdxl-single.safetensors", clip)  # any existing file
    farm = make_farm(checkpoints={"tiny-sdxl-single": {"config": str(assets.configs / "tiny-sdxl"),
                                                       "text_encoder": str(clip)}})
    farm.drop("sdxl.toml", 'checkpoint = "tiny-sdxl-single"\nprompt = "a fox"\nseed = 1\n'
                           'steps = 2\nwidth = 64\nheight = 64\n')
    assert farm.run() == 0
    assert farm.files_in("done") == [] and "sdxl.toml" in farm.files_in("rejected")
    report = farm.rejection("sdxl.toml")
    assert "text_encoder set for tiny-sdxl-single" in report
    assert "it takes only vae" in report
    assert "does not assemble its pipeline from component files" in report
    assert "remove the key" in report


def test_config_folder_without_weights_says_what_it_lacks(tmp_path: Path) -> None:
    """With no ComfyUI tree to pair from, a weights-less config folder is refused with the
    component, where it was looked for, and the key that names a file."""
    pipe = build_tiny_flux_pipeline("dev", seed=0)
    config_folder = save_config_folder(pipe, tmp_path / "configs")
    path = tmp_path / "flux1-dev.safetensors"
    save_tiny_flux_transformer_single_file(pipe.transformer, path)
    family = FluxDevFamily()
    problem = family.missing_requirements(LoadedCheckpoint(
        name="flux1-dev", path=path, kind="single_file", config_path=config_folder))
    assert problem is not None
    assert "no text_encoder weights" in problem and "paths.comfyui" in problem
    assert "[checkpoints.flux1-dev] text_encoder = " in problem
    # A file named for the wrong component says what it holds instead.
    t5 = save_text_encoder_file(pipe.text_encoder_2, tmp_path / "t5xxl.safetensors")
    problem = family.missing_requirements(LoadedCheckpoint(
        name="flux1-dev", path=path, kind="single_file", config_path=config_folder,
        components={"text_encoder": t5}))
    assert problem is not None and "is not the CLIP-L text encoder" in problem
    assert "CLIPTextModel" in problem


def test_wan_gguf_experts_with_comfyui_umt5_and_vae(make_farm, tmp_path: Path) -> None:
    """Wan 2.2 A14B as ComfyUI users have it: two GGUF experts in models/diffusion_models
    (the sidecar naming the low-noise one, UMT5 and VAE by file name), umt5_xxl in
    models/text_encoders, wan_2.1_vae in models/vae, and a config folder with no weights.
    The video equals the one from the complete diffusers folder; the tree is unchanged."""
    pipe = build_tiny_wan_pipeline(T2V_A14B, seed=0, head_dim=16)  # GGUF blocks: width 32
    # The Wan 2.1 VAE at the real layout's proportions: diffusers' converter of the
    # original layout counts its blocks (see components_tiny.tiny_wan21_vae).
    pipe.register_modules(vae=tiny_wan21_vae(seed=3))
    full = save_tiny_wan_folder(pipe, tmp_path / "Wan2.2-T2V-A14B-Diffusers")
    config_folder = save_config_folder(pipe, tmp_path / "Wan2.2-T2V-A14B-configs")
    models = tmp_path / "ComfyUI" / "models"
    high = models / "diffusion_models" / "wan2.2_t2v_high_noise_14B_Q8_0.gguf"
    low = high.with_name("wan2.2_t2v_low_noise_14B_Q8_0.gguf")
    high.parent.mkdir(parents=True)
    save_tiny_wan_transformer_gguf(pipe.transformer, high)
    save_tiny_wan_transformer_gguf(pipe.transformer_2, low)
    save_text_encoder_file(pipe.text_encoder,
                           models / "text_encoders" / "umt5_xxl_fp16.safetensors")
    save_wan_vae_file(pipe.vae, models / "vae" / "wan_2.1_vae.safetensors")
    high.with_suffix(".toml").write_text(
        f'config = "{config_folder}"\ntransformer_2 = "{low.name}"\n'
        'text_encoder = "umt5_xxl_fp16.safetensors"\nvae = "wan_2.1_vae.safetensors"\n')
    before = _snapshot(models.parent)

    farm = make_farm(paths={"comfyui": [str(models.parent)]})
    farm.drop("wan.toml", wan_demo_job(T2V_A14B, "a red boat on a lake", seed=5, count=1,
                                       checkpoint=high.stem))
    assert farm.run() == 0
    assert farm.files_in("done") == ["wan.toml"], farm.files_in("rejected")
    assert _snapshot(models.parent) == before, "the ComfyUI tree was modified"

    family, cpu = Wan22Family(), torch.device("cpu")
    folders = farm.config.paths.component_folders
    split = LoadedCheckpoint(name=high.stem, path=high, kind="gguf", config_path=config_folder,
                             transformer_2=low, component_folders=folders)
    complete = LoadedCheckpoint(name=high.stem, path=high, kind="gguf", config_path=full,
                                transformer_2=low)
    spec = RenderSpec(family="wan22", checkpoint=high.stem, prompt="a red boat on a lake",
                      negative_prompt="", seed=5, steps=2, cfg=4.0, sampler="UniPC",
                      schedule=None, width=48, height=32,
                      extra={"frames": 5, "fps": 8, "flow_shift": 3.0, "guidance_2": 3.0})
    videos, assembled = [], []
    for checkpoint in (split, complete):
        loaded = family.load_pipeline(checkpoint, cpu, torch.float32)
        [video] = family.render_batch(loaded, [spec], cpu)
        videos.append(np.stack([np.asarray(frame, dtype=np.int16) for frame in video.frames]))
        assembled.append(pipeline_facts(loaded).components)
    # Paired from the tree with nothing named; the complete folder uses its own weights.
    assert assembled == [{"text_encoder": str(models / "text_encoders" /
                                              "umt5_xxl_fp16.safetensors"),
                          "vae": str(models / "vae" / "wan_2.1_vae.safetensors")}, {}]
    # Measured: identical frames (the same float32 weights through the same modules).
    assert np.abs(videos[0] - videos[1]).max() == 0


def test_text_encoder_keys_line_up_whatever_the_prefix() -> None:
    """CLIP-L files name their tensors with `text_model.` (transformers < 5.6, ComfyUI), a
    full checkpoint's prefix, or none; the model's own names may have the level or not."""
    model = ["embeddings.token_embedding.weight", "encoder.layers.0.mlp.fc1.weight",
             "final_layer_norm.weight"]
    for prefix in ("", "text_model.", "text_encoders.clip_l.transformer.text_model."):
        keys = {prefix + key: None for key in model}
        keys[prefix + "embeddings.position_ids"] = None  # a buffer older saves carry
        keys["text_projection.weight"] = None  # the projection some saves carry
        renamed, unexpected = align_keys(keys, model)
        assert sorted(renamed.values()) == sorted(model) and unexpected == [], prefix
    with_level = ["text_model." + key for key in model]
    renamed, unexpected = align_keys(dict.fromkeys(model), with_level)
    assert sorted(renamed.values()) == sorted(with_level) and unexpected == []
    renamed, unexpected = align_keys({**dict.fromkeys(model), "lm_head.weight": None}, model)
    assert unexpected == ["lm_head.weight"]


def test_a_named_component_file_that_goes_away_makes_the_checkpoint_unusable(
        make_farm, tmp_path: Path) -> None:
    """Deleted between two scans, a named VAE file is not quietly replaced by the config
    folder's or another file: the checkpoint is unusable at once, saying which file."""
    pipe = build_tiny_flux_pipeline("dev", seed=0)
    comfy = _comfyui_flux_tree(tmp_path / "ComfyUI", pipe)
    config_folder = save_config_folder(pipe, tmp_path / "FLUX.1-dev-configs")
    farm = make_farm(paths={"comfyui": [str(comfy)]}, checkpoints={
        "flux1-dev": {"config": str(config_folder), "vae": "ae.safetensors"}})
    daemon = farm.daemon()
    daemon.start()
    try:
        before = daemon.registry.get("flux1-dev")
        assert before is not None and before.state == "ok"
        assert before.components["vae"] == comfy / "models" / "vae" / "ae.safetensors"
        (comfy / "models" / "vae" / "ae.safetensors").unlink()
        after = daemon.registry.get("flux1-dev")
        assert after is not None and after.state == "unrecognised"
        assert "ae.safetensors" in (after.reason or "") and "vae" in (after.reason or "")
    finally:
        daemon.close()


def test_parts_paired_from_the_trees_count_in_the_size_estimate(assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Before a split checkpoint first loads, its size comes from headers: the text encoders
    and VAE a family pairs from the ComfyUI tree by itself count like those in a complete
    folder, so the first batch is sized for the whole pipeline, not the transformer alone."""
    pipe = build_tiny_flux_pipeline("dev", seed=0)
    comfy = _comfyui_flux_tree(tmp_path / "ComfyUI", pipe)
    config_folder = save_config_folder(pipe, tmp_path / "FLUX.1-dev-configs")
    models = comfy / "models"
    split = LoadedCheckpoint(
        name="flux1-dev", path=models / "diffusion_models" / "flux1-dev.safetensors",
        kind="single_file", config_path=config_folder,
        component_folders={"text_encoders": (models / "text_encoders",),
                           "vae": (models / "vae",)})
    folder = LoadedCheckpoint(name="tiny-flux-dev", path=assets.models / "tiny-flux-dev",
                              kind="folder", config_path=None)
    family = FluxDevFamily()
    assert set(family.component_sources(split)) == {"text_encoder", "text_encoder_2", "vae"}
    assert family.component_sources(folder) == {}
    whole = family.weights_cost(folder, torch.float32)
    transformer_alone = family.weights_cost(
        LoadedCheckpoint(name="bare", path=split.path, kind="single_file",
                         config_path=config_folder), torch.float32)
    assert transformer_alone < 0.8 * whole  # the parts are a real share of the tiny model
    # The same weights either way, up to what the files store beside them (CLIP's position
    # ids and projection in ComfyUI's clip_l).
    estimate = family.weights_cost(split, torch.float32)
    assert abs(estimate - whole) / whole < 0.02, (estimate, whole)
