"""Quantized bases: GGUF (Q8_0, Q4_0) and FP8 transformers as users download them, rendered
through the hot folder beside the unquantized original of the same weights, with LoRAs on
top, and the files that cannot be used refused with the reason.

Tolerances were measured on the tiny demo models (one CPU thread, 2 steps) and are asserted
with a margin; each is also checked against what other weights (or another seed) do to the
same job, so "close" means close on the scale that matters. |diff| in 8-bit levels:

* FLUX.1 [dev] PNGs (64x64) vs the folder's render: GGUF Q8_0 mean 0.010, max 1; GGUF Q4_0
  mean 0.20, max 2; FP8 e4m3fn mean 0.85, max 10. Another transformer: mean 27.
* Wan 2.2 T2V-A14B GGUF expert pairs, frames before H.264 (48x32x5): Q8_0 mean 0.006, max 1;
  Q4_0 mean 0.12, max 9. Decoded from the MP4s (64x64x5) the encoder magnifies these to mean
  0.55 (Q8_0) and 1.2 (Q4_0), max 16, beside 4.1 for another seed.
* FLUX.2 [klein] GGUF Q8_0 (only the single blocks' output projections fit 32-wide blocks at
  the tiny width): mean 0.003, max 1 from the folder (asserted: 0.05, 2).
* HunyuanVideo (32 wide), frames before H.264 (32x32x5): GGUF Q8_0 mean 0.015, max 1; Q4_0
  mean 0.35, max 4; FP8 e4m3fn mean 0.62, max 6 (asserted: (0.05, 2), (0.7, 8), (1.5, 16)).
  Decoded from the MP4s (64x64x5) the encoder magnifies these to mean 2.0 (Q8_0), 2.1 (Q4_0)
  and 2.5 (FP8), max 19, beside 29 for another seed.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import av
import gguf
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sqlalchemy import select

from daemon.config import ConfigError, config_from_dict
from daemon.contract.family import LoadedCheckpoint, RenderError
from daemon.contract.spec import LoraUse, RenderSpec
from daemon.formats.quantization import checkpoint_quantization, resident_weight_bytes
from daemon.output.files import read_spec
from daemon.render.lora_patching import AdapterState, apply_loras, count_patched_modules
from daemon.store.models import Checkpoint, Render, Store
from families.flux.flux import DEMO_DEV, DEMO_DEV_BFL, DEMO_DEV_FP8, DEMO_DEV_GGUF, FluxDevFamily
from families.flux.tiny import build_tiny_flux_pipeline, make_tiny_flux_lora, write_lora
from families.flux2_klein.flux2_klein import Flux2KleinFamily
from families.flux2_klein.tiny import (
    build_tiny_klein_pipeline,
    diffusers_transformer_to_original,
    save_tiny_klein_folder,
)
from families.hunyuan_video.hunyuan_video import DEMO_FP8 as HV_FP8
from families.hunyuan_video.hunyuan_video import DEMO_GGUF as HV_GGUF
from families.hunyuan_video.hunyuan_video import DEMO_GGUF_BASE as HV_BASE
from families.hunyuan_video.hunyuan_video import DEMO_V10 as HV_FOLDER
from families.hunyuan_video.hunyuan_video import HunyuanVideoFamily
from families.hunyuan_video.tiny import (
    GGUF_HEADS,
    build_tiny_hunyuan_video_pipeline,
    hunyuan_transformer_to_original,
    make_tiny_hunyuan_lora,
    write_hunyuan_lora,
)
from families.shared.quantized import Float8Linear
from families.shared.quantized_tiny import write_gguf
from families.wan22.tiny import build_tiny_wan_pipeline, make_tiny_wan_lora, write_wan_lora
from families.wan22.wan22 import DEMO_GGUF_BASE, DEMO_GGUF_PAIRS, T2V_A14B, Wan22Family
from tests.support.helpers import job_text, pixels_of

CPU = torch.device("cpu")
DEV, WAN, KLEIN, HV = FluxDevFamily(), Wan22Family(), Flux2KleinFamily(), HunyuanVideoFamily()
Q8, Q4 = DEMO_DEV_GGUF["Q8_0"], DEMO_DEV_GGUF["Q4_0"]
WAN_Q8, WAN_Q4 = DEMO_GGUF_PAIRS["Q8_0"][0], DEMO_GGUF_PAIRS["Q4_0"][0]


def _flux_job(checkpoint: str, prompt: str = "a lighthouse at dusk") -> str:
    return job_text(checkpoint=checkpoint, prompt=prompt, seed=21, steps=2, width=64, height=64)


def _wan_job(checkpoint: str, prompt: str = "a red boat on a lake", seed: int = 21) -> str:
    # 2 steps at flow shift 3: one step on each expert (see tests/families/test_wan22.py).
    return job_text(checkpoint=checkpoint, prompt=prompt, seed=seed, steps=2, flow_shift=3.0,
                    width=64, height=64, frames=5, fps=8)


def _infotext(path: Path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24")
                         for frame in container.decode(video=0)]).astype(np.int16)


def _outputs(farm: Any, suffix: str) -> dict[str, Path]:
    """The first output of each job, by job name (outputs/<job>-<id>/...)."""
    found: dict[str, Path] = {}
    for path in sorted(farm.outputs.rglob(f"*{suffix}")):
        found.setdefault(path.parent.name.rsplit("-", 1)[0], path)
    return found


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    delta = np.abs(a - b)
    return float(delta.mean()), int(delta.max())


def _render_specs(farm: Any) -> dict[str, dict[str, Any]]:
    """Each render's spec as the history stores it (the database row), by checkpoint."""
    store = Store.for_path(farm.config.paths.database, writer=False)
    with store.session() as session:
        specs = {row.checkpoint: json.loads(row.spec_json)
                 for row in session.scalars(select(Render))}
    store.dispose()
    return specs


