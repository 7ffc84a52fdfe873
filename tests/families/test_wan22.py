"""Wan 2.2: tiny checkpoints of all three releases built offline, videos rendered through the
hot folder (text-to-video and image-to-video), LoRAs routed to the noise expert they were
trained for, in every layout Wan LoRAs come in, and the misfits refused with a fix."""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: they read this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image

from daemon.contract.family import CheckpointSource, LoadedCheckpoint, RenderError
from daemon.contract.spec import LoraUse, RenderSpec
from daemon.formats.lora_probe import probe_lora_file
from daemon.formats.safetensors_header import read_header
from daemon.output.files import read_spec
from daemon.render.lora_patching import (
    AdapterState,
    adapter_name,
    apply_loras,
    count_patched_modules,
)
from families.wan22.tiny import (
    LORA_LAYOUTS,
    TINY_WIDTHS,
    build_tiny_wan_pipeline,
    make_tiny_wan_lora,
    save_tiny_wan_folder,
    write_real_size_wan_lora,
    write_tiny_input_image,
    write_wan_lora,
)
from families.wan22.variants import WAN_NEGATIVE_PROMPT
from families.wan22.wan22 import (
    DEMO_CHECKPOINTS,
    DEMO_GGUF_PAIRS,
    DEMO_IMAGE,
    I2V_A14B,
    T2V_A14B,
    TI2V_5B,
    VARIANTS,
    Wan22Family,
    demo_job,
    expert_of,
    lora_pair_name,
)

FAMILY = Wan22Family()
CPU = torch.device("cpu")
BLOCK_LINEARS = 10  # per Wan block: self/cross attention q, k, v, o and two FFN layers
TINY_BLOCKS = 2
# With 2 steps and flow shift 3 the first step is above the A14B boundary (high-noise expert)
# and the second below it (low-noise expert): every test that needs both experts uses these.
BOTH_EXPERTS = {"steps": 2, "flow_shift": 3.0}


def _decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _mp4_parameters(path: Path) -> str:
    with av.open(str(path)) as container:
        return container.metadata["parameters"]


def _videos(farm) -> dict[str, list[Path]]:  # type: ignore[no-untyped-def]
    """MP4s per job name (outputs/<job>-<id>/...)."""
    found: dict[str, list[Path]] = {}
    for mp4 in sorted(farm.outputs.rglob("*.mp4")):
        found.setdefault(mp4.parent.name.rsplit("-", 1)[0], []).append(mp4)
    return found


def _spec(variant: str, seed: int = 5, **extra: Any) -> RenderSpec:
    d = FAMILY.defaults_for(variant)
    settings: dict[str, Any] = {"frames": 5, "fps": 8, "flow_shift": d.flow_shift}
    if d.guidance_2 is not None:
        settings["guidance_2"] = d.guidance_2
    steps = int(extra.pop("steps", 2))
    settings.update(extra)
    width, height = (32, 32) if variant == TI2V_5B else (48, 32)
    return RenderSpec(family="wan22", checkpoint=DEMO_CHECKPOINTS[variant],
                      prompt="a red boat on a lake", negative_prompt=d.negative_prompt,
                      seed=seed, steps=steps, cfg=d.cfg, sampler="UniPC", schedule=None,
                      width=width, height=height, extra=settings)


def _render(pipe: Any, spec: RenderSpec) -> np.ndarray:
    [video] = FAMILY.render_batch(pipe, [spec], CPU)
    return np.stack([np.asarray(frame, dtype=np.int16) for frame in video.frames])


@pytest.fixture(scope="module")
def t2v(assets) -> Any:  # type: ignore[no-untyped-def]
    """The demo's T2V-A14B folder, loaded through the family (the worker's path)."""
    name = DEMO_CHECKPOINTS[T2V_A14B]
    return FAMILY.load_pipeline(LoadedCheckpoint(name=name, path=assets.models / name,
                                                 kind="folder", config_path=None,
                                                 variant=T2V_A14B), CPU, torch.float32)


