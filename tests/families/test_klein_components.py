"""FLUX.2 [klein] as ComfyUI users keep it: the transformer in models/diffusion_models, Qwen3
in models/text_encoders, the VAE in models/vae, and a diffusers config folder for the rest.

diffusers 0.42 has no single-file loader for the Flux 2 VAE (AutoencoderKLFlux2): a VAE file
is taken in diffusers' own layout only, and ComfyUI's original-layout flux2-vae.safetensors is
refused with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from daemon.contract.family import LoadedCheckpoint, RenderError
from families.flux.tiny import build_tiny_flux_pipeline
from families.flux2_klein.flux2_klein import KLEIN_COMPONENTS, Flux2KleinFamily
from families.flux2_klein.tiny import (
    build_tiny_klein_pipeline,
    save_tiny_klein_folder,
    save_tiny_klein_transformer_file,
)
from families.shared.components import choose_components, fit_problem, load_component
from families.shared.components_tiny import (
    save_config_folder,
    save_diffusers_model_file,
    save_flux2_vae_original_file,
    save_flux_ae_file,
    save_text_encoder_file,
)
from tests.families.test_model_trees import _snapshot
from tests.support.helpers import job_text, pixels_of

FAMILY = Flux2KleinFamily()


def _klein_job(name: str) -> str:
    return job_text(checkpoint=name, prompt="a paper lantern over a misty lake", seed=21, steps=2,
                    width=64, height=64)


@pytest.fixture(scope="module")
def klein() -> Any:
    # The weights of the demo's tiny-flux2-klein (seed 0, distilled).
    return build_tiny_klein_pipeline(seed=0, distilled=True)


def _comfyui_klein_tree(root: Path, pipe: Any) -> Path:
    """A ComfyUI install for Klein 4B: the BFL transformer, qwen_3_4b (transformers' names, no
    LM head: Qwen3-4B ties it to the embeddings), ComfyUI's original-layout flux2-vae, and the
    same VAE in diffusers' layout beside it."""
    models = root / "models"
    save_tiny_klein_transformer_file(pipe, models / "diffusion_models" /
                                     "flux-2-klein-4b.safetensors")
    save_text_encoder_file(pipe.text_encoder, models / "text_encoders" / "qwen_3_4b.safetensors")
    save_flux2_vae_original_file(pipe.vae, models / "vae" / "flux2-vae.safetensors")
    save_diffusers_model_file(pipe.vae, models / "vae" / "flux2-vae-diffusers.safetensors")
    return root


def _checkpoint(tree: Path, config_folder: Path, **components: Path) -> LoadedCheckpoint:
    return LoadedCheckpoint(
        name="flux-2-klein-4b", kind="single_file", config_path=config_folder,
        path=tree / "models" / "diffusion_models" / "flux-2-klein-4b.safetensors",
        components=dict(components),
        component_folders={"text_encoders": (tree / "models" / "text_encoders",
                                             tree / "models" / "clip"),
                           "vae": (tree / "models" / "vae",)})