# --- Flux.1: GGUF Q8_0, Q4_0 and FP8 through the hot folder --------------------------------


def test_quantized_flux_renders_close_to_the_original_with_the_quantization_recorded(
        farm: Any) -> None:
    for checkpoint in (DEMO_DEV, Q8, Q4, DEMO_DEV_FP8, DEMO_DEV_BFL):
        farm.drop(f"{checkpoint}.toml", _flux_job(checkpoint))
    assert farm.run() == 0
    assert len(farm.files_in("done")) == 5, farm.files_in("failed")
    pngs = _outputs(farm, ".png")
    original = pixels_of(pngs[DEMO_DEV])
    other_weights, _ = _diff(pixels_of(pngs[DEMO_DEV_BFL]), original)
    measured = {name: _diff(pixels_of(pngs[name]), original) for name in (Q8, Q4, DEMO_DEV_FP8)}
    print("Flux |quantized - original| (mean, max), 8-bit:", measured,  # shown with -s
          "other weights:", other_weights)
    for name, (mean_limit, max_limit) in {Q8: (0.05, 2), Q4: (0.5, 4),
                                          DEMO_DEV_FP8: (2.0, 24)}.items():
        mean, largest = measured[name]
        assert mean <= mean_limit and largest <= max_limit, (name, mean, largest)
        assert mean < other_weights / 10, (name, mean, other_weights)
    # Fewer bits, further away.
    assert measured[Q8][0] < measured[Q4][0]

    labels = {Q8: "GGUF Q8_0", Q4: "GGUF Q4_0", DEMO_DEV_FP8: "FP8 e4m3fn"}
    specs = _render_specs(farm)
    for name, label in labels.items():
        params = _infotext(pngs[name]).splitlines()[-1]
        assert f"Quantization: {label}" in params and f"Model: {name}" in params
        assert params.index("Distilled CFG Scale") < params.index("Quantization")
        assert read_spec(pngs[name]).extra == {"guidance": 3.5, "quantization": label}
        assert specs[name]["extra"]["quantization"] == label  # the history's record
    # Unquantized checkpoints record nothing about it.
    assert "Quantization" not in _infotext(pngs[DEMO_DEV])
    assert "quantization" not in specs[DEMO_DEV]["extra"]

    rows = farm.models()
    assert rows[Q8]["kind"] == "gguf" and rows[Q8]["family"] == "flux-dev"
    assert "GGUF Q8_0 (Q8_0 " in rows[Q8]["reason"]
    assert rows[DEMO_DEV_FP8]["kind"] == "single_file"
    assert "FP8 e4m3fn (F8_E4M3 " in rows[DEMO_DEV_FP8]["reason"]


def test_a_lora_patches_quantized_flux_unfused_and_changes_the_image(farm: Any) -> None:
    lora = make_tiny_flux_lora(build_tiny_flux_pipeline("dev", seed=0), seed=9)
    write_lora(lora, farm.config.paths.loras / "ink.safetensors", "kohya")
    for checkpoint in (Q8, Q4, DEMO_DEV_FP8):
        farm.drop(f"{checkpoint}-plain.toml", _flux_job(checkpoint))
        farm.drop(f"{checkpoint}-ink.toml", _flux_job(checkpoint, "a lighthouse <lora:ink:1>"))
    assert farm.run() == 0
    assert len(farm.files_in("done")) == 6, farm.files_in("failed")
    pngs = _outputs(farm, ".png")
    patches = {job["file"]: job["renders"][0]["lora_patches"] for job in farm.history()}
    for checkpoint in (Q8, Q4, DEMO_DEV_FP8):
        plain, ink = pixels_of(pngs[f"{checkpoint}-plain"]), pixels_of(pngs[f"{checkpoint}-ink"])
        assert _diff(plain, ink)[0] > 0.5, checkpoint
        report = patches[f"{checkpoint}-ink.toml"]["ink"]
        # As on the unquantized model: 18 transformer modules (fused q/k/v count 3 each),
        # CLIP-L's 5.
        assert (report["transformer"], report["text_encoder"]) == (18, 5), checkpoint
        text = _infotext(pngs[f"{checkpoint}-ink"])
        assert "Lora hashes: " in text and "Quantization: " in text


@pytest.mark.parametrize("name, kind, layer", [(f"{Q4}.gguf", "gguf", "GGUFLinear"),
                                               (f"{DEMO_DEV_FP8}.safetensors", "single_file",
                                                "Float8Linear")])