# --- tiny checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_folders_round_trip_and_keep_each_release_s_layout(variant: str,
                                                                tmp_path: Path) -> None:
    built = build_tiny_wan_pipeline(variant, seed=4)
    folder = save_tiny_wan_folder(built, tmp_path / variant)
    index = json.loads((folder / "model_index.json").read_text())
    loaded_class = WanImageToVideoPipeline if variant == I2V_A14B else WanPipeline
    assert index["_class_name"] == loaded_class.__name__
    loaded = loaded_class.from_pretrained(folder, local_files_only=True)
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        mine, theirs = getattr(built, name), getattr(loaded, name)
        if mine is None:
            assert theirs is None
            continue
        for key, value in mine.state_dict().items():
            assert torch.equal(value, theirs.state_dict()[key]), f"{name}.{key}"
    assert type(loaded.tokenizer).__name__ == "T5Tokenizer"
    assert loaded.tokenizer("a red boat").input_ids == built.tokenizer("a red boat").input_ids
    assert loaded.scheduler.config.prediction_type == "flow_prediction"
    assert loaded.scheduler.config.use_flow_sigmas
    transformer = loaded.transformer.config
    z_dim = loaded.vae.config.z_dim
    if variant == T2V_A14B:
        assert (index["boundary_ratio"], transformer.in_channels, z_dim) == (0.875, 16, 16)
        assert loaded.transformer_2 is not None and not index["expand_timesteps"]
    elif variant == I2V_A14B:
        assert (index["boundary_ratio"], transformer.in_channels, z_dim) == (0.9, 36, 16)
        assert loaded.transformer_2 is not None
        # Wan 2.2 I2V conditions on image latents only: no CLIP encoder (Wan 2.1 I2V's).
        assert index["image_encoder"] == [None, None] and transformer.image_dim is None
    else:
        assert index["expand_timesteps"] and index["boundary_ratio"] is None
        assert index["transformer_2"] == [None, None] and transformer.in_channels == 48
        assert z_dim == 48 and loaded.vae.config.is_residual
        assert loaded.vae.config.patch_size == 2
    assert transformer.num_attention_heads * transformer.attention_head_dim == (
        TINY_WIDTHS[variant])
    assert FAMILY.probe_checkpoint(CheckpointSource.for_folder(variant, folder)).variant == (
        variant)


def test_builds_are_deterministic_and_leave_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_wan_pipeline(T2V_A14B, seed=2)
    assert torch.equal(torch.rand(3), before)
    second = build_tiny_wan_pipeline(T2V_A14B, seed=2)
    other = build_tiny_wan_pipeline(T2V_A14B, seed=3)
    key = "blocks.0.attn1.to_q.weight"
    assert torch.equal(first.transformer.state_dict()[key], second.transformer.state_dict()[key])
    assert not torch.equal(first.transformer.state_dict()[key],
                           other.transformer.state_dict()[key])
    # The two experts are different models, as the real high- and low-noise experts are.
    assert not torch.equal(first.transformer.state_dict()[key],
                           first.transformer_2.state_dict()[key])


def test_wan_2_1_and_other_folders_are_not_claimed(tmp_path: Path) -> None:
    def folder(name: str, index: dict[str, Any], transformer: dict[str, Any],
               z_dim: int = 16) -> CheckpointSource:
        path = tmp_path / name
        (path / "transformer").mkdir(parents=True)
        (path / "vae").mkdir()
        (path / "model_index.json").write_text(json.dumps(index))
        (path / "transformer" / "config.json").write_text(json.dumps(transformer))
        (path / "vae" / "config.json").write_text(json.dumps({"z_dim": z_dim}))
        return CheckpointSource.for_folder(name, path)

    single = {"transformer": ["diffusers", "WanTransformer3DModel"],
              "transformer_2": [None, None], "boundary_ratio": None, "expand_timesteps": False}
    assert FAMILY.probe_checkpoint(folder("wan21-t2v", {"_class_name": "WanPipeline",
                                                        **single}, {"in_channels": 16})) is None
    assert FAMILY.probe_checkpoint(folder(
        "wan21-i2v", {"_class_name": "WanImageToVideoPipeline", **single},
        {"in_channels": 36, "image_dim": 1280})) is None
    assert FAMILY.probe_checkpoint(folder("sdxl", {"_class_name": "StableDiffusionXLPipeline"},
                                          {})) is None


