"""Image-to-image on the tiny SDXL checkpoint: `image` from the inputs folder with
`denoising_strength`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from daemon.contract.family import LoadedCheckpoint, Progress
from daemon.contract.spec import RenderSpec
from daemon.output.files import read_spec
from tests.conftest import sdxl_job
from tests.support.helpers import pixels_of


def _input(path, seed: int) -> None:  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _outputs(farm) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Outputs by "IMAGE@STRENGTH" ("none@None" for text-to-image)."""
    found = {}
    for path in farm.outputs.rglob("*.png"):
        extra = read_spec(path).extra
        found[f"{extra.get('image', 'none')}@{extra.get('denoising_strength')}"] = path
    return found


def test_denoising_strength_0_keeps_the_input_and_1_ignores_it(farm) -> None:
    inputs = farm.config.paths.inputs
    _input(inputs / "a.png", 1)
    _input(inputs / "b.png", 2)
    for name, image, strength in (("keep", "a.png", 0.0), ("redraw-a", "a.png", 1.0),
                                  ("redraw-b", "b.png", 1.0), ("half", "a.png", 0.5)):
        farm.drop(f"{name}.toml", sdxl_job(count=1, seed=21, steps=4)
                  + f'image = "{image}"\ndenoising_strength = {strength}\n')
    farm.drop("text.toml", sdxl_job(count=1, seed=21, steps=4))
    assert farm.run() == 0
    out = _outputs(farm)
    assert np.array_equal(pixels_of(out["a.png@0.0"]), pixels_of(inputs / "a.png"))
    # At 1.0 the input is redrawn whole: whichever image it was, the text-to-image result.
    assert np.abs(pixels_of(out["a.png@1.0"]) - pixels_of(out["none@None"])).max() <= 1
    assert np.abs(pixels_of(out["b.png@1.0"]) - pixels_of(out["none@None"])).max() <= 1
    # In between, both the input and the text shape it.
    half = pixels_of(out["a.png@0.5"])
    assert np.abs(half - pixels_of(inputs / "a.png")).mean() > 2
    assert np.abs(half - pixels_of(out["none@None"])).mean() > 2
    parameters = Image.open(out["a.png@0.5"]).text["parameters"]
    assert "Steps: 4," in parameters and "Denoising strength: 0.5" in parameters


def test_img2img_runs_steps_times_strength(plugins, assets, tmp_path) -> None:
    sdxl = plugins.families["sdxl"]
    pipe = sdxl.load_pipeline(LoadedCheckpoint(name="tiny-sdxl", path=assets.models / "tiny-sdxl",
                                               kind="folder", config_path=None),
                              torch.device("cpu"), torch.float32)
    _input(tmp_path / "in.png", 3)
    spec = RenderSpec(family="sdxl", checkpoint="tiny-sdxl", prompt="a boat",
                      negative_prompt="", seed=4, steps=8, cfg=5.0, sampler="Euler",
                      schedule=None, width=64, height=64,
                      extra={"image": "in.png", "image_path": str(tmp_path / "in.png"),
                             "denoising_strength": 0.5})
    steps: list[tuple[int, int]] = []
    progress = Progress(8, lambda step, total: steps.append((step, total)), lambda: False)
    sdxl.render_batch(pipe, [spec], torch.device("cpu"), progress)
    # A1111 and diffusers alike: 8 steps at 0.5 run the last 4 of an 8-step schedule.
    assert [step for step, _ in steps] == [1, 2, 3, 4]


def test_image_paths_outside_inputs_and_stray_strengths_are_refused(farm, tmp_path) -> None:
    _input(tmp_path / "outside.png", 5)
    farm.drop("dotdot.toml", sdxl_job(count=1) + 'image = "../outside.png"\n')
    farm.drop("absolute.toml", sdxl_job(count=1) + f'image = "{tmp_path / "outside.png"}"\n')
    farm.drop("alone.toml", sdxl_job(count=1) + "denoising_strength = 0.5\n")
    farm.drop("range.toml", sdxl_job(count=1) + "denoising_strength = 1.5\n")
    assert farm.run() == 0
    for name in ("dotdot.toml", "absolute.toml"):
        assert "must be a path inside the inputs folder" in farm.rejection(name)
    assert "the job gives no `image`" in farm.rejection("alone.toml")
    assert "out of range" in farm.rejection("range.toml")


def test_inpainting_redraws_the_masked_part_only(farm) -> None:
    inputs = farm.config.paths.inputs
    _input(inputs / "photo.png", 7)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255  # redraw the left half
    Image.fromarray(mask).save(inputs / "left.png")
    farm.drop("inpaint.toml", sdxl_job(count=2, seed=30, steps=4)
              + 'image = "photo.png"\nmask = "left.png"\ndenoising_strength = 0.9\n')
    farm.drop("no-image.toml", sdxl_job(count=1) + 'mask = "left.png"\n')
    farm.drop("outside.toml", sdxl_job(count=1) + 'image = "photo.png"\nmask = "../left.png"\n')
    assert farm.run() == 0
    source = pixels_of(inputs / "photo.png")
    outputs = sorted(farm.outputs.rglob("*.png"))
    assert len(outputs) == 2
    for path in outputs:
        pixels = pixels_of(path)
        assert np.array_equal(pixels[:, 32:], source[:, 32:])  # kept exactly
        assert np.abs(pixels[:, :32] - source[:, :32]).mean() > 10  # redrawn
        assert read_spec(path).extra["mask"] == "left.png"
    assert "`mask` is for inpainting: the job gives no `image`" in farm.rejection("no-image.toml")
    assert "`mask` = '../left.png' must be a path inside the inputs folder" in farm.rejection(
        "outside.toml")