def test_lora_layers_wrap_the_quantized_layers_which_stay_quantized(
        assets: Any, tmp_path: Path, name: str, kind: str, layer: str) -> None:
    from diffusers.quantizers.gguf.utils import GGUFParameter
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = assets.models / name
    checkpoint = LoadedCheckpoint(name=path.stem, path=path, kind=kind,
                                  config_path=assets.models / DEMO_DEV)
    pipe = DEV.load_pipeline(checkpoint, CPU, torch.float32)
    transformer = pipe.transformer
    quantized = [m for m in transformer.modules() if type(m).__name__ == layer]
    assert len(quantized) >= 18  # every block linear
    if kind == "gguf":
        assert all(isinstance(m.weight, GGUFParameter) for m in quantized)
    else:  # FP8: the file's bytes, one per weight, widened per forward only
        assert all(isinstance(m, Float8Linear) and m.weight.dtype == torch.uint8
                   for m in quantized)
    before = {n: p.clone() for n, p in transformer.named_parameters()}

    lora = write_lora(make_tiny_flux_lora(build_tiny_flux_pipeline("dev", seed=0), seed=9),
                      tmp_path / "ink.safetensors", "kohya")
    use = LoraUse(name="ink", strength=0.8, autov3="0123456789ab")
    report = apply_loras(pipe, DEV, (use,), {"ink": lora}, AdapterState())
    assert report["ink"]["transformer"] == 18
    assert count_patched_modules(pipe, "lf_0123456789ab_auto") == {"transformer": 18,
                                                                    "text_encoder": 5}
    wrapped = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
    assert {type(m.get_base_layer()).__name__ for m in wrapped} == {layer}
    # Unfused: the LoRA lives in its own full-precision matrices, the quantized weights are
    # untouched.
    assert {m.lora_A["lf_0123456789ab_auto"].weight.dtype for m in wrapped} == {torch.float32}
    after = dict(transformer.named_parameters())
    for key, value in before.items():
        base_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        tensor = after.get(key, after.get(base_key))
        assert tensor is not None and torch.equal(tensor, value), key


# --- Wan 2.2: a GGUF expert pair --------------------------------------------------------------


def test_gguf_wan_experts_render_close_to_the_original(farm: Any, assets: Any) -> None:
    farm.drop("original.toml", _wan_job(DEMO_GGUF_BASE))
    farm.drop("other-seed.toml", _wan_job(DEMO_GGUF_BASE, seed=22))
    farm.drop("q8.toml", _wan_job(WAN_Q8))
    farm.drop("q4.toml", _wan_job(WAN_Q4))
    assert farm.run() == 0
    assert len(farm.files_in("done")) == 4, farm.files_in("failed")
    videos = _outputs(farm, ".mp4")
    original = _frames(videos["original"])
    other, _ = _diff(_frames(videos["other-seed"]), original)
    measured = {name: _diff(_frames(videos[name]), original) for name in ("q8", "q4")}
    print("Wan |quantized - original| (mean, max), decoded MP4:", measured, "other seed:", other)
    assert measured["q8"][0] <= 1.5 and measured["q4"][0] <= 3.0, measured
    assert all(mean < other / 2 for mean, _ in measured.values()), (measured, other)
    with av.open(str(videos["q4"])) as container:
        params = container.metadata["parameters"].splitlines()[-1]
    assert "Quantization: GGUF Q4_0" in params and "Low-noise CFG scale" in params
    assert read_spec(videos["q8"]).extra["quantization"] == "GGUF Q8_0"
    # The low-noise file is part of its pair, not a checkpoint of its own.
    names = {info["name"] for info in _checkpoints(farm)}
    assert WAN_Q8 in names and DEMO_GGUF_PAIRS["Q8_0"][1] not in names


def _checkpoints(farm: Any) -> list[dict[str, Any]]:
    from daemon.contract.loader import Plugins
    from daemon.library.registry import Registry

    store = Store.for_path(farm.config.paths.database)
    registry = Registry(farm.config, store, Plugins())
    infos = [info.__dict__ for info in registry.scan()]
    registry.close()
    store.dispose()
    return infos


def test_gguf_wan_frames_before_encoding_and_a_lora_on_both_experts(
        assets: Any, tmp_path: Path) -> None:
    from diffusers.quantizers.gguf.utils import GGUFLinear

    def spec() -> RenderSpec:
        d = WAN.defaults_for(T2V_A14B)
        return RenderSpec(family="wan22", checkpoint="x", prompt="a red boat on a lake",
                          negative_prompt=d.negative_prompt, seed=5, steps=2, cfg=d.cfg,
                          sampler="UniPC", schedule=None, width=48, height=32,
                          extra={"frames": 5, "fps": 8, "flow_shift": 3.0, "guidance_2": 3.0})

    def frames(pipe: Any) -> np.ndarray:
        [video] = WAN.render_batch(pipe, [spec()], CPU)
        return np.stack([np.asarray(f, dtype=np.int16) for f in video.frames])

    base = assets.models / DEMO_GGUF_BASE
    original = frames(WAN.load_pipeline(LoadedCheckpoint(
        name=DEMO_GGUF_BASE, path=base, kind="folder", config_path=None), CPU, torch.float32))
    pipes = {}
    limits = {"Q8_0": (0.02, 2), "Q4_0": (0.25, 16)}  # measured: (0.006, 1), (0.12, 9)
    for quantization, (high, low) in DEMO_GGUF_PAIRS.items():
        checkpoint = LoadedCheckpoint(
            name=high, path=assets.models / f"{high}.gguf", kind="gguf", config_path=base,
            variant=T2V_A14B, transformer_2=assets.models / f"{low}.gguf")
        assert WAN.missing_requirements(checkpoint) is None
        pipes[quantization] = WAN.load_pipeline(checkpoint, CPU, torch.float32)
        mean, largest = _diff(frames(pipes[quantization]), original)
        print(f"Wan {quantization} frames before encoding: mean {mean:.4f}, max {largest}")
        mean_limit, max_limit = limits[quantization]
        assert mean <= mean_limit and largest <= max_limit, (quantization, mean, largest)
    pipe = pipes["Q4_0"]
    assert isinstance(pipe.transformer.blocks[0].attn1.to_q, GGUFLinear)
    assert isinstance(pipe.transformer_2.blocks[0].ffn.net[2], GGUFLinear)

    # A LoRA of unknown expert goes into both experts: 10 linears x 2 blocks in each.
    wide = build_tiny_wan_pipeline(T2V_A14B, seed=4, head_dim=16)
    path = write_wan_lora(make_tiny_wan_lora(wide.transformer, seed=3), tmp_path / "w.safetensors",
                          "diffusers")
    plain = frames(pipe)
    use = LoraUse(name="w", strength=1.0, autov3="00000000000w")
    report = apply_loras(pipe, WAN, (use,), {"w": path}, AdapterState())
    assert (report["w"]["transformer"], report["w"]["transformer_2"]) == (20, 20)
    assert _diff(frames(pipe), plain)[0] > 0.1