def test_klein_split_across_comfyui_folders_renders_as_the_diffusers_folder(
        make_farm, klein: Any, tmp_path: Path) -> None:
    """The transformer file with qwen_3_4b and the diffusers-layout VAE from a ComfyUI tree
    and a config folder holding no weights renders the image the same transformer file
    renders with the complete diffusers folder as its config; each part is paired by itself,
    the original-layout VAE is passed over, and nothing in the tree changes."""
    comfy = _comfyui_klein_tree(tmp_path / "ComfyUI", klein)
    config_folder = save_config_folder(klein, tmp_path / "FLUX.2-klein-4B-configs")
    full_folder = save_tiny_klein_folder(klein, tmp_path / "FLUX.2-klein-4B")
    assert not list(config_folder.rglob("*.safetensors"))
    models = comfy / "models"
    # The same transformer once more, in a tree of its own, for the complete folder.
    other = tmp_path / "other" / "models" / "diffusion_models"
    other.mkdir(parents=True)
    shutil.copy(models / "diffusion_models" / "flux-2-klein-4b.safetensors",
                other / "klein-full.safetensors")
    with safe_open(str(models / "text_encoders" / "qwen_3_4b.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # tied: the file leaves it out
    before = _snapshot(comfy)

    farm = make_farm(paths={"comfyui": [str(comfy), str(tmp_path / "other")]}, checkpoints={
        "flux-2-klein-4b": {"config": str(config_folder)},
        "klein-full": {"config": str(full_folder)}})
    farm.drop("comfy.toml", _klein_job("flux-2-klein-4b"))
    farm.drop("folder.toml", _klein_job("klein-full"))
    assert farm.run() == 0
    assert farm.files_in("done") == ["comfy.toml", "folder.toml"], farm.files_in("rejected")
    outputs = {job["file"]: Path(job["renders"][0]["output"]) for job in farm.history()}
    # Measured: every pixel equal (the same float32 weights through the same modules).
    assert np.abs(pixels_of(outputs["comfy.toml"]) - pixels_of(outputs["folder.toml"])).max() == 0
    assert _snapshot(comfy) == before, "the ComfyUI tree was modified"

    # What was paired: the one Qwen3 file, and of the two VAE files the diffusers-layout one.
    chosen = choose_components(_checkpoint(comfy, config_folder), config_folder,
                               KLEIN_COMPONENTS)
    assert chosen == {"text_encoder": models / "text_encoders" / "qwen_3_4b.safetensors",
                      "vae": models / "vae" / "flux2-vae-diffusers.safetensors"}


def test_klein_original_layout_vae_is_refused_with_the_reason(klein: Any,
                                                               tmp_path: Path) -> None:
    """ComfyUI's flux2-vae.safetensors (original layout) named as the VAE is refused: diffusers
    has no loader for it, and its weights belong in the config folder; with vae/ weights
    there, the same tree loads."""
    comfy = _comfyui_klein_tree(tmp_path / "ComfyUI", klein)
    config_folder = save_config_folder(klein, tmp_path / "configs")
    original = comfy / "models" / "vae" / "flux2-vae.safetensors"
    problem = FAMILY.missing_requirements(_checkpoint(comfy, config_folder, vae=original))
    assert problem is not None
    assert "vae = 'flux2-vae.safetensors'" in problem and "is not the Flux 2 VAE" in problem
    assert "no single-file loader for AutoencoderKLFlux2" in problem
    assert "diffusers' own layout" in problem and "config folder (vae/)" in problem
    assert fit_problem(comfy / "models" / "vae" / "flux2-vae-diffusers.safetensors",
                       config_folder, "vae") is None

    # The VAE's weights in the config folder: the original file is not needed, nor looked at.
    klein.vae.save_pretrained(config_folder / "vae")
    checkpoint = _checkpoint(comfy, config_folder)
    assert FAMILY.missing_requirements(checkpoint) is None
    assert choose_components(checkpoint, config_folder, KLEIN_COMPONENTS) == {
        "text_encoder": comfy / "models" / "text_encoders" / "qwen_3_4b.safetensors"}


def test_klein_diffusers_layout_vae_loads_the_same_weights(klein: Any, tmp_path: Path) -> None:
    """The diffusers-layout VAE file loads into exactly the model it was saved from (the
    latent batch-norm statistics included), in the dtype asked for."""
    config_folder = save_config_folder(klein, tmp_path / "configs")
    path = save_diffusers_model_file(klein.vae, tmp_path / "flux2-vae-diffusers.safetensors")
    loaded = load_component(path, config_folder, "vae", torch.float32)
    want, got = klein.vae.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[key], got[key]) for key in want)
    assert load_component(path, config_folder, "vae", torch.bfloat16).bn.running_var.dtype \
        == torch.bfloat16


def test_klein_pairing_refuses_two_fitting_text_encoders(klein: Any, tmp_path: Path) -> None:
    """Two Qwen3 files fit (qwen_3_4b and a bf16 copy in models/clip): pairing refuses, naming
    both and the key to set; naming one of them loads."""
    comfy = _comfyui_klein_tree(tmp_path / "ComfyUI", klein)
    config_folder = save_config_folder(klein, tmp_path / "configs")
    copy = save_text_encoder_file(klein.text_encoder, comfy / "models" / "clip" /
                                  "qwen_3_4b_bf16.safetensors", dtype=torch.bfloat16)
    problem = FAMILY.missing_requirements(_checkpoint(comfy, config_folder))
    assert problem is not None
    assert "qwen_3_4b.safetensors" in problem and "qwen_3_4b_bf16.safetensors" in problem
    assert "[checkpoints.flux-2-klein-4b] text_encoder = " in problem
    assert FAMILY.missing_requirements(_checkpoint(comfy, config_folder,
                                                   text_encoder=copy)) is None