def _sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A float16 safetensors file whose data is a sparse hole: real-size headers cost no disk."""
    header: dict[str, Any] = {}
    offset = 0
    for key, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset,
                                                                             offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.parametrize(("width", "in_channels", "prefix", "variant"), [
    (5120, 16, "model.diffusion_model.", T2V_A14B),
    (5120, 36, "", I2V_A14B),
    (3072, 48, "diffusion_model.", TI2V_5B),
    (24, 16, "", None),  # a tiny one: Wan, size unknown
])
def test_single_original_layout_files_are_recognised_but_sent_to_the_folder(
        tmp_path: Path, width: int, in_channels: int, prefix: str, variant: str | None) -> None:
    path = _sparse_safetensors(tmp_path / "wan.safetensors", {
        f"{prefix}patch_embedding.weight": (width, in_channels, 1, 2, 2),
        f"{prefix}blocks.0.self_attn.q.weight": (width, width)})
    probe = FAMILY.probe_checkpoint(CheckpointSource(name="wan", path=path, kind="single_file",
                                                     header=read_header(path)))
    assert probe is not None and probe.family == "wan22" and probe.variant == variant
    problem = FAMILY.missing_requirements(LoadedCheckpoint(
        name="wan", path=path, kind="single_file", config_path=None, variant=variant))
    assert problem is not None and "diffusers folder" in problem


def test_a_wan_2_1_single_file_is_not_claimed(tmp_path: Path) -> None:
    path = _sparse_safetensors(tmp_path / "wan21_1.3b.safetensors", {
        "patch_embedding.weight": (1536, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": (1536, 1536)})
    assert FAMILY.probe_checkpoint(CheckpointSource(name="w", path=path, kind="single_file",
                                                    header=read_header(path))) is None


# --- defaults --------------------------------------------------------------------------------


def test_variant_defaults_follow_the_official_settings() -> None:
    t2v, i2v, ti2v = (FAMILY.defaults_for(v) for v in (T2V_A14B, I2V_A14B, TI2V_5B))
    assert (t2v.width, t2v.height, t2v.size_multiple, t2v.steps) == (832, 480, 16, 40)
    assert (t2v.cfg, t2v.guidance_2, t2v.flow_shift, t2v.frames, t2v.fps) == (
        4.0, 3.0, 12.0, 81, 16)
    assert (i2v.cfg, i2v.guidance_2, i2v.flow_shift, i2v.frames) == (3.5, 3.5, 5.0, 81)
    assert (ti2v.width, ti2v.height, ti2v.size_multiple, ti2v.steps) == (1280, 704, 32, 50)
    assert (ti2v.cfg, ti2v.guidance_2, ti2v.flow_shift, ti2v.frames, ti2v.fps) == (
        5.0, None, 5.0, 121, 24)
    for d in (t2v, i2v, ti2v):
        assert d.sampler == "UniPC" and d.frame_step == 4 and (d.frames - 1) % 4 == 0
        assert d.negative_prompt == WAN_NEGATIVE_PROMPT
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and WAN_NEGATIVE_PROMPT.endswith(
        "背景人很多，倒着走")
    assert FAMILY.defaults_for(None) == t2v


def test_image_inputs_and_sizes_per_release() -> None:
    assert [FAMILY.image_input(v) for v in VARIANTS] == ["none", "required", "optional"]
    # Landscape, portrait and square first frames keep the default area at their aspect.
    assert FAMILY.size_for_image(I2V_A14B, 1920, 1080) == (848, 480)
    assert FAMILY.size_for_image(I2V_A14B, 1080, 1920) == (480, 848)
    assert FAMILY.size_for_image(I2V_A14B, 1024, 1024) == (624, 624)
    assert FAMILY.size_for_image(TI2V_5B, 1920, 1080) == (1280, 704)
    assert FAMILY.size_for_image(TI2V_5B, 1080, 1920) == (704, 1280)


# --- the hot folder: text-to-video and image-to-video ----------------------------------------


def test_text_to_video_jobs_render_mp4s_with_their_metadata(farm) -> None:
    farm.drop("boat.toml", demo_job(T2V_A14B, "a red boat on a lake", seed=21))
    farm.drop("lantern.toml", demo_job(TI2V_5B, "a lantern over the (sea:1.3)", seed=31,
                                       count=1, frames=9))
    assert farm.run() == 0
    assert farm.files_in("done") == ["boat.toml", "lantern.toml"]
    videos = _videos(farm)
    expected = {"boat": (2, 5, (64, 64), [21, 22]), "lantern": (1, 9, (64, 64), [31])}
    for job, (count, frames, (height, width), seeds) in expected.items():
        assert len(videos[job]) == count
        for mp4 in videos[job]:
            decoded = _decoded_frames(mp4)
            assert len(decoded) == frames and decoded[0].shape == (height, width, 3)
            parameters = _mp4_parameters(mp4)
            # As written: only UMT5 reads the prompt without its A1111 weight.
            assert parameters.splitlines()[0] == ("a red boat on a lake" if job == "boat"
                                                  else "a lantern over the (sea:1.3)")
            assert f"Seed: {read_spec(mp4).seed}" in parameters
            assert f"Frames: {frames}, FPS: 8" in parameters
            assert mp4.with_suffix(".png").is_file()  # the poster
        assert sorted(read_spec(p).seed for p in videos[job]) == seeds
    boat = read_spec(videos["boat"][0])
    # Defaults of the variant: the official negative prompt, CFG 4 / 3, shift 12.
    assert boat.negative_prompt == WAN_NEGATIVE_PROMPT and boat.cfg == 4.0
    assert (boat.extra["guidance_2"], boat.extra["flow_shift"]) == (3.0, 12.0)
    assert "Low-noise CFG scale: 3, " in _mp4_parameters(videos["boat"][0])
    lantern = read_spec(videos["lantern"][0])
    assert (lantern.cfg, lantern.extra["flow_shift"], "guidance_2" in lantern.extra) == (
        5.0, 5.0, False)
    history = {job["file"]: job for job in farm.history()}
    assert [(r["frames"], r["fps"]) for r in history["boat.toml"]["renders"]] == [(5, 8)] * 2
    assert history["lantern.toml"]["warnings"] == [
        "prompt: Wan 2.2 has no prompt weighting: (sea:1.3) read as plain text"]
    assert history["boat.toml"]["warnings"] == []


def test_image_to_video_follows_the_given_image(farm) -> None:
    inputs = farm.config.paths.inputs
    write_tiny_input_image(inputs / "first.png", seed=1)
    write_tiny_input_image(inputs / "other.png", seed=2)
    write_tiny_input_image(inputs / "square.png", size=(64, 64), seed=1)
    for name, image in (("first", "first.png"), ("other", "other.png")):
        farm.drop(f"{name}.toml", demo_job(I2V_A14B, "slow camera pan over the lake", seed=41,
                                           count=1, image=image))
    for name, image in (("small-first", "square.png"), ("small-text", None)):
        farm.drop(f"{name}.toml", demo_job(TI2V_5B, "a lantern over the sea", seed=51,
                                           count=1, image=image))
    assert farm.run() == 0
    assert len(farm.files_in("done")) == 4, farm.files_in("failed")
    videos = {job: np.stack(_decoded_frames(paths[0])).astype(np.int16)
              for job, paths in _videos(farm).items()}
    # Same seed and prompt: only the first frame given differs, and so does the video.
    assert np.abs(videos["first"] - videos["other"]).mean() > 2
    assert np.abs(videos["small-first"] - videos["small-text"]).mean() > 2
    first = next(farm.outputs.rglob("first-*/*.mp4"))
    spec = read_spec(first)
    assert spec.extra["image"] == "first.png" and len(spec.extra["image_sha256"]) == 64
    assert f"Init image hash: {spec.extra['image_sha256'][:10]}" in _mp4_parameters(first)
    assert "image" not in read_spec(next(farm.outputs.rglob("small-text-*/*.mp4"))).extra


def test_the_demo_jobs_render(farm, assets) -> None:
    farm.config.paths.inputs.mkdir(parents=True, exist_ok=True)
    shutil.copy(assets.root / "inputs" / DEMO_IMAGE, farm.config.paths.inputs / DEMO_IMAGE)
    for job in sorted(assets.demo_jobs.glob("wan22-*.toml")):
        farm.drop(job.name, job.read_text())
    assert farm.run() == 0
    assert farm.files_in("done") == ["wan22-i2v.toml", "wan22-t2v-gguf.toml", "wan22-t2v.toml",
                                     "wan22-ti2v.toml"]
    assert sum(len(videos) for videos in _videos(farm).values()) == 8


def test_image_jobs_that_do_not_fit_the_release_are_rejected_with_the_fix(farm) -> None:
    write_tiny_input_image(farm.config.paths.inputs / "first.png")
    farm.drop("t2v-image.toml", demo_job(T2V_A14B, "a cat", seed=1, count=1, steps=1,
                                         image="first.png"))
    farm.drop("i2v-no-image.toml", demo_job(I2V_A14B, "a cat", seed=1, count=1, steps=1))
    assert farm.run() == 0
    assert farm.files_in("done") == []
    # Refused at intake, before any GPU time is spent.
    report = farm.rejection("t2v-image.toml")
    assert "takes no input image" in report and "remove image" in report
    report = farm.rejection("i2v-no-image.toml")
    assert "needs `image`" in report and 'image = "start.png"' in report


def test_bad_video_inputs_are_rejected_with_the_fix(farm, tmp_path: Path) -> None:
    inputs = farm.config.paths.inputs
    write_tiny_input_image(inputs / "inside.png")
    outside = write_tiny_input_image(tmp_path / "outside" / "secret.png")
    (inputs / "link.png").symlink_to(outside)
    job = demo_job(I2V_A14B, "a cat", seed=1, count=1, steps=1, image="inside.png")
    farm.drop("frames.toml", job.replace("frames = 5", "frames = 6"))
    farm.drop("dotdot.toml", job.replace('"inside.png"', '"../outside/secret.png"'))
    farm.drop("absolute.toml", job.replace('"inside.png"', json.dumps(str(outside))))
    farm.drop("symlink.toml", job.replace('"inside.png"', '"link.png"'))
    farm.drop("width.toml", job.replace("width = 64", "width = 72"))
    farm.drop("ti2v-width.toml", demo_job(TI2V_5B, "a cat", seed=1, count=1,
                                          extra="").replace("width = 64", "width = 80"))
    farm.drop("guidance-2.toml", demo_job(TI2V_5B, "a cat", seed=1, count=1,
                                          extra="guidance_2 = 3.0\n"))
    assert farm.run() == 0
    assert farm.files_in("done") == [] and not list(farm.outputs.rglob("*.mp4"))

    frames = farm.rejection("frames.toml")
    assert "needs 4k+1 frames" in frames and "use 5 or 9" in frames
    for name in ("dotdot.toml", "absolute.toml"):
        text = farm.rejection(name)
        assert "must be a path inside the inputs folder" in text
        assert 'How to fix: copy the image into the inputs folder' in text
    text = farm.rejection("symlink.toml")
    assert "leads out of the inputs folder" in text and "copy the image itself" in text
    text = farm.rejection("width.toml")
    assert "not a multiple of 16" in text and "use 64 or 80" in text
    text = farm.rejection("ti2v-width.toml")
    assert "not a multiple of 32" in text and "use 64 or 96" in text
    assert "has no `guidance_2` setting" in farm.rejection("guidance-2.toml")


def test_an_input_image_replaced_after_intake_is_not_rendered(t2v: Any, tmp_path: Path) -> None:
    image = write_tiny_input_image(tmp_path / "start.png", seed=1)
    spec = _spec(TI2V_5B, image="start.png", image_path=str(image), image_sha256="0" * 64)
    with pytest.raises(RenderError, match="changed after the job was accepted"):
        FAMILY.render_batch(t2v, [spec], CPU)


def test_steps_are_reported_and_an_abort_stops_the_pipeline(t2v: Any) -> None:
    from daemon.contract.family import BatchAborted, Progress

    seen: list[tuple[int, int]] = []
    progress = Progress(2, lambda step, total: seen.append((step, total)), lambda: False)
    FAMILY.render_batch(t2v, [_spec(T2V_A14B, **BOTH_EXPERTS)], CPU, progress)
    assert seen == [(1, 2), (2, 2)]
    with pytest.raises(BatchAborted):
        FAMILY.render_batch(t2v, [_spec(T2V_A14B)], CPU, Progress(2, lambda *_: None,
                                                                   lambda: True))


def test_batch_cost_grows_with_the_clip_and_differs_per_release() -> None:
    def cost(variant: str, width: int, height: int, frames: int) -> float:
        spec = _spec(variant, frames=frames)
        return FAMILY.batch_cost(RenderSpec(**{**spec.__dict__, "width": width,
                                                "height": height})) / 2**30

    a14b, five = cost(T2V_A14B, 832, 480, 81), cost(TI2V_5B, 1280, 704, 121)
    assert 4 < a14b < 8 and 4 < five < 9
    assert cost(T2V_A14B, 832, 480, 41) < a14b < cost(T2V_A14B, 1280, 720, 81)


# --- LoRAs: experts ---------------------------------------------------------------------------


def _patched(report: dict[str, int]) -> dict[str, int]:
    """Modules patched per component, without the file's own module count beside them."""
    return {key: value for key, value in report.items() if key != "modules_in_file"}