# --- FLUX.2 [klein]: a GGUF file with the folder as its base ----------------------------------


def test_gguf_klein_loads_and_renders_close_to_its_folder(tmp_path: Path) -> None:
    pipe = build_tiny_klein_pipeline(seed=0, distilled=True)
    folder = save_tiny_klein_folder(pipe, tmp_path / "klein")
    original = diffusers_transformer_to_original(pipe.transformer.state_dict())
    path = write_gguf(original, tmp_path / "klein-Q8_0.gguf", architecture="flux",
                      quantization="Q8_0", keep_precise=("img_in.", "txt_in.", "time_in."))
    # The tiny Klein is 24 wide: only the single blocks' output projections (96 inputs) fit
    # 32-wide blocks; the rest stays F32, as a converter leaves what it cannot quantize.
    found = checkpoint_quantization(path, "gguf")
    assert found is not None and found.label == "GGUF Q8_0", found

    def render(checkpoint: LoadedCheckpoint) -> np.ndarray:
        loaded = KLEIN.load_pipeline(checkpoint, CPU, torch.float32)
        spec = RenderSpec(family=KLEIN.name, checkpoint="x", prompt="a paper lantern",
                          negative_prompt="", seed=3, steps=2, cfg=1.0, sampler="Euler",
                          schedule=None, width=32, height=32)
        return np.asarray(KLEIN.render_batch(loaded, [spec], CPU)[0], dtype=np.int16)

    gguf_checkpoint = LoadedCheckpoint(name="k", path=path, kind="gguf", config_path=folder,
                                       variant="distilled")
    assert KLEIN.missing_requirements(gguf_checkpoint) is None
    mean, largest = _diff(render(gguf_checkpoint), render(LoadedCheckpoint(
        name="f", path=folder, kind="folder", config_path=None, variant="distilled")))
    print(f"Klein Q8_0: mean {mean:.4f}, max {largest}")
    assert mean <= 0.05 and largest <= 2, (mean, largest)


# --- HunyuanVideo: GGUF and FP8 transformers with the folder as their base -------------------

HV_Q8, HV_Q4 = HV_GGUF["Q8_0"], HV_GGUF["Q4_0"]


def _hv_job(checkpoint: str, prompt: str = "a paper boat on a rainy street",
            seed: int = 21) -> str:
    return job_text(checkpoint=checkpoint, prompt=prompt, seed=seed, steps=2, width=64,
                    height=64, frames=5, fps=8)


