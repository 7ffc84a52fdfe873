"""Re-render from an image: a PNG or MP4 dropped into jobs/ becomes a job with its
parameters; the model and LoRAs are found by hash first, then by name."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
from PIL import Image, PngImagePlugin

from daemon.output.files import read_spec
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from tests.conftest import sdxl_job


def _ink(farm):  # type: ignore[no-untyped-def]
    return write_kohya_original(make_tiny_lora(seed=4, scale=2.0),
                                farm.config.paths.loras / "ink.safetensors",
                                metadata={"ss_sd_model_name": "sd_xl_base_1.0"})


def test_a_lorafarm_png_dropped_into_jobs_renders_the_same_image(farm) -> None:
    _ink(farm)
    farm.drop("first.toml", sdxl_job(count=1, seed=31) + '\n[[loras]]\nname = "ink"\n'
              'strength = 0.7\n')
    assert farm.run() == 0
    [original] = list(farm.outputs.rglob("*.png"))
    shutil.copy(original, farm.jobs / "again.png")
    assert farm.run() == 0
    [again] = [p for p in farm.outputs.rglob("*.png") if p != original]
    assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(again)))
    first, second = read_spec(original), read_spec(again)
    assert (second.seed, second.prompt, second.loras[0].strength) == (31, first.prompt, 0.7)
    assert farm.files_in("done") == ["again.png", "first.toml"]


def _a1111_png(path, parameters: str) -> None:  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (64, 64), "gray").save(path, pnginfo=info)


def test_an_a1111_png_re_renders_its_parameters_found_by_hash(farm, assets) -> None:
    ink = _ink(farm)
    raw = ink.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    autov3 = hashlib.sha256(raw[8 + header:]).hexdigest()[:12]
    model_hash = hashlib.sha256(
        (assets.models / "tiny-sdxl-single.safetensors").read_bytes()).hexdigest()[:10]
    daemon = farm.daemon()  # index the models and hash them (as a running daemon would)
    daemon.start()
    assert daemon.registry.model_hash("tiny-sdxl-single") == model_hash
    daemon.close()
    # Names as on the machine that made the image; the hashes are what match here.
    _a1111_png(farm.jobs / "from-a1111.png",
               "a castle on a hill <lora:inkstyle_v2:0.8>\nNegative prompt: blurry\n"
               "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 77, "
               f"Size: 64x64, Model hash: {model_hash}, Model: sd_xl_base_renamed, "
               f'Lora hashes: "inkstyle_v2: {autov3}", Version: v1.10.1')
    assert farm.run() == 0
    [png] = list(farm.outputs.rglob("*.png"))
    spec = read_spec(png)
    assert spec.checkpoint == "tiny-sdxl-single" and spec.seed == 77 and spec.steps == 3
    assert (spec.sampler, spec.schedule, spec.cfg) == ("DPM++ 2M", "Karras", 5.0)
    assert spec.prompt == "a castle on a hill" and spec.negative_prompt == "blurry"
    assert [(lora.name, lora.strength) for lora in spec.loras] == [("ink", 0.8)]


def test_what_cannot_be_resolved_is_named_in_the_error_file(farm) -> None:
    _a1111_png(farm.jobs / "stranger.png",
               "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, "
               "Model hash: 0123456789, Model: juggernautXL_v9")
    Image.new("RGB", (8, 8)).save(farm.jobs / "plain.png")
    assert farm.run() == 0
    report = farm.rejection("stranger.png")
    assert "unknown checkpoint 'juggernautXL_v9'" in report
    report = farm.rejection("plain.png")
    assert "no generation parameters" in report