def _count_expert_calls(pipe: Any) -> dict[str, int]:
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_pre_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_expert_loras_patch_and_change_only_their_expert(t2v: Any, tmp_path: Path) -> None:
    lora = make_tiny_wan_lora(t2v.transformer, seed=7)
    path = write_wan_lora(lora, tmp_path / "style.safetensors", "original")
    spec = _spec(T2V_A14B, **BOTH_EXPERTS)
    calls = _count_expert_calls(t2v)
    base = _render(t2v, spec)
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0  # both experts ran
    # High-noise steps only (shift 12, 2 steps: every timestep is above the boundary).
    high_only = _spec(T2V_A14B, steps=2, flow_shift=12.0)
    base_high_only = _render(t2v, high_only)
    state = AdapterState()
    renders: dict[str | None, np.ndarray] = {}
    for expert in ("high", "low", None):
        use = LoraUse(name=f"style-{expert}", strength=1.0, expert=expert,
                      autov3=f"{expert}0000000")
        report = apply_loras(t2v, FAMILY, (use,), {use.name: path}, state)[use.name]
        patched = TINY_BLOCKS * BLOCK_LINEARS
        wanted = {"high": {"transformer": patched}, "low": {"transformer_2": patched},
                  None: {"transformer": patched, "transformer_2": patched}}[expert]
        assert _patched(report) == wanted
        assert count_patched_modules(t2v, adapter_name(use)) == wanted
        renders[expert] = _render(t2v, spec)
        assert np.abs(renders[expert] - base).max() > 0, expert
        if expert == "low":
            # The low-noise expert never runs at these timesteps: the video is the base's.
            assert np.array_equal(_render(t2v, high_only), base_high_only)
    assert not np.array_equal(renders["high"], renders["low"])
    # Strength 0 on both experts, and no LoRA at all, give the base back bit for bit.
    zero = LoraUse(name="style-None", strength=0.0, autov3="None0000000")
    apply_loras(t2v, FAMILY, (zero,), {zero.name: path}, state)
    assert np.array_equal(_render(t2v, spec), base)
    apply_loras(t2v, FAMILY, (), {}, state)
    assert np.array_equal(_render(t2v, spec), base)