def test_quantized_hunyuan_video_renders_close_to_the_original_with_a_lora(
        farm: Any) -> None:
    lora = make_tiny_hunyuan_lora(
        build_tiny_hunyuan_video_pipeline(seed=0, heads=GGUF_HEADS).transformer, seed=5)
    write_hunyuan_lora(lora, farm.config.paths.loras / "paper.safetensors", "musubi")
    jobs = {"original": HV_BASE, "q8": HV_Q8, "q4": HV_Q4, "fp8": HV_FP8}
    for job, checkpoint in jobs.items():
        farm.drop(f"{job}.toml", _hv_job(checkpoint))
    farm.drop("other-seed.toml", _hv_job(HV_BASE, seed=22))
    farm.drop("q8-lora.toml", _hv_job(HV_Q8, "a paper boat on a rainy street <lora:paper:1>"))
    assert farm.run() == 0
    assert len(farm.files_in("done")) == 6, farm.files_in("failed")
    videos = _outputs(farm, ".mp4")
    original = _frames(videos["original"])
    other, _ = _diff(_frames(videos["other-seed"]), original)
    measured = {job: _diff(_frames(videos[job]), original) for job in ("q8", "q4", "fp8")}
    print("HunyuanVideo |quantized - original| (mean, max), decoded MP4:", measured,
          "other seed:", other)
    # H.264 magnifies the tiny models' noise-like differences (see the module docstring).
    for job, limit in {"q8": 3.0, "q4": 3.5, "fp8": 4.5}.items():
        assert measured[job][0] <= limit, (job, measured[job])
        assert measured[job][0] < other / 5, (job, measured[job], other)

    labels = {"q8": "GGUF Q8_0", "q4": "GGUF Q4_0", "fp8": "FP8 e4m3fn"}
    specs = _render_specs(farm)
    for job, label in labels.items():
        with av.open(str(videos[job])) as container:
            params = container.metadata["parameters"].splitlines()[-1]
        assert f"Quantization: {label}" in params and "Distilled CFG Scale: 6" in params
        assert f"Model: {jobs[job]}" in params
        assert read_spec(videos[job]).extra["quantization"] == label
        assert specs[jobs[job]]["extra"]["quantization"] == label  # the history's record
    assert "quantization" not in specs[HV_BASE]["extra"]

    # The LoRA: musubi-tuner names, 24 modules; each fused q/k/v patches three diffusers
    # modules, as on the folder (tests/families/test_hunyuan_video.py).
    plain, styled = _frames(videos["q8"]), _frames(videos["q8-lora"])
    assert _diff(plain, styled)[0] > 2.0
    [styled_job] = [job for job in farm.history() if job["file"] == "q8-lora.toml"]
    assert styled_job["renders"][0]["lora_patches"] == {"paper": {
        "transformer": lora.patched_modules("musubi"), "modules_in_file": len(lora.modules)}}

    rows = farm.models()
    assert rows[HV_Q8]["family"] == "hunyuan-video" and rows[HV_Q8]["kind"] == "gguf"
    assert rows[HV_Q8]["quantization"] == "GGUF Q8_0"
    assert "HunyuanVideo transformer in the original layout, GGUF file" in rows[HV_Q8]["reason"]
    assert rows[HV_FP8]["quantization"] == "FP8 e4m3fn"
    # The checkpoints table carries it (for every host of a farm to read).
    store = Store.for_path(farm.config.paths.database, writer=False)
    with store.session() as session:
        table = {row.name: (row.quantization, row.transformer_2)
                 for row in session.scalars(select(Checkpoint))}
    store.dispose()
    assert table[HV_Q8] == ("GGUF Q8_0", None) and table[HV_Q4] == ("GGUF Q4_0", None)
    assert table[HV_FP8] == ("FP8 e4m3fn", None)
    assert table[HV_BASE] == (None, None)
    high, low = DEMO_GGUF_PAIRS["Q8_0"]
    assert table[high] == ("GGUF Q8_0", str((farm.assets.models / f"{low}.gguf").resolve()))


def _hv_spec(seed: int = 3) -> RenderSpec:
    return RenderSpec(family=HV.name, checkpoint="x", prompt="a red ball", negative_prompt="",
                      seed=seed, steps=2, cfg=1.0, sampler="Euler", schedule=None, width=32,
                      height=32, extra={"frames": 5, "fps": 8, "guidance": 6.0,
                                        "flow_shift": 7.0})


def _hv_frames(pipe: Any) -> np.ndarray:
    [video] = HV.render_batch(pipe, [_hv_spec()], CPU)
    return np.stack([np.asarray(frame, dtype=np.int16) for frame in video.frames])


def test_quantized_hunyuan_video_frames_before_encoding_and_its_layers(
        assets: Any, tmp_path: Path) -> None:
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = assets.models / HV_BASE
    original = _hv_frames(HV.load_pipeline(LoadedCheckpoint(
        name=HV_BASE, path=base, kind="folder", config_path=None), CPU, torch.float32))
    # The same weights unquantized, as ComfyUI's transformer-only files (prefix and all):
    # the very same frames.
    folder_transformer = build_tiny_hunyuan_video_pipeline(seed=0, heads=GGUF_HEADS).transformer
    plain_file = tmp_path / "hunyuan_video_t2v_720p_fp32.safetensors"
    save_file({f"model.diffusion_model.{key}": value.contiguous() for key, value in
               hunyuan_transformer_to_original(folder_transformer.state_dict()).items()},
              str(plain_file))
    assert np.array_equal(_hv_frames(HV.load_pipeline(LoadedCheckpoint(
        name="plain", path=plain_file, kind="single_file", config_path=base), CPU,
        torch.float32)), original)
    # measured: (0.015, 1), (0.35, 4), (0.62, 6)
    limits = {HV_Q8: (0.05, 2), HV_Q4: (0.7, 8), HV_FP8: (1.5, 16)}
    pipes, means = {}, {}
    for name, (mean_limit, max_limit) in limits.items():
        kind = "single_file" if name == HV_FP8 else "gguf"
        path = assets.models / (f"{name}.safetensors" if name == HV_FP8 else f"{name}.gguf")
        checkpoint = LoadedCheckpoint(name=name, path=path, kind=kind, config_path=base,
                                      quantization=checkpoint_quantization(path, kind).label)
        assert HV.missing_requirements(checkpoint) is None
        pipes[name] = HV.load_pipeline(checkpoint, CPU, torch.float32)
        mean, largest = _diff(_hv_frames(pipes[name]), original)
        print(f"HunyuanVideo {name} frames before encoding: mean {mean:.4f}, max {largest}")
        assert mean <= mean_limit and largest <= max_limit, (name, mean, largest)
        means[name] = mean
    assert means[HV_Q8] < means[HV_Q4] < means[HV_FP8]  # fewer bits, further away

    transformer = pipes[HV_Q8].transformer
    # Fused q/k/v and a single block's linear1 (split at the file's width) stay quantized.
    for module in (transformer.transformer_blocks[0].attn.to_q,
                   transformer.transformer_blocks[1].attn.add_v_proj,
                   transformer.single_transformer_blocks[0].attn.to_k,
                   transformer.single_transformer_blocks[1].proj_mlp,
                   transformer.context_embedder.token_refiner.refiner_blocks[0].attn.to_v):
        assert isinstance(module, GGUFLinear) and isinstance(module.weight, GGUFParameter)
    assert isinstance(pipes[HV_FP8].transformer.transformer_blocks[0].ff.net[2], Float8Linear)

    # A LoRA wraps the quantized layers unfused, in full precision, and changes the frames.
    pipe = pipes[HV_Q4]
    plain = _hv_frames(pipe)
    lora = make_tiny_hunyuan_lora(
        build_tiny_hunyuan_video_pipeline(seed=0, heads=GGUF_HEADS).transformer, seed=5)
    path = write_hunyuan_lora(lora, tmp_path / "paper.safetensors", "musubi")
    use = LoraUse(name="paper", strength=1.0, autov3="00000000paper")
    report = apply_loras(pipe, HV, (use,), {"paper": path}, AdapterState())
    assert report["paper"]["transformer"] == lora.patched_modules("musubi") == 32
    wrapped = [m for m in pipe.transformer.modules() if isinstance(m, BaseTunerLayer)]
    assert {type(m.get_base_layer()).__name__ for m in wrapped} == {"GGUFLinear"}
    assert {p.dtype for m in wrapped for p in m.lora_A.parameters()} == {torch.float32}
    assert _diff(_hv_frames(pipe), plain)[0] > 0.5


