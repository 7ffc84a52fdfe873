"""The example family package (examples/lorafarm-sd15), installed as a third party installs
a plugin (`make test` does `pip install -e examples/lorafarm-sd15`): Stable Diffusion 1.5
checkpoints render through the daemon with kohya SD 1.x LoRAs, A1111 weighting and clip
skip, and LoRAs of the wrong architecture are refused at intake both ways."""

from __future__ import annotations

from importlib.metadata import entry_points

import numpy as np
from lorafarm_sd15.tiny import build_tiny_sd15_pipeline, write_kohya_lora
from PIL import Image

from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from plugins.a1111_metadata import parse_infotext
from tests.support.helpers import job_text


def _job(checkpoint: str = "tiny-sd15", prompt: str = "a (red:1.3) fox BREAK snow",
         extra: str = "") -> str:
    return job_text(checkpoint=checkpoint, prompt=prompt, negative_prompt="blurry", seed=5,
                    steps=3, cfg=7.0, sampler="DPM++ 2M Karras", width=64, height=64) + extra


def _lora(name: str) -> str:
    return f'\n[[loras]]\nname = "{name}"\nstrength = 1.0\n'


def _outputs(farm) -> dict[str, Image.Image]:  # type: ignore[no-untyped-def]
    return {png.parent.name.rsplit("-", 1)[0]: Image.open(png)
            for png in farm.outputs.rglob("*.png")}


def test_the_example_is_a_separately_installed_entry_point(plugins) -> None:  # type: ignore[no-untyped-def]
    found = {ep.name: ep.value for ep in entry_points(group="lorafarm")}
    assert found["sd15"] == "lorafarm_sd15.family"
    family = plugins.family("sd15")
    assert type(family).__module__ == "lorafarm_sd15.family"
    assert family.architecture == "sd1"
    # `lorafarm plugins` lists it under its own distribution, with its family.
    listed = {entry["name"]: entry for entry in plugins.report()["loaded"]}
    assert listed["sd15"]["distribution"] == "lorafarm-sd15"
    assert listed["sd15"]["families"] == ["sd15"]


def test_both_checkpoint_forms_are_recognised(farm) -> None:  # type: ignore[no-untyped-def]
    models = farm.models()
    assert models["tiny-sd15"]["family"] == "sd15"
    assert models["tiny-sd15-single"]["family"] == "sd15"
    assert "768-wide CLIP" in models["tiny-sd15"]["reason"]


def test_an_sd15_job_with_a_kohya_lora_renders_and_says_so(farm) -> None:  # type: ignore[no-untyped-def]
    loras = farm.config.paths.loras
    loras.mkdir(parents=True, exist_ok=True)
    in_file = write_kohya_lora(build_tiny_sd15_pipeline(seed=0), loras / "fox-ink.safetensors",
                               seed=8)
    farm.drop("base.toml", _job())
    farm.drop("lora.toml", _job(extra=_lora("fox-ink")))
    farm.drop("single.toml", _job(checkpoint="tiny-sd15-single", extra=_lora("fox-ink")))
    farm.drop("skip1.toml", _job(extra="clip_skip = 1\n"))
    farm.drop("skip2.toml", _job(extra="clip_skip = 2\n"))
    farm.drop("plain.toml", _job(prompt="a red fox"))
    farm.drop("weighted.toml", _job(prompt="a (red:1.5) fox"))
    assert farm.run() == 0
    images = _outputs(farm)
    pixels = {name: np.asarray(image, dtype=np.int16) for name, image in images.items()}
    assert sorted(pixels) == ["base", "lora", "plain", "single", "skip1", "skip2", "weighted"]
    # A1111 weighting reaches the text encoder (through compel), not as literal text.
    assert np.abs(pixels["weighted"] - pixels["plain"]).max() > 0
    assert np.abs(pixels["lora"] - pixels["base"]).max() > 10  # the LoRA changes the image
    assert np.abs(pixels["skip2"] - pixels["skip1"]).max() > 10  # clip skip is applied
    # 1 is the default (the last layer); batch sizes differ, so CPU kernels may round apart.
    assert np.abs(pixels["skip1"] - pixels["base"]).max() <= 1

    jobs = {job["name"]: job for job in farm.history()}
    patches = jobs["lora"]["renders"][0]["lora_patches"]["fox-ink"]
    assert patches == {"unet": 88, "text_encoder": 8, "modules_in_file": in_file}
    assert patches["unet"] + patches["text_encoder"] == in_file
    assert jobs["single"]["renders"][0]["lora_patches"]["fox-ink"] == patches

    prompt, negative, fields = parse_infotext(images["skip2"].text["parameters"])
    assert (prompt, negative) == ("a (red:1.3) fox BREAK snow", "blurry")
    assert fields["Clip skip"] == "2" and fields["Model"] == "tiny-sd15"
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras"
    prompt, _, fields = parse_infotext(images["lora"].text["parameters"])
    assert prompt.endswith("<lora:fox-ink:1>") and "fox-ink" in fields["Lora hashes"]
    assert "Clip skip" not in fields


def test_loras_of_the_other_architecture_are_refused_at_intake(farm) -> None:  # type: ignore[no-untyped-def]
    loras = farm.config.paths.loras
    loras.mkdir(parents=True, exist_ok=True)
    write_kohya_lora(build_tiny_sd15_pipeline(seed=0), loras / "sd1-style.safetensors", seed=9)
    write_kohya_original(make_tiny_lora(seed=21, scale=2.0), loras / "xl-style.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0.safetensors"})
    farm.drop("sd1-on-xl.toml", _job(checkpoint="tiny-sdxl", extra=_lora("sd1-style")))
    farm.drop("xl-on-sd1.toml", _job(extra=_lora("xl-style")))
    farm.drop("skip3.toml", _job(extra="clip_skip = 3\n"))
    farm.drop("xl-skip1.toml", _job(checkpoint="tiny-sdxl", extra="clip_skip = 1\n"))
    assert farm.run() == 0
    assert list(farm.outputs.rglob("*.png")) == []
    refusal = farm.rejection("sd1-on-xl.toml")
    assert "LoRA 'sd1-style' is for sd15 (sd1 architecture)" in refusal and "sdxl" in refusal
    refusal = farm.rejection("xl-on-sd1.toml")
    assert "LoRA 'xl-style' is for sdxl (sdxl architecture)" in refusal and "sd1" in refusal
    assert "Stable Diffusion 1.5 takes clip skip 1, 2 only" in farm.rejection("skip3.toml")
    assert "SDXL has no clip skip setting" in farm.rejection("xl-skip1.toml")


def test_the_demo_jobs_render(farm, assets) -> None:  # type: ignore[no-untyped-def]
    jobs = sorted(assets.demo_jobs.glob("sd15-*.toml"))
    assert [job.name for job in jobs] == ["sd15-folder.toml", "sd15-single-file.toml"]
    for job in jobs:
        farm.drop(job.name, job.read_text())
    assert farm.run() == 0
    outputs = sorted(farm.outputs.rglob("*.png"))
    assert len(outputs) == 4  # count = 2 each
    for png in outputs:
        _, _, fields = parse_infotext(Image.open(png).text["parameters"])
        assert fields["Clip skip"] == "2" and fields["Model"].startswith("tiny-sd15")