def test_strengths_follow_the_expert() -> None:
    assert FAMILY.lora_strengths(LoraUse("a", 0.8, expert="high")) == {
        "transformer": 0.8, "transformer_2": 0.0}
    assert FAMILY.lora_strengths(LoraUse("a", 0.8, expert="low")) == {
        "transformer": 0.0, "transformer_2": 0.8}
    for expert in (None, "both"):
        assert FAMILY.lora_strengths(LoraUse("a", 0.8, expert=expert)) == {
            "transformer": 0.8, "transformer_2": 0.8}


def test_an_expert_lora_on_the_one_transformer_model_is_an_error(assets,
                                                                 tmp_path: Path) -> None:
    name = DEMO_CHECKPOINTS[TI2V_5B]
    pipe = FAMILY.load_pipeline(LoadedCheckpoint(name=name, path=assets.models / name,
                                                 kind="folder", config_path=None), CPU,
                                torch.float32)
    path = write_wan_lora(make_tiny_wan_lora(pipe.transformer, seed=1),
                          tmp_path / "five.safetensors", "diffusers")
    with pytest.raises(RenderError, match='expert = "both"'):
        FAMILY.load_lora(pipe, path, "lf_x", LoraUse("five", expert="low"))
    FAMILY.load_lora(pipe, path, "lf_y", LoraUse("five", expert="both"))
    assert count_patched_modules(pipe, "lf_y") == {"transformer": TINY_BLOCKS * BLOCK_LINEARS}