def test_a_hunyuan_video_gguf_needs_a_base_folder_that_fits(assets: Any) -> None:
    path = assets.models / f"{HV_Q8}.gguf"
    alone = HV.missing_requirements(LoadedCheckpoint(name=HV_Q8, path=path, kind="gguf",
                                                     config_path=None))
    assert alone is not None and f'[checkpoints.{HV_Q8}] config = "path/to/HunyuanVideo"' in alone
    # The 24-wide demo folder: the wrong size for this 32-wide file.
    narrow = HV.missing_requirements(LoadedCheckpoint(
        name=HV_Q8, path=path, kind="gguf", config_path=assets.models / HV_FOLDER))
    assert narrow is not None and "(width 32, 4 input channels) does not fit" in narrow
    wan_base = HV.missing_requirements(LoadedCheckpoint(
        name=HV_Q8, path=path, kind="gguf", config_path=assets.models / DEMO_GGUF_BASE))
    assert wan_base is not None and "not a HunyuanVideoPipeline" in wan_base
    with pytest.raises(RenderError, match="does not fit"):
        HV.load_pipeline(LoadedCheckpoint(name=HV_Q8, path=path, kind="gguf",
                                          config_path=assets.models / HV_FOLDER),
                         CPU, torch.float32)


# --- a Wan pair declared in config.toml --------------------------------------------------------


def test_config_toml_pairs_wan_experts_and_refuses_a_bad_second_expert(
        make_farm: Any, assets: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / DEMO_GGUF_BASE).symlink_to(assets.models / DEMO_GGUF_BASE,
                                             target_is_directory=True)
    (models / "flux-folder").symlink_to(assets.models / DEMO_DEV, target_is_directory=True)
    high, low = DEMO_GGUF_PAIRS["Q8_0"]
    # No sidecars: config.toml says it all. A bare file name is found beside the checkpoint.
    shutil.copy(assets.models / f"{high}.gguf", models / "pair-high-Q8_0.gguf")
    shutil.copy(assets.models / f"{low}.gguf", models / "pair-low-Q8_0.gguf")
    shutil.copy(assets.models / f"{high}.gguf", models / "lost-high-Q8_0.gguf")
    shutil.copy(assets.models / f"{high}.gguf", models / "self-high-Q8_0.gguf")
    base = str(models / DEMO_GGUF_BASE)
    farm = make_farm(paths={"models": str(models)}, checkpoints={
        "pair-high-Q8_0": {"config": base, "transformer_2": "pair-low-Q8_0.gguf"},
        "lost-high-Q8_0": {"config": base, "transformer_2": "lost-low-Q8_0.gguf"},
        "self-high-Q8_0": {"config": base, "transformer_2": "self-high-Q8_0.gguf"},
        "flux-folder": {"transformer_2": "pair-low-Q8_0.gguf"},
    })

    rows = farm.models()
    pair = rows["pair-high-Q8_0"]
    assert pair["state"] == "ok" and pair["quantization"] == "GGUF Q8_0"
    assert pair["transformer_2"] == str((models / "pair-low-Q8_0.gguf").resolve())
    assert "low-noise expert pair-low-Q8_0.gguf" in pair["reason"]
    assert "pair-low-Q8_0" not in rows  # part of its pair, not a checkpoint of its own
    lost = rows["lost-high-Q8_0"]
    assert lost["state"] == "unrecognised"
    assert ("config.toml [checkpoints.lost-high-Q8_0] names transformer_2 = "
            "'lost-low-Q8_0.gguf', which does not exist in") in lost["reason"]
    assert "is the checkpoint itself" in rows["self-high-Q8_0"]["reason"]
    assert "pairs two GGUF expert files" in rows["flux-folder"]["reason"]

    farm.drop("pair.toml", _wan_job("pair-high-Q8_0"))
    farm.drop("lost.toml", _wan_job("lost-high-Q8_0"))
    assert farm.run() == 0
    assert farm.files_in("done") == ["pair.toml"], farm.files_in("rejected")
    report = farm.rejection("lost.toml")
    assert "does not exist" in report and "lost-low-Q8_0.gguf" in report
    # The same files as the demo's pair declared in a sidecar, rendered by a farm on the demo
    # models folder.
    reference = make_farm(paths={"models": str(assets.models), "jobs": "jobs-ref",
                                 "outputs": "outputs-ref", "state": "state-ref"})
    reference.drop("sidecar.toml", _wan_job(high))
    assert reference.run() == 0
    [declared] = list(farm.outputs.rglob("*.mp4"))
    [sidecar] = list(reference.outputs.rglob("*.mp4"))
    # The same two expert files, declared either way: the same video.
    assert np.array_equal(_frames(declared), _frames(sidecar))