def test_flux1_files_are_not_taken_for_klein(klein: Any, tmp_path: Path) -> None:
    """Flux.1's clip_l, t5xxl and ae in the same tree fit nothing of Klein's: with no Qwen3
    file, the checkpoint is refused, saying what was looked at; named, the T5 file is refused
    as not the Qwen3 encoder; beside qwen_3_4b, they are passed over."""
    flux = build_tiny_flux_pipeline("dev", seed=0)
    comfy = _comfyui_klein_tree(tmp_path / "ComfyUI", klein)
    models = comfy / "models"
    (models / "text_encoders" / "qwen_3_4b.safetensors").unlink()
    save_text_encoder_file(flux.text_encoder, models / "text_encoders" / "clip_l.safetensors",
                           prefix="text_model.", projection=True)
    t5 = save_text_encoder_file(flux.text_encoder_2,
                                models / "text_encoders" / "t5xxl_fp16.safetensors")
    save_flux_ae_file(flux.vae, models / "vae" / "ae.safetensors")
    config_folder = save_config_folder(klein, tmp_path / "configs")

    problem = FAMILY.missing_requirements(_checkpoint(comfy, config_folder))
    assert problem is not None and "no text_encoder weights" in problem
    assert "fits the Qwen3 text encoder" in problem
    assert "clip_l.safetensors" in problem and "t5xxl_fp16.safetensors" in problem
    problem = FAMILY.missing_requirements(_checkpoint(comfy, config_folder, text_encoder=t5))
    assert problem is not None and "is not the Qwen3 text encoder" in problem
    assert "Qwen3ForCausalLM" in problem

    save_text_encoder_file(klein.text_encoder, models / "text_encoders" / "qwen_3_4b.safetensors")
    assert choose_components(_checkpoint(comfy, config_folder), config_folder,
                             KLEIN_COMPONENTS) == {
        "text_encoder": models / "text_encoders" / "qwen_3_4b.safetensors",
        "vae": models / "vae" / "flux2-vae-diffusers.safetensors"}


def test_qwen3_lm_head_may_be_left_out_tied_or_not(klein: Any, tmp_path: Path) -> None:
    """Qwen3-4B ties its LM head to the embeddings: a file without it fits and loads, and the
    head is the embedding. Qwen3-8B (Klein 9B) does not tie it, but the pipeline reads hidden
    states, never logits: a file without the head fits too, the embeddings stand in, and the
    hidden states are the same as with the head. A body weight left out is still refused. A
    prefix before transformers' names lines up either way."""
    config_folder = save_config_folder(klein, tmp_path / "configs")
    state = klein.text_encoder.state_dict()
    headless = save_text_encoder_file(klein.text_encoder, tmp_path / "qwen_3_4b.safetensors")
    assert fit_problem(headless, config_folder, "text_encoder") is None
    loaded = load_component(headless, config_folder, "text_encoder", torch.float32)
    assert torch.equal(loaded.lm_head.weight, state["model.embed_tokens.weight"])
    assert all(torch.equal(state[key], value) for key, value in loaded.state_dict().items())

    prefixed = save_text_encoder_file(klein.text_encoder, tmp_path / "prefixed.safetensors",
                                      prefix="text_encoders.qwen3_4b.transformer.")
    loaded = load_component(prefixed, config_folder, "text_encoder", torch.float32)
    assert all(torch.equal(state[key], value) for key, value in loaded.state_dict().items())

    untied = tmp_path / "untied-configs"
    shutil.copytree(config_folder, untied)
    config_path = untied / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "tie_word_embeddings": False}),
                           encoding="utf-8")
    assert fit_problem(headless, untied, "text_encoder") is None
    with_head = save_diffusers_model_file(klein.text_encoder, tmp_path / "with-head.safetensors")
    assert fit_problem(with_head, untied, "text_encoder") is None
    without = load_component(headless, untied, "text_encoder", torch.float32)
    whole = load_component(with_head, untied, "text_encoder", torch.float32)
    assert torch.equal(without.lm_head.weight, state["model.embed_tokens.weight"])
    ids = torch.tensor([[1, 5, 9, 3]])
    hidden = [m(ids, output_hidden_states=True).hidden_states for m in (without, whole)]
    assert all(torch.equal(a, b) for a, b in zip(*hidden, strict=True))

    body = {key: value for key, value in state.items()
            if key not in ("lm_head.weight", "model.norm.weight")}
    save_file(body, str(tmp_path / "no-norm.safetensors"))
    problem = fit_problem(tmp_path / "no-norm.safetensors", untied, "text_encoder")
    assert problem is not None and "model.norm.weight" in problem


def test_a_qwen3_file_without_its_embeddings_is_refused(klein: Any, tmp_path: Path) -> None:
    """A left-out LM head is filled from the embeddings; left-out embeddings are not filled
    from anything: such a file does not fit, whether the head is tied or not."""
    config_folder = save_config_folder(klein, tmp_path / "configs")
    state = klein.text_encoder.state_dict()
    body = {key: value.clone() for key, value in state.items()
            if key not in ("lm_head.weight", "model.embed_tokens.weight")}
    save_file(body, str(tmp_path / "no-embeddings.safetensors"))
    problem = fit_problem(tmp_path / "no-embeddings.safetensors", config_folder, "text_encoder")
    assert problem is not None and "model.embed_tokens.weight" in problem
    with pytest.raises(RenderError, match="model.embed_tokens.weight"):
        load_component(tmp_path / "no-embeddings.safetensors", config_folder, "text_encoder",
                       torch.float32)