# --- LoRAs: layouts ---------------------------------------------------------------------------


def test_every_layout_is_recognised_patches_the_same_modules_and_renders_alike(
        t2v: Any, tmp_path: Path) -> None:
    lora = make_tiny_wan_lora(t2v.transformer, seed=9, rank=2, alpha=1.0)
    attention_only = make_tiny_wan_lora(t2v.transformer, seed=9, rank=2, alpha=1.0,
                                        layers=("self_attn.q", "self_attn.v", "cross_attn.o"))
    cases = {layout: (lora, layout) for layout in LORA_LAYOUTS}
    # musubi-tuner can train a subset of the block linears; diffusers' musubi converter
    # only takes all ten, the family routes such files through the original-layout one.
    cases["musubi-partial"] = (attention_only, "musubi")
    cases["original-partial"] = (attention_only, "comfy")
    spec = _spec(T2V_A14B, **BOTH_EXPERTS)
    state = AdapterState()
    renders = {}
    for case, (which, layout) in cases.items():
        path = write_wan_lora(which, tmp_path / f"{case}.safetensors", layout)
        header = read_header(path)
        probe = FAMILY.probe_lora(header, probe_lora_file(header))
        assert probe is not None and probe.family == "wan22" and probe.architecture == "wan"
        assert probe.variant is None and probe.expert is None  # tiny width, no name words
        shown = {"musubi": "musubi-tuner", "comfy": "original", "original": "original",
                 "peft": "PEFT", "diffusers": "diffusers"}[layout]
        assert shown in probe.reason, (case, probe.reason)
        use = LoraUse(name=case, autov3=case.replace("-", "_"))
        report = apply_loras(t2v, FAMILY, (use,), {case: path}, state)[case]
        patched = len(which.modules)
        assert _patched(report) == {"transformer": patched, "transformer_2": patched}, case
        renders[case] = _render(t2v, spec)
    base = renders.pop("diffusers")
    partial = renders.pop("musubi-partial")
    assert np.abs(renders.pop("original-partial") - partial).max() <= 1
    assert np.abs(partial - base).max() > 0
    for case, video in renders.items():
        # float16 storage (musubi) and folded scaling round differently in the last bits.
        assert np.abs(video - base).max() <= 1, case