def test_config_toml_transformer_2_must_name_a_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoints\.w\.transformer_2 = 'low\.safetensors': "
                                          r"it must name the low-noise expert's \.gguf file"):
        config_from_dict({"checkpoints": {"w": {"transformer_2": "low.safetensors"}}},
                         base=tmp_path)
    config = config_from_dict({"checkpoints": {"w": {"transformer_2": "low.gguf"},
                                               "v": {"transformer_2": "sub/low.gguf"}}},
                              base=tmp_path)
    assert config.checkpoints["w"].transformer_2 == Path("low.gguf")  # found beside the file
    assert config.checkpoints["v"].transformer_2 == (tmp_path / "sub" / "low.gguf").resolve()


# --- what cannot be used is refused with the reason -------------------------------------------


def _gguf_of(tensors: dict[str, torch.Tensor], path: Path, architecture: str) -> Path:
    return write_gguf(tensors, path, architecture=architecture, quantization="Q8_0")


def test_unusable_gguf_files_are_refused_with_the_reason(
        make_farm: Any, assets: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / DEMO_GGUF_BASE).symlink_to(assets.models / DEMO_GGUF_BASE, target_is_directory=True)
    (models / DEMO_DEV).symlink_to(assets.models / DEMO_DEV, target_is_directory=True)
    weight = torch.randn(64, 64)
    _gguf_of({"joint_blocks.0.x_block.attn.qkv.weight": weight}, models / "sd3-Q8_0.gguf", "sd3")
    _gguf_of({"blk.0.attn_q.weight": weight, "token_embd.weight": weight},
             models / "qwen-text-Q8_0.gguf", "qwen3")
    data = (assets.models / f"{Q8}.gguf").read_bytes()
    (models / "cut-Q8_0.gguf").write_bytes(data[: len(data) // 2])
    (models / "flux-alone-Q8_0.gguf").write_bytes(data)  # no base folder named
    high, low = DEMO_GGUF_PAIRS["Q8_0"]
    shutil.copy(assets.models / f"{high}.gguf", models / "wan-alone-high-Q8_0.gguf")
    (models / "wan-alone-high-Q8_0.toml").write_text(f'config = "{DEMO_GGUF_BASE}"\n')
    # A pair declared on the wrong file: the low-noise expert names the high-noise one.
    shutil.copy(assets.models / f"{low}.gguf", models / "wan-low_noise-Q8_0.gguf")
    shutil.copy(assets.models / f"{high}.gguf", models / "wan-high_noise-Q8_0.gguf")
    (models / "wan-low_noise-Q8_0.toml").write_text(
        f'config = "{DEMO_GGUF_BASE}"\ntransformer_2 = "wan-high_noise-Q8_0.gguf"\n')
    (models / "wan-missing-Q8_0.gguf").write_bytes((models / "wan-alone-high-Q8_0.gguf")
                                                  .read_bytes())
    (models / "wan-missing-Q8_0.toml").write_text(
        f'config = "{DEMO_GGUF_BASE}"\ntransformer_2 = "nowhere.gguf"\n')
    farm = make_farm(paths={"models": str(models)})

    rows = farm.models()
    assert rows["sd3-Q8_0"]["state"] == "unrecognised"
    assert "general.architecture = 'sd3'" in rows["sd3-Q8_0"]["reason"]
    assert ("GGUF transformers load for FLUX.1 [dev], FLUX.1 [schnell], FLUX.2 [klein], "
            "HunyuanVideo, Wan 2.2") in rows["sd3-Q8_0"]["reason"]
    assert "a language-model file" in rows["qwen-text-Q8_0"]["reason"]
    assert rows["cut-Q8_0"]["state"] == "unrecognised"
    assert "truncated or corrupt GGUF file" in rows["cut-Q8_0"]["reason"]
    assert "transformer_2 = 'nowhere.gguf', which does not exist" in \
        rows["wan-missing-Q8_0"]["reason"]
    # Recognised, but missing what they need: refused per job at intake.
    assert rows["flux-alone-Q8_0"]["state"] == rows["wan-alone-high-Q8_0"]["state"] == "ok"
    # The swapped pair's partner is part of it, not a checkpoint of its own.
    assert "wan-high_noise-Q8_0" not in rows

    for name in ("sd3-Q8_0", "qwen-text-Q8_0", "cut-Q8_0", "flux-alone-Q8_0"):
        farm.drop(f"{name}.toml", _flux_job(name))
    for name in ("wan-alone-high-Q8_0", "wan-low_noise-Q8_0", "wan-missing-Q8_0"):
        farm.drop(f"{name}.toml", _wan_job(name))
    assert farm.run() == 0
    assert len(farm.files_in("rejected")) == 14  # 7 jobs and their reports

    assert ("cannot be used: no installed family recognises this GGUF file"
            in farm.rejection("sd3-Q8_0.toml"))
    assert "not a diffusion transformer" in farm.rejection("qwen-text-Q8_0.toml")
    assert "truncated or corrupt GGUF file" in farm.rejection("cut-Q8_0.toml")
    assert "download or copy it again" in farm.rejection("cut-Q8_0.toml")
    assert 'config = "path/to/FLUX.1-dev"' in farm.rejection("flux-alone-Q8_0.toml")
    assert "name the low-noise expert's GGUF file" in farm.rejection("wan-alone-high-Q8_0.toml")
    assert "the file names say the experts are swapped" in farm.rejection("wan-low_noise-Q8_0.toml")
    assert "does not exist" in farm.rejection("wan-missing-Q8_0.toml")


def test_a_gguf_of_another_width_than_its_base_is_refused_before_loading(
        assets: Any, tmp_path: Path) -> None:
    narrow = build_tiny_wan_pipeline(T2V_A14B, seed=0)  # 24 wide; the base is 32 wide
    from families.wan22.tiny import save_tiny_wan_transformer_gguf

    high = save_tiny_wan_transformer_gguf(narrow.transformer, tmp_path / "h-high.gguf")
    low = save_tiny_wan_transformer_gguf(narrow.transformer_2, tmp_path / "h-low.gguf")
    problem = WAN.missing_requirements(LoadedCheckpoint(
        name="h", path=high, kind="gguf", config_path=assets.models / DEMO_GGUF_BASE,
        transformer_2=low))
    assert problem is not None and "(width 24, 16 input channels) does not fit" in problem
    with pytest.raises(RenderError, match="does not fit"):
        WAN.load_pipeline(LoadedCheckpoint(name="h", path=high, kind="gguf",
                                           config_path=assets.models / DEMO_GGUF_BASE,
                                           transformer_2=low), CPU, torch.float32)


# --- memory: offload tiers and what weights cost ----------------------------------------------


def test_offload_is_a_logged_no_op_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    class Pipe:
        pass

    pipe = Pipe()
    assert DEV.apply_offload(pipe, "none", CPU) == []
    with caplog.at_level("INFO"):
        assert DEV.apply_offload(pipe, "group", CPU) == []
    assert "worker.offload = group has no effect on cpu" in caplog.text
    assert not hasattr(pipe, "lorafarm_offload")
    with pytest.raises(RenderError, match="use one of none, model, group, sequential"):
        DEV.apply_offload(pipe, "disk", CPU)


def test_quantized_weights_cost_less_memory(assets: Any) -> None:
    base = assets.models / DEMO_DEV

    def cost(name: str, kind: str, offload: str = "none") -> int:
        path = assets.models / name
        return DEV.weights_cost(LoadedCheckpoint(name=name, path=path, kind=kind,
                                                 config_path=None if kind == "folder" else base),
                                torch.bfloat16, offload)

    folder, q8, q4 = cost(DEMO_DEV, "folder"), cost(f"{Q8}.gguf", "gguf"), \
        cost(f"{Q4}.gguf", "gguf")
    fp8 = cost(f"{DEMO_DEV_FP8}.safetensors", "single_file")
    assert folder > q8 > q4 > 0 and folder > fp8 > 0
    assert resident_weight_bytes(LoadedCheckpoint(
        name=Q8, path=assets.models / f"{Q8}.gguf", kind="gguf", config_path=base),
        torch.bfloat16) == q8
    # With model offload only the largest component is on the device at a time.
    assert 0 < cost(f"{Q8}.gguf", "gguf", "model") < q8
    assert cost(f"{Q8}.gguf", "gguf", "group") == 0


def test_quantization_labels_come_from_the_headers(assets: Any, tmp_path: Path) -> None:
    found = checkpoint_quantization(assets.models / f"{Q4}.gguf", "gguf")
    assert found is not None and found.label == "GGUF Q4_0" and found.format == "gguf"
    assert found.bytes_per_weight < 4  # mostly 4.5-bit blocks, some F32
    fp8 = checkpoint_quantization(assets.models / f"{DEMO_DEV_FP8}.safetensors", "single_file")
    assert fp8 is not None and fp8.label == "FP8 e4m3fn" and fp8.bytes_per_weight < 1.1
    assert checkpoint_quantization(assets.models / f"{DEMO_DEV_BFL}.safetensors",
                                   "single_file") is None
    reader = gguf.GGUFReader(assets.models / f"{Q8}.gguf")
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "flux"
