"""Per-checkpoint presets (config.toml and sidecars) and an SDXL checkpoint's own VAE."""

from __future__ import annotations

import hashlib

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from daemon.config import ConfigError, config_from_dict
from daemon.output.files import read_spec
from families.sdxl.sdxl import SDXLFamily
from families.sdxl.tiny import build_tiny_sdxl_pipeline
from families.shared.components_tiny import save_flux_ae_file
from tests.support.helpers import job_text


def _job(checkpoint: str) -> str:
    return job_text(checkpoint=checkpoint, prompt="a lighthouse", seed=3)


def _output(farm, job: str):  # type: ignore[no-untyped-def]
    [path] = sorted(farm.outputs.glob(f"{job}-*/0*.png"))
    with Image.open(path) as image:
        return read_spec(path), image.info["parameters"]


def test_a_job_gets_the_checkpoint_preset_for_what_it_leaves_out(make_farm) -> None:
    farm = make_farm(private_models=True, checkpoints={"tiny-sdxl": {
        "steps": 3, "sampler": "Euler a", "negative_prompt": "preset negative",
        "width": 64, "height": 64}})
    # The single file's sidecar carries its own preset (beside its lineage).
    sidecar = farm.config.paths.models / "tiny-sdxl-single.toml"
    sidecar.write_text("steps = 2\ncfg = 4\nwidth = 64\nheight = 64\n")
    farm.drop("preset.toml", _job("tiny-sdxl"))
    farm.drop("own.toml", _job("tiny-sdxl")
              + 'steps = 1\nnegative_prompt = "own negative"\nwidth = 128\n')
    farm.drop("sidecar.toml", _job("tiny-sdxl-single"))
    assert farm.run() == 0
    assert {job["name"]: job["state"] for job in farm.history()} == {
        "preset": "done", "own": "done", "sidecar": "done"}
    spec, parameters = _output(farm, "preset")
    assert (spec.steps, spec.sampler, spec.width, spec.height) == (3, "Euler a", 64, 64)
    assert spec.negative_prompt == "preset negative"
    assert "Steps: 3, Sampler: Euler a" in parameters
    spec, _ = _output(farm, "own")  # the job's own values win
    assert (spec.steps, spec.negative_prompt, spec.width, spec.height) == (
        1, "own negative", 128, 64)
    spec, _ = _output(farm, "sidecar")
    assert (spec.steps, spec.cfg, spec.width) == (2, 4.0, 64)


def test_bad_presets_say_where(make_farm, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"\[checkpoints.x\]: steps = 'many' must be a "
                                          r"number from 1 to 1000"):
        config_from_dict({"checkpoints": {"x": {"steps": "many"}}}, base=tmp_path)
    farm = make_farm(private_models=True)
    (farm.config.paths.models / "tiny-sdxl-single.toml").write_text("cfg = 99\n")
    farm.drop("job.toml", _job("tiny-sdxl-single"))
    assert farm.run() == 0
    assert "sidecar tiny-sdxl-single.toml: cfg = 99 must be a number from 0 to 30" in \
        farm.rejection("job.toml")


def test_an_sdxl_checkpoint_renders_with_its_own_vae_and_refuses_a_flux_one(
        make_farm, assets) -> None:
    vaes = assets.root.parent / "vaes-for-presets"
    vaes.mkdir(exist_ok=True)
    # An SDXL VAE of other weights, in the original (LDM) layout released VAE files have.
    own_vae = build_tiny_sdxl_pipeline(seed=5).vae
    fix = save_flux_ae_file(own_vae, vaes / "tiny_sdxl_vae_fix.safetensors")
    flux_vae = AutoencoderKL.from_pretrained(assets.models / "tiny-flux-dev" / "vae")
    flux = save_flux_ae_file(flux_vae, vaes / "ae.safetensors")
    farm = make_farm(private_models=True, checkpoints={"tiny-sdxl": {"vae": str(fix)}})
    (farm.config.paths.models / "tiny-sdxl-single.toml").write_text(f'vae = "{flux}"\n')
    farm.drop("vae.toml", _job("tiny-sdxl")
              + "steps = 2\nwidth = 64\nheight = 64\n")
    farm.drop("flux-vae.toml", _job("tiny-sdxl-single")
              + "steps = 2\nwidth = 64\nheight = 64\n")
    assert farm.run() == 0
    refusal = farm.rejection("flux-vae.toml")
    assert "vae = 'ae.safetensors'" in refusal and "is not an SDXL VAE" in refusal
    spec, parameters = _output(farm, "vae")
    digest = hashlib.sha256(fix.read_bytes()).hexdigest()[:10]
    assert f"VAE hash: {digest}, VAE: tiny_sdxl_vae_fix.safetensors" in parameters
    assert spec.extra["vae_hash"] == digest
    # The pipeline really decodes with that file's weights, not the checkpoint's own.
    daemon = farm.daemon()
    daemon.start()
    try:
        info = daemon.registry.get("tiny-sdxl")
    finally:
        daemon.close()
    pipe = SDXLFamily().load_pipeline(info.loaded(), torch.device("cpu"), torch.float32)
    assert torch.equal(pipe.vae.decoder.conv_out.weight, own_vae.decoder.conv_out.weight)
    original = AutoencoderKL.from_pretrained(assets.models / "tiny-sdxl" / "vae")
    assert not torch.equal(pipe.vae.decoder.conv_out.weight, original.decoder.conv_out.weight)


def test_a_lora_s_a1111_sidecar_gives_its_weight_and_trigger_words(farm) -> None:
    import json

    from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original

    loras = farm.config.paths.loras
    write_kohya_original(make_tiny_lora(seed=2), loras / "ink.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    (loras / "ink.json").write_text(json.dumps({
        "description": "", "sd version": "SDXL", "activation text": "inkstyle, bold lines",
        "preferred weight": 0.6, "negative text": "", "notes": ""}))
    base = 'checkpoint = "tiny-sdxl"\nseed = 1\nsteps = 1\nwidth = 64\nheight = 64\n'
    daemon = farm.daemon()
    daemon.start()
    try:
        def loras_of(text: str) -> list[tuple[str, float, str]]:
            _, renders, _ = daemon.intake.resolver.parse("job.toml", text.encode())
            return [(lora.name, lora.strength, renders[0].prompt) for lora in renders[0].loras]

        assert loras_of(base + 'prompt = "a cat"\ntrigger_words = true\n'
                        '[[loras]]\nname = "ink"\n') == [
            ("ink", 0.6, "a cat, inkstyle, bold lines")]
        assert loras_of(base + 'prompt = "<lora:ink> a cat"\n') == [("ink", 0.6, "a cat")]
        assert loras_of(base + 'prompt = "<lora:ink:0.9> a cat"\n') == [("ink", 0.9, "a cat")]
        assert loras_of(base + 'prompt = "a cat"\n[[loras]]\nname = "ink"\nstrength = 1.0\n'
                        ) == [("ink", 1.0, "a cat")]
    finally:
        daemon.close()