def test_a_hot_folder_lora_goes_to_the_expert_its_name_says(farm, t2v: Any) -> None:
    loras = farm.config.paths.loras
    write_wan_lora(make_tiny_wan_lora(t2v.transformer, seed=3),
                   loras / "watercolor_HIGH.safetensors", "musubi")
    write_wan_lora(make_tiny_wan_lora(t2v.transformer, seed=4),
                   loras / "watercolor_LOW.safetensors", "musubi")
    job = demo_job(T2V_A14B, "a red boat", seed=61, count=1, steps=2,
                   extra="flow_shift = 3.0\n")
    farm.drop("plain.toml", job)
    farm.drop("high.toml", job + '[[loras]]\nname = "watercolor_HIGH"\n')
    farm.drop("low.toml", job + '[[loras]]\nname = "watercolor_LOW"\n')
    # A job may override the guess; the pair's shared name stands for both files.
    farm.drop("forced.toml", job + '[[loras]]\nname = "watercolor_LOW"\nexpert = "both"\n')
    farm.drop("pair.toml", job + '[[loras]]\nname = "watercolor"\nstrength = 0.9\n')
    assert farm.run() == 0
    assert len(farm.files_in("done")) == 5, farm.files_in("failed")
    history = {job["file"]: job["renders"][0] for job in farm.history()}
    patched = TINY_BLOCKS * BLOCK_LINEARS
    reports = {name: {lora: _patched(report) for lora, report in
                      history[f"{name}.toml"]["lora_patches"].items()}
               for name in ("high", "low", "forced")}
    assert reports["high"] == {"watercolor_HIGH": {"transformer": patched}}
    assert reports["low"] == {"watercolor_LOW": {"transformer_2": patched}}
    assert reports["forced"] == {
        "watercolor_LOW": {"transformer": patched, "transformer_2": patched}}
    assert history["high.toml"]["loras"][0]["expert"] == "high"
    assert history["forced.toml"]["loras"][0]["expert"] == "both"
    pair = {lora: _patched(report) for lora, report in
            history["pair.toml"]["lora_patches"].items()}
    assert pair == {"watercolor_HIGH": {"transformer": patched},
                    "watercolor_LOW": {"transformer_2": patched}}
    assert [(lora["name"], lora["expert"], lora["strength"])
            for lora in history["pair.toml"]["loras"]] == [
        ("watercolor_HIGH", "high", 0.9), ("watercolor_LOW", "low", 0.9)]
    videos = {job: np.stack(_decoded_frames(paths[0])).astype(np.int16)
              for job, paths in _videos(farm).items()}
    for name in ("high", "low", "forced"):
        assert np.abs(videos[name] - videos["plain"]).max() > 0, name
    assert not np.array_equal(videos["high"], videos["low"])
    assert not np.array_equal(videos["low"], videos["forced"])


def test_a_lora_of_the_other_model_size_is_refused_at_intake(farm) -> None:
    loras = farm.config.paths.loras
    write_real_size_wan_lora(loras / "big14b.safetensors", "14b", "musubi")
    write_real_size_wan_lora(loras / "five.safetensors", "5b", "original")
    write_real_size_wan_lora(loras / "small21.safetensors", "1.3b", "diffusers")
    farm.drop("14b-on-5b.toml", demo_job(TI2V_5B, "a cat", seed=1, count=1)
              + '[[loras]]\nname = "big14b"\n')
    farm.drop("5b-on-14b.toml", demo_job(T2V_A14B, "a cat", seed=1, count=1)
              + '[[loras]]\nname = "five"\n')
    farm.drop("1.3b-on-14b.toml", demo_job(I2V_A14B, "a cat", seed=1, count=1)
              + '[[loras]]\nname = "small21"\n')
    assert farm.run() == 0
    assert sorted(farm.files_in("rejected")) == sorted(
        [f"{n}.toml{s}" for n in ("14b-on-5b", "5b-on-14b", "1.3b-on-14b")
         for s in ("", ".error.txt")])
    report = farm.rejection("14b-on-5b.toml")
    assert "Wan 14B (2.1 or 2.2 A14B) LoRA" in report and "Wan 2.2 TI2V-5B" in report
    assert "it fits Wan 2.2 T2V-A14B and Wan 2.2 I2V-A14B" in report
    report = farm.rejection("5b-on-14b.toml")
    assert "Wan 2.2 TI2V-5B LoRA" in report and "it fits Wan 2.2 TI2V-5B" in report
    report = farm.rejection("1.3b-on-14b.toml")
    assert "Wan 2.1 1.3B LoRA" in report and "no Wan 2.2 release has that size" in report


# --- LoRA recognition -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["musubi", "original", "diffusers"])
@pytest.mark.parametrize(("size", "title"), [("14b", "Wan 14B"), ("5b", "TI2V-5B"),
                                             ("1.3b", "Wan 2.1 1.3B")])
def test_real_size_loras_name_their_model_size(tmp_path: Path, layout: str, size: str,
                                               title: str) -> None:
    path = write_real_size_wan_lora(tmp_path / "x.safetensors", size, layout)
    header = read_header(path)
    probe = FAMILY.probe_lora(header, probe_lora_file(header))
    assert probe is not None and probe.variant == size and title in probe.reason


