"""Hires fix on the tiny SDXL checkpoint: the `[hires]` table, its second pass, its infotext
and re-renders of A1111 images that carry hires fields."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sd_parsers import ParserManager

from daemon.contract.family import LoadedCheckpoint, Progress
from daemon.contract.spec import RenderSpec
from daemon.output.files import read_spec
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from tests.conftest import sdxl_job
from tests.e2e.test_rerender import _a1111_png
from tests.support.helpers import pixels_of

HIRES = '\n[hires]\nscale = 2\nsteps = 2\ndenoising_strength = 0.5\nupscaler = "Latent"\n'


@pytest.fixture(scope="module")
def sdxl(plugins):  # type: ignore[no-untyped-def]
    return plugins.families["sdxl"]


@pytest.fixture
def pipe(sdxl, assets):  # type: ignore[no-untyped-def]
    checkpoint = LoadedCheckpoint(name="tiny-sdxl", path=assets.models / "tiny-sdxl",
                                  kind="folder", config_path=None)
    return sdxl.load_pipeline(checkpoint, torch.device("cpu"), torch.float32)


def _spec(seed: int, prompt: str = "a red lighthouse", **hires: object) -> RenderSpec:
    table = {"scale": 2.0, "steps": 2, "denoising_strength": 0.5, "upscaler": "Latent",
             **hires}
    return RenderSpec(family="sdxl", checkpoint="tiny-sdxl", prompt=prompt,
                      negative_prompt="blurry", seed=seed, steps=3, cfg=5.0,
                      sampler="DPM++ 2M", schedule="Karras", width=64, height=64,
                      extra={"hires": table})


def test_a_hires_job_renders_at_the_target_size_with_a1111_fields(farm) -> None:
    farm.drop("hires.toml", sdxl_job(count=1, seed=5) + HIRES)
    farm.drop("plain.toml", sdxl_job(count=1, seed=5))
    assert farm.run() == 0
    by_size = {Image.open(p).size: p for p in farm.outputs.rglob("*.png")}
    assert set(by_size) == {(128, 128), (64, 64)}
    hires_png = by_size[(128, 128)]
    parameters = Image.open(hires_png).text["parameters"]
    for field in ("Hires upscale: 2", "Hires steps: 2", "Hires upscaler: Latent",
                  "Denoising strength: 0.5"):
        assert field in parameters
    # The second pass redrew the picture: it is not the small render blown up.
    blown_up = Image.open(by_size[(64, 64)]).resize((128, 128), Image.Resampling.LANCZOS)
    assert np.abs(pixels_of(Image.open(hires_png)) - pixels_of(blown_up)).mean() > 5
    # sd-parsers, which Civitai-like tools use, reads the hires fields back.
    info = ParserManager().parse(str(hires_png))
    metadata = info.metadata
    assert metadata["Hires upscale"] == "2" and metadata["Hires steps"] == "2"
    assert metadata["Hires upscaler"] == "Latent"
    assert metadata["Denoising strength"] == "0.5"


def test_the_second_pass_runs_its_steps_with_the_loras_patched(sdxl, pipe, tmp_path) -> None:
    lora = write_kohya_original(make_tiny_lora(seed=4, scale=2.0), tmp_path / "ink.safetensors")
    pipe.load_lora_weights(str(lora), adapter_name="ink")
    # Every call of one LoRA layer of the UNet, with the size of the latent it sees.
    layer = next(m for name, m in pipe.unet.named_modules()
                 if name.endswith("attn1.to_q") and hasattr(m, "lora_A"))
    seen: list[int] = []
    layer.lora_A["ink"].register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    steps: list[tuple[int, int]] = []
    progress = Progress(3, lambda step, total: steps.append((step, total)), lambda: False)
    [image] = sdxl.render_batch(pipe, [_spec(9, steps=4)], torch.device("cpu"), progress)
    assert image.size == (128, 128)
    # 3 first-pass steps, then exactly the 4 hires steps (at 0.5, diffusers alone would run 2).
    assert steps == [(n, 7) for n in range(1, 8)]
    # The LoRA layer ran in every step of both passes, the last 4 on the 4x larger latent.
    assert len(seen) == 7 and seen[3:] == [4 * seen[0]] * 4


def test_a_batch_of_hires_renders_equals_the_renders_alone(sdxl, pipe) -> None:
    device = torch.device("cpu")
    for upscaler in ("Latent", "Lanczos"):
        specs = [_spec(11, upscaler=upscaler), _spec(12, "a blue boat", upscaler=upscaler)]
        together = sdxl.render_batch(pipe, specs, device)
        alone = [sdxl.render_batch(pipe, [spec], device)[0] for spec in specs]
        for a, b in zip(together, alone, strict=True):
            assert a.size == (128, 128)
            assert np.abs(pixels_of(a) - pixels_of(b)).max() <= 1, upscaler
        assert np.abs(pixels_of(together[0]) - pixels_of(together[1])).mean() > 1


def test_hires_settings_are_checked_at_intake(make_farm) -> None:
    farm = make_farm(limits={"max_width": 256, "max_height": 256})
    farm.drop("both.toml", sdxl_job(count=1) + "\n[hires]\nscale = 2\nwidth = 128\n")
    farm.drop("esrgan.toml", sdxl_job(count=1) + '\n[hires]\nscale = 2\nupscaler = "4x-Ultra"\n')
    farm.drop("typo.toml", sdxl_job(count=1) + "\n[hires]\nscael = 2\n")
    farm.drop("toobig.toml", sdxl_job(count=1) + "\n[hires]\nscale = 8\nsteps = 1\n")
    farm.drop("resize.toml", sdxl_job(count=1, seed=3) + "\n[hires]\nwidth = 96\nheight = 0\n"
              "steps = 1\n")
    assert farm.run() == 0
    assert "both `scale` and `width`/`height`" in farm.rejection("both.toml")
    assert "'4x-Ultra' is not an upscaler" in farm.rejection("esrgan.toml")
    assert "did you mean `scale`?" in farm.rejection("typo.toml")
    assert "hires size 512x512 is out of range (64 to 256x256" in farm.rejection("toobig.toml")
    [png] = list(farm.outputs.rglob("*.png"))
    assert Image.open(png).size == (96, 96)
    assert "Hires resize: 96x0" in Image.open(png).text["parameters"]


def test_an_a1111_png_with_hires_fields_re_renders_with_them(farm) -> None:
    _a1111_png(farm.jobs / "civitai.png",
               "a castle on a hill\nNegative prompt: blurry\n"
               "Steps: 3, Sampler: Euler a, CFG scale: 5, Seed: 77, Size: 64x64, "
               "Model: tiny-sdxl, Denoising strength: 0.4, "
               "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: 4x-UltraSharp, "
               "ADetailer model: face_yolov8n.pt, Version: v1.10.1")
    assert farm.run() == 0
    [png] = list(farm.outputs.rglob("*.png"))
    assert Image.open(png).size == (96, 96)
    spec = read_spec(png)
    assert spec.extra["hires"] == {"scale": 1.5, "steps": 2, "denoising_strength": 0.4,
                                   "upscaler": "Lanczos", "upscaler_fallback": "Lanczos"}
    parameters = Image.open(png).text["parameters"]
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos" in parameters
    # What lorafarm cannot do is named in the job's warnings, never dropped silently.
    [job] = farm.history()
    assert any("`ADetailer model: face_yolov8n.pt` is not honoured" in warning
               for warning in job["warnings"])
    assert any("hires upscaler '4x-UltraSharp' is not available here; the hires pass "
               "upscales with Lanczos instead" in warning for warning in job["warnings"])


def test_a_lorafarm_hires_png_re_renders_the_same_image(farm) -> None:
    resize = HIRES.replace("scale = 2", "width = 96\nheight = 128")
    farm.drop("first.toml", sdxl_job(count=1, seed=8) + resize)
    assert farm.run() == 0
    [original] = list(farm.outputs.rglob("*.png"))
    assert Image.open(original).size == (96, 128)
    assert "Hires resize: 96x128" in Image.open(original).text["parameters"]
    shutil.copy(original, farm.jobs / "again.png")
    assert farm.run() == 0
    [again] = [p for p in farm.outputs.rglob("*.png") if p != original]
    assert np.array_equal(pixels_of(Image.open(original)), pixels_of(Image.open(again)))
    assert read_spec(again).extra["hires"] == read_spec(original).extra["hires"]


def test_flux_takes_the_hires_fix_too(plugins, assets, farm) -> None:
    flux = plugins.families["flux-dev"]
    pipe = flux.load_pipeline(LoadedCheckpoint(name="tiny-flux-dev",
                                               path=assets.models / "tiny-flux-dev",
                                               kind="folder", config_path=None),
                              torch.device("cpu"), torch.float32)
    device = torch.device("cpu")
    for upscaler in ("Latent", "Nearest"):
        specs = [RenderSpec(family="flux-dev", checkpoint="tiny-flux-dev", prompt=prompt,
                            negative_prompt="", seed=seed, steps=2, cfg=1.0, sampler="Euler",
                            schedule=None, width=64, height=64,
                            extra={"guidance": 3.5,
                                   "hires": {"scale": 1.5, "steps": 3, "upscaler": upscaler,
                                             "denoising_strength": 0.4}})
                 for seed, prompt in ((1, "a lighthouse"), (2, "a boat"))]
        steps: list[int] = []
        progress = Progress(2, lambda step, _total, seen=steps: seen.append(step),
                            lambda: False)
        together = flux.render_batch(pipe, specs, device, progress)
        # 2 first-pass steps, then exactly the 3 hires steps (Flux's img2img rounds up).
        assert steps == [1, 2, 3, 4, 5]
        alone = [flux.render_batch(pipe, [spec], device)[0] for spec in specs]
        for a, b in zip(together, alone, strict=True):
            assert a.size == (96, 96)
            assert np.abs(pixels_of(a) - pixels_of(b)).max() <= 1, upscaler
    # Through a job: the infotext carries the hires fields beside Forge's Distilled CFG.
    farm.drop("flux.toml", 'checkpoint = "tiny-flux-dev"\nprompt = "a cat"\nseed = 3\n'
              'steps = 2\nwidth = 64\nheight = 64\n[hires]\nscale = 2\nupscaler = "Lanczos"\n')
    assert farm.run() == 0
    [png] = list(farm.outputs.rglob("*.png"))
    assert Image.open(png).size == (128, 128)
    parameters = Image.open(png).text["parameters"]
    assert "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Lanczos" in parameters


def test_an_onnx_upscaler_of_the_postprocess_chain_serves_the_hires_pass(farm) -> None:
    from tests.e2e.test_onnx_postprocess import run_with_chain, upscaler

    model = upscaler(farm.root / "onnx" / "up2x.onnx")  # nearest neighbour, 2x
    for name in ("up2x", "Nearest", "Lanczos"):
        farm.drop(f"{name}.toml", sdxl_job(count=1, seed=6)
                  + HIRES.replace('"Latent"', f'"{name}"'))
    assert run_with_chain(farm, [{"model": str(model), "kind": "upscale"}]) == 0
    made = {p.parent.name.rsplit("-", 1)[0]: p for p in farm.outputs.rglob("*.png")}
    # The hires pass ran at 128 (the model's 2x, exactly Nearest's pixels); the chain then
    # upscaled every output 2x again, as it does for every image.
    assert {Image.open(p).size for p in made.values()} == {(256, 256)}
    assert read_spec(made["up2x"]).extra["hires_upscaler_model"] == str(model)
    assert "Hires upscaler: up2x" in Image.open(made["up2x"]).text["parameters"]
    assert np.array_equal(pixels_of(Image.open(made["up2x"])),
                          pixels_of(Image.open(made["Nearest"])))
    assert not np.array_equal(pixels_of(Image.open(made["up2x"])),
                              pixels_of(Image.open(made["Lanczos"])))


def test_a_hires_render_costs_the_memory_of_its_second_pass(sdxl) -> None:
    plain = replace(_spec(1), extra={})
    # The scheduler sizes batches by this: the 2x second pass holds 4x the latent.
    assert abs(sdxl.batch_cost(_spec(1)) - 4 * sdxl.batch_cost(plain)) <= 4