def test_tiny_loras_take_their_size_from_metadata(t2v: Any, tmp_path: Path) -> None:
    lora = make_tiny_wan_lora(t2v.transformer, seed=1, layers=("self_attn.q",))
    for architecture, size in (("wan2.2-ti2v-5b/lora", "5b"), ("wan2.1-t2v-14b/lora", "14b"),
                               ("wan2.1/lora", None)):
        path = write_wan_lora(lora, tmp_path / "m.safetensors", "diffusers",
                              metadata={"modelspec.architecture": architecture})
        header = read_header(path)
        probe = FAMILY.probe_lora(header, probe_lora_file(header))
        assert probe is not None and probe.variant == size, architecture
    assert FAMILY.lora_fits("5b", T2V_A14B) and FAMILY.lora_fits("14b", TI2V_5B)
    assert FAMILY.lora_fits("14b", I2V_A14B) is None and FAMILY.lora_fits(None, TI2V_5B) is None


@pytest.mark.parametrize(("name", "expert"), [
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16.safetensors", "high"),
    ("wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", "low"),
    ("myStyle-HighNoise.safetensors", "high"),
    ("style_low-noise_v2.safetensors", "low"),
    ("highres_fix_slow_motion.safetensors", None),
    ("high_and_low.safetensors", None),
    ("flow_matching_style.safetensors", None),
])
def test_the_expert_comes_from_the_file_name(name: str, expert: str | None) -> None:
    assert expert_of(name, {})[0] == expert


def test_the_expert_falls_back_to_the_training_output_name() -> None:
    assert expert_of("renamed.safetensors", {"ss_output_name": "portrait_high_noise"}) == (
        "high", "metadata ss_output_name")


def test_high_and_low_files_pair_by_name() -> None:
    assert lora_pair_name("Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16") == (
        "Wan2.2-Lightning_T2V-A14B-4steps-lora_fp16", "high")
    assert lora_pair_name("Wan2.2-Lightning_T2V-A14B-4steps-lora_LOW_fp16") == (
        "Wan2.2-Lightning_T2V-A14B-4steps-lora_fp16", "low")
    assert lora_pair_name("wan22_i2v_v1_high_noise") == ("wan22_i2v_v1", "high")
    assert lora_pair_name("wan22_i2v_v1_low_noise") == ("wan22_i2v_v1", "low")
    assert lora_pair_name("highres_style") is None
    assert lora_pair_name("high_low") is None


def test_loras_of_other_transformers_are_not_claimed(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    down, up = torch.zeros(1, 8), torch.zeros(8, 1)
    others = {
        "hunyuan-musubi": "lora_unet_double_blocks_0_img_attn_qkv",
        "flux-diffusers": "transformer.single_transformer_blocks.0.attn.to_q",
        "ltx-diffusers": "transformer.transformer_blocks.0.attn1.to_q",
        "flux-original": "diffusion_model.double_blocks.0.img_attn.qkv",
        "sdxl-kohya": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    }
    for name, module in others.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up},
                  str(path))
        header = read_header(path)
        assert FAMILY.probe_lora(header, probe_lora_file(header)) is None, name


# --- demo -------------------------------------------------------------------------------------


def test_build_demo_writes_three_small_releases_a_job_each_and_an_input_image(
        tmp_path: Path) -> None:
    started = time.perf_counter()
    assets = FAMILY.build_demo(tmp_path / "models", tmp_path / "configs")
    assert time.perf_counter() - started < 2.0
    for variant, name in DEMO_CHECKPOINTS.items():
        folder = tmp_path / "models" / name
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 1_000_000, (name, size)
        probe = FAMILY.probe_checkpoint(CheckpointSource.for_folder(name, folder))
        assert probe is not None and probe.variant == variant
    assert (tmp_path / "inputs" / DEMO_IMAGE).is_file()
    # A 32-wide T2V-A14B and its experts as GGUF pairs (tests/families/test_quantized.py
    # renders them).
    for high, low in DEMO_GGUF_PAIRS.values():
        for name in (high, low):
            assert (tmp_path / "models" / f"{name}.gguf").stat().st_size < 200_000
        assert f'transformer_2 = "{low}.gguf"' in (tmp_path / "models" / f"{high}.toml").read_text()
    assert sorted(assets.jobs) == ["wan22-i2v.toml", "wan22-t2v-gguf.toml", "wan22-t2v.toml",
                                   "wan22-ti2v.toml"]
    assert f'image = "{DEMO_IMAGE}"' in assets.jobs["wan22-i2v.toml"]
    assert assets.checkpoint_overrides == {}
    with Image.open(tmp_path / "inputs" / DEMO_IMAGE) as image:
        assert image.size == (64, 48)
