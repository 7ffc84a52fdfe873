"""HunyuanVideo and HunyuanVideo 1.5: tiny checkpoints built offline, clips rendered through
the hot folder into MP4s, LoRAs in every layout the family loads, Flux.1 LoRAs kept out."""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: they read this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideo15Pipeline, HunyuanVideoPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from daemon.contract.family import (
    BatchAborted,
    CheckpointSource,
    LoadedCheckpoint,
    Progress,
    RenderedVideo,
    RenderError,
)
from daemon.contract.spec import LoraUse, RenderSpec
from daemon.formats.lora_probe import probe_lora_file
from daemon.formats.safetensors_header import read_header
from daemon.output.files import read_spec
from daemon.plugin_api import pipeline_facts
from daemon.render.lora_patching import count_patched_modules
from families.hunyuan_video.hunyuan_video import (
    DEMO_V10,
    DEMO_V15,
    PROMPT_TEMPLATE,
    HunyuanLoraLayoutError,
    HunyuanVideo15Family,
    HunyuanVideoFamily,
    hunyuan_prompt_template,
    recognise_hunyuan_lora,
    to_original_layout,
)
from families.hunyuan_video.tiny import (
    LAYOUTS,
    build_tiny_hunyuan_video15_pipeline,
    build_tiny_hunyuan_video_pipeline,
    make_tiny_hunyuan_lora,
    save_tiny_folder,
    tiny_llama_tokenizer,
    write_hunyuan_lora,
    write_hunyuan_video15_lora,
    write_real_size_lora_header,
)
from families.sdxl.tiny_loras import write_flux_like
from tests.support.helpers import job_text

V10 = HunyuanVideoFamily()
V15 = HunyuanVideo15Family()
CPU = torch.device("cpu")


# --- helpers ----------------------------------------------------------------------------------


def _job(checkpoint: str = DEMO_V10, prompt: str = "a paper boat on a rainy street",
         seed: int = 11, count: int = 1, extra: str = "") -> str:
    return job_text(checkpoint=checkpoint, prompt=prompt, seed=seed, count=count, steps=2,
                    width=64, height=64, frames=5, fps=8) + extra


def _spec(prompt: str = "a red ball", seed: int = 1, **extra: Any) -> RenderSpec:
    settings: dict[str, Any] = {"frames": 5, "fps": 8, "guidance": 6.0, "flow_shift": 7.0}
    settings.update(extra)
    return RenderSpec(family=V10.name, checkpoint="tiny", prompt=prompt, negative_prompt="",
                      seed=seed, steps=2, cfg=1.0, sampler="Euler", schedule=None, width=32,
                      height=32, extra=settings)


def _spec15(seed: int = 1, cfg: float = 6.0) -> RenderSpec:
    return RenderSpec(family=V15.name, checkpoint="tiny15", prompt="a red ball",
                      negative_prompt="", seed=seed, steps=2, cfg=cfg, sampler="Euler",
                      schedule=None, width=32, height=32, extra={"frames": 5, "fps": 8})


def _pixels(video: RenderedVideo) -> np.ndarray:
    return np.stack([np.asarray(frame, dtype=np.int16) for frame in video.frames])


def _decode(path: Path) -> tuple[list[np.ndarray], dict[str, str], float]:
    """Every frame of an MP4, counted by decoding (the header's count can lie), its metadata
    and its frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, dict(container.metadata), float(stream.average_rate or 0)


def _freeze(pipe: Any) -> None:
    # As the worker does after a LoRA load: trainable PEFT layers change CPU kernels.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)


def _probe(path: Path, family: Any = V10) -> Any:
    header = read_header(path)
    return family.probe_lora(header, probe_lora_file(header))


@pytest.fixture(scope="module")
def tiny() -> HunyuanVideoPipeline:
    return build_tiny_hunyuan_video_pipeline(seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tiny: HunyuanVideoPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_folder(tiny, tmp_path_factory.mktemp("hv") / "tiny-hv")


def _load(folder: Path, family: Any = V10) -> Any:
    return family.load_pipeline(LoadedCheckpoint(folder.name, folder, "folder", None), CPU,
                                torch.float32)


@pytest.fixture(scope="module")
def loaded(tiny_folder: Path) -> Any:
    """The tiny folder loaded by the family; tests that load LoRAs load their own copy."""
    return _load(tiny_folder)


# --- the tiny checkpoints ---------------------------------------------------------------------


def test_tiny_hunyuan_video_round_trips_through_from_pretrained(
        tiny: HunyuanVideoPipeline, tiny_folder: Path) -> None:
    loaded = HunyuanVideoPipeline.from_pretrained(tiny_folder, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    prompt = "A red ball, 2 cubes!"
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, name)(prompt).input_ids == getattr(tiny, name)(prompt).input_ids
    # HunyuanVideo's tokenizer pads on the right (Llama's default is left) and adds BOS.
    assert loaded.tokenizer.padding_side == "right"
    assert loaded.tokenizer(prompt).input_ids[0] == loaded.tokenizer.bos_token_id
    assert loaded.tokenizer.convert_tokens_to_ids("<|eot_id|>") != loaded.tokenizer.unk_token_id
    assert loaded.scheduler.config.shift == 7.0
    assert loaded.vae_scale_factor_spatial == 8 and loaded.vae_scale_factor_temporal == 4
    assert loaded.text_encoder.config.vocab_size >= len(loaded.tokenizer)
    assert loaded.transformer.config.text_embed_dim == loaded.text_encoder.config.hidden_size
    assert (loaded.transformer.config.pooled_projection_dim
            == loaded.text_encoder_2.config.hidden_size)


def test_builds_are_deterministic_and_leave_the_callers_rng_alone(
        tiny: HunyuanVideoPipeline) -> None:
    before = torch.get_rng_state()
    same, other = build_tiny_hunyuan_video_pipeline(seed=0), build_tiny_hunyuan_video_pipeline(1)
    assert torch.equal(torch.get_rng_state(), before)
    for name in ("transformer", "text_encoder"):
        want = getattr(tiny, name).state_dict()
        assert all(torch.equal(v, getattr(same, name).state_dict()[k]) for k, v in want.items())
        assert any(not torch.equal(v, getattr(other, name).state_dict()[k])
                   for k, v in want.items())
    # BPE training: the same vocabulary every time (checked across processes with different
    # hash seeds when this was written; the trainer's hash maps are reseeded per call too).
    trained = {tiny_llama_tokenizer().backend_tokenizer.to_str() for _ in range(3)}
    assert trained == {tiny.tokenizer.backend_tokenizer.to_str()}


def test_crop_start_is_recomputed_for_the_tiny_tokenizer(loaded: Any) -> None:
    template = pipeline_facts(loaded).extras[PROMPT_TEMPLATE]
    tokenizer = loaded.tokenizer
    crop = template["crop_start"]
    assert crop != 95  # diffusers' value, for the released Llama 3 tokenizer
    for prompt in ("a red ball", "Zebras at dawn"):
        ids = tokenizer(template["template"].format(prompt)).input_ids
        # What is kept starts exactly with the prompt; the template is cut away entirely.
        assert tokenizer.decode(ids[crop:], skip_special_tokens=True).strip() == prompt
    # A tokenizer of the released size keeps diffusers' own template untouched.

    class Released:
        def __len__(self) -> int:
            return 128_256

    assert hunyuan_prompt_template(Released())["crop_start"] == 95


@pytest.fixture(scope="module")
def v15_built() -> HunyuanVideo15Pipeline:
    return build_tiny_hunyuan_video15_pipeline(seed=0)


@pytest.fixture(scope="module")
def v15_folder(v15_built: HunyuanVideo15Pipeline,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_folder(v15_built, tmp_path_factory.mktemp("hv15") / "tiny-hv15")


def test_hunyuan_video15_round_trip_crop_start_and_batches(
        v15_built: HunyuanVideo15Pipeline, v15_folder: Path) -> None:
    built, folder = v15_built, v15_folder
    plain = HunyuanVideo15Pipeline.from_pretrained(folder, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(built, name).state_dict(), getattr(plain, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert plain.guider.guidance_scale == 6.0
    # Stored in bfloat16 (as released), loaded as float32, equal to the built weights.
    weights = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert plain.transformer.dtype == torch.float32

    pipe = _load(folder, V15)
    crop = pipe.prompt_template_encode_start_idx
    assert crop != 108  # diffusers' value, for the released Qwen2.5 tokenizer
    messages = [{"role": "system", "content": pipe.system_message},
                {"role": "user", "content": "a red ball"}]
    ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert pipe.tokenizer.decode(ids[crop:]).startswith("a red ball")
    # A batch of two needs VAE slicing (set at load); each clip is its seed's alone. The
    # pipeline has no step callback: its progress bar reports the steps, and can abort.
    # (cfg 1 here halves the work; the hot-folder test renders with CFG.)
    steps: list[tuple[int, int]] = []
    pair = V15.render_batch(pipe, [_spec15(seed=3, cfg=1.0), _spec15(seed=4, cfg=1.0)], CPU,
                            _progress(steps))
    assert steps == [(1, 2), (2, 2)]
    with pytest.raises(BatchAborted):
        V15.render_batch(pipe, [_spec15(seed=3)], CPU, _progress([], abort_after=0))
    alone = V15.render_batch(pipe, [_spec15(seed=4, cfg=1.0)], CPU)
    assert [len(video.frames) for video in pair] == [5, 5]
    assert np.abs(_pixels(pair[1]) - _pixels(alone[0])).max() <= 1
    assert not np.array_equal(_pixels(pair[0]), _pixels(pair[1]))


def test_probe_checkpoint_reads_model_index(tiny_folder: Path, tmp_path: Path) -> None:
    source = CheckpointSource.for_folder("x", tiny_folder)
    probe = V10.probe_checkpoint(source)
    assert probe is not None and probe.family == "hunyuan-video" and "HunyuanVideoPipeline" in (
        probe.reason)
    assert V15.probe_checkpoint(source) is None
    other = tmp_path / "v15"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideo15Pipeline"}))
    assert V15.probe_checkpoint(CheckpointSource.for_folder("y", other)) is not None
    assert V10.probe_checkpoint(CheckpointSource.for_folder("y", other)) is None


def test_a_transformer_only_file_is_recognised_and_explained(tmp_path: Path) -> None:
    path = tmp_path / "hunyuan_video_720_bf16.safetensors"
    save_file({f"model.diffusion_model.{key}": torch.zeros(2, 2) for key in (
        "double_blocks.0.img_attn_qkv.weight",
        "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight")}, str(path))
    source = CheckpointSource(name="hv-file", path=path, kind="single_file",
                              header=read_header(path))
    probe = V10.probe_checkpoint(source)
    assert probe is not None and probe.variant == "single-file"
    assert V15.probe_checkpoint(source) is None
    message = V10.missing_requirements(LoadedCheckpoint("hv-file", path, "single_file", None))
    # Loadable with a base folder (see tests/families/test_quantized.py), which this one lacks.
    assert message is not None and "[checkpoints.hv-file] config" in message


def test_float16_loads_the_transformer_in_bfloat16(tiny_folder: Path) -> None:
    pipe = V10.load_pipeline(LoadedCheckpoint("t", tiny_folder, "folder", None), CPU,
                             torch.float16)
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16


def test_defaults_follow_the_community() -> None:
    d = V10.defaults
    assert (d.width, d.height, d.steps, d.cfg, d.sampler) == (1280, 720, 50, 1.0, "Euler")
    assert (d.guidance, d.flow_shift, d.frames, d.fps, d.frame_step, d.size_multiple) == (
        6.0, 7.0, 129, 24, 4, 16)
    d = V15.defaults
    assert (d.width, d.height, d.steps, d.cfg, d.frames, d.fps) == (848, 480, 50, 6.0, 121, 24)
    assert d.guidance is None
    assert (V10.produces, V10.sampler_kind, V10.architecture) == ("video", "flow",
                                                                  "hunyuan_video")
    assert V15.architecture != V10.architecture
    assert V10.lora_strengths(LoraUse("x", 0.7, text_encoder_strength=0.2)) == {
        "transformer": 0.7}


def _progress(steps: list[tuple[int, int]], abort_after: int | None = None) -> Progress:
    return Progress(2, lambda done, total: steps.append((done, total)),
                    lambda: abort_after is not None and len(steps) >= abort_after)


def test_flow_shift_guidance_and_cfg_reach_the_pipeline(loaded: Any) -> None:
    steps: list[tuple[int, int]] = []
    base = V10.render_batch(loaded, [_spec()], CPU, _progress(steps))[0]
    assert steps == [(1, 2), (2, 2)]  # the step callback reports every step
    assert loaded.scheduler.config.shift == 7.0
    shifted = V10.render_batch(loaded, [_spec(flow_shift=3.0)], CPU)[0]
    assert loaded.scheduler.config.shift == 3.0
    guided = V10.render_batch(loaded, [_spec(guidance=2.0)], CPU)[0]
    assert not np.array_equal(_pixels(base), _pixels(shifted))
    assert not np.array_equal(_pixels(base), _pixels(guided))
    true_cfg = V10.render_batch(loaded, [_spec(true_cfg=4.0)], CPU)[0]
    assert not np.array_equal(_pixels(base), _pixels(true_cfg))
    with pytest.raises(RenderError, match="no CFG scale"):
        V10.render_batch(loaded, [replace(_spec(), cfg=6.0)], CPU)


def test_batch_cost_grows_with_tokens_and_fits_published_peaks() -> None:
    def cost(family: Any, width: int, height: int, frames: int) -> float:
        spec = replace(_spec(), width=width, height=height, extra={"frames": frames})
        return family.batch_cost(spec) / 1e9

    # HunyuanVideo's README: 60 GB at 720p and 45 GB at 544p (129 frames), 26 GB of weights.
    assert 30 < cost(V10, 1280, 720, 129) < 40 and 15 < cost(V10, 960, 544, 129) < 25
    assert cost(V15, 848, 480, 121) < cost(V10, 848, 480, 121)
    assert cost(V10, 64, 64, 5) < 0.2


def test_prompt_weights_are_kept_in_the_prompt_with_a_warning() -> None:
    # The prompt stays as written (history, infotext); render_batch strips it for the encoder
    # (tests/families/test_prompt_weights_families.py).
    prompt, negative, notes = V10.apply_conventions("a (red:1.3) ball (at dusk)", None, True)
    assert (prompt, negative) == ("a (red:1.3) ball (at dusk)", "")
    # Plain brackets are punctuation to these encoders: only the explicit weight goes.
    assert len(notes) == 1 and "(red:1.3) read as plain text" in notes[0]
    assert "at dusk" not in notes[0]
    assert V15.apply_conventions("a ball, \\(not:2\\)", "(blurry:1.2)", True)[2] == [
        "negative_prompt: HunyuanVideo 1.5 has no prompt weighting: (blurry:1.2) read as "
        "plain text"]


def test_build_demo_is_quick_and_small(tmp_path: Path) -> None:
    started = time.perf_counter()
    jobs = {**V10.build_demo(tmp_path, tmp_path).jobs, **V15.build_demo(tmp_path, tmp_path).jobs}
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0  # measured ~0.5 s on one thread; generous for busy machines
    sizes = {name: sum(f.stat().st_size for f in (tmp_path / name).rglob("*") if f.is_file())
             for name in (DEMO_V10, DEMO_V15)}
    # 1.5's ByT5 projection is 2048 wide whatever the config: ~9 MB in bfloat16.
    assert sizes[DEMO_V10] < 2_000_000 and sizes[DEMO_V15] < 10_000_000, sizes
    assert set(jobs) == {"hunyuan-video.toml", "hunyuan-video-gguf.toml",
                         "hunyuan-video-1.5.toml"}
    assert all("frames = 5" in text for text in jobs.values())


# --- through the hot folder ---------------------------------------------------------------------


def test_a_job_renders_mp4s_with_the_frame_count_metadata_and_a_poster(farm) -> None:
    farm.drop("boat.toml", _job(prompt="a paper boat, (rain:1.2)", seed=41, count=2))
    farm.drop("v15.toml", _job(DEMO_V15, seed=7, count=2, extra="cfg = 4.0\n"))
    assert farm.run() == 0
    assert farm.files_in("done") == ["boat.toml", "v15.toml"]

    videos = sorted(farm.outputs.rglob("*.mp4"))
    assert len(videos) == 4
    seeds = []
    for video in videos:
        frames, metadata, rate = _decode(video)
        assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
        assert rate == 8
        infotext = metadata["parameters"]
        spec = read_spec(video)
        seeds.append(spec.seed)
        assert f"Seed: {spec.seed}" in infotext and "Frames: 5" in infotext
        assert infotext.splitlines()[-1].startswith("Steps: 2, Sampler: Euler")
        if spec.family == "hunyuan-video":
            # The prompt as written; only the text encoder reads it without the weight.
            assert infotext.startswith("a paper boat, (rain:1.2)\n")
            assert "Distilled CFG Scale: 6" in infotext and "Shift: 7" in infotext
        else:
            assert infotext.startswith("a paper boat on a rainy street\n")
            assert "CFG scale: 4" in infotext
        poster = video.with_suffix(".png")
        with Image.open(poster) as image:
            assert image.size == (64, 64) and "parameters" in image.text
    assert sorted(seeds) == [7, 8, 41, 42]

    history = {job["file"]: job for job in farm.history()}
    assert any("no prompt weighting" in note for note in history["boat.toml"]["warnings"])
    assert all(r["frames"] == 5 and r["fps"] == 8 and r["state"] == "done"
               for job in history.values() for r in job["renders"])


def test_frame_counts_that_are_not_4k_plus_1_are_rejected(farm) -> None:
    farm.drop("six.toml", _job().replace("frames = 5", "frames = 6"))
    farm.drop("neg.toml", _job(extra='negative_prompt = "blurry"\n'))
    assert farm.run() == 0
    assert farm.files_in("rejected") == ["neg.toml", "neg.toml.error.txt", "six.toml",
                                         "six.toml.error.txt"]
    report = farm.rejection("six.toml")
    assert "`frames` = 6" in report and "4k+1" in report and "use 5 or 9" in report
    report = farm.rejection("neg.toml")
    assert "negative prompt" in report and "true_cfg" in report
    assert not list(farm.outputs.rglob("*.mp4"))


def test_a_musubi_lora_renders_through_the_hot_folder(farm, tiny: HunyuanVideoPipeline) -> None:
    lora = make_tiny_hunyuan_lora(tiny.transformer, seed=5)
    write_hunyuan_lora(lora, farm.config.paths.loras / "paper-style.safetensors", "musubi")
    farm.drop("plain.toml", _job())
    farm.drop("styled.toml", _job(prompt="a paper boat on a rainy street <lora:paper-style:0.8>"))
    assert farm.run() == 0
    assert farm.files_in("done") == ["plain.toml", "styled.toml"]
    by_job = {p.parent.name.rsplit("-", 1)[0]: _decode(p) for p in farm.outputs.rglob("*.mp4")}
    assert not np.array_equal(np.stack(by_job["plain"][0]), np.stack(by_job["styled"][0]))
    assert "<lora:paper-style:0.8>" in by_job["styled"][1]["parameters"]
    [styled] = [job for job in farm.history() if job["file"] == "styled.toml"]
    # 24 modules in the file; each fused q/k/v patches three diffusers modules.
    assert styled["renders"][0]["lora_patches"] == {"paper-style": {
        "transformer": lora.patched_modules("musubi"), "modules_in_file": len(lora.modules)}}


# --- LoRAs ------------------------------------------------------------------------------------


def test_every_layout_is_claimed_patches_the_expected_modules_and_renders_the_same(
        tiny: HunyuanVideoPipeline, tiny_folder: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_folder)
    base = _pixels(V10.render_batch(pipe, [_spec()], CPU)[0])
    lora = make_tiny_hunyuan_lora(tiny.transformer, seed=3)
    results: dict[str, np.ndarray] = {}
    for layout in LAYOUTS:
        path = write_hunyuan_lora(lora, tmp_path / f"{layout}.safetensors", layout)
        probe = _probe(path)
        assert probe is not None and probe.architecture == "hunyuan_video", layout
        assert probe.score >= 0.9 and _probe(path, V15) is None, layout
        name = f"lf_{layout.replace('-', '_')}"
        V10.load_lora(pipe, path, name, LoraUse(layout))
        _freeze(pipe)
        assert count_patched_modules(pipe, name) == {
            "transformer": lora.patched_modules(layout)}, layout
        pipe.enable_lora()
        pipe.set_adapters([name], adapter_weights=[V10.lora_strengths(LoraUse(layout))])
        results[layout] = _pixels(V10.render_batch(pipe, [_spec()], CPU)[0])
        assert np.abs(results[layout] - base).max() > 8, layout  # the LoRA changed the clip
    # Same update in every layout (musubi's float16 and folded alpha may move one step);
    # the diffusers file also patches the token refiner, so it is compared without it below.
    for layout in LAYOUTS:
        if layout != "diffusers":
            assert np.abs(results[layout] - results["original"]).max() <= 1, layout
    no_refiner = write_hunyuan_lora(lora, tmp_path / "d.safetensors", "diffusers", refiner=False)
    V10.load_lora(pipe, no_refiner, "lf_plain", LoraUse("plain"))
    _freeze(pipe)
    pipe.set_adapters(["lf_plain"], adapter_weights=[{"transformer": 1.0}])
    plain = _pixels(V10.render_batch(pipe, [_spec()], CPU)[0])
    assert np.abs(plain - results["original"]).max() <= 1
    pipe.set_adapters(["lf_plain"], adapter_weights=[{"transformer": 0.0}])
    assert np.array_equal(_pixels(V10.render_batch(pipe, [_spec()], CPU)[0]), base)


def test_musubi_keys_are_renamed_to_the_original_layout_and_alpha_is_folded() -> None:
    down, up = torch.ones(4, 6), torch.full((18, 4), 2.0)
    converted = to_original_layout({
        "lora_unet_double_blocks_3_img_mlp_fc1.lora_down.weight": down,
        "lora_unet_double_blocks_3_img_mlp_fc1.lora_up.weight": up,
        "lora_unet_double_blocks_3_img_mlp_fc1.alpha": torch.tensor(1.0),
        "lora_unet_single_blocks_12_modulation_linear.lora_down.weight": down,
        "lora_unet_single_blocks_12_modulation_linear.lora_up.weight": up,
    })
    assert set(converted) == {
        "diffusion_model.double_blocks.3.img_mlp.fc1.lora_A.weight",
        "diffusion_model.double_blocks.3.img_mlp.fc1.lora_B.weight",
        "diffusion_model.single_blocks.12.modulation.linear.lora_A.weight",
        "diffusion_model.single_blocks.12.modulation.linear.lora_B.weight"}
    assert torch.equal(converted["diffusion_model.double_blocks.3.img_mlp.fc1.lora_B.weight"],
                       up / 4)  # alpha 1 / rank 4
    assert torch.equal(
        converted["diffusion_model.single_blocks.12.modulation.linear.lora_B.weight"], up)
    with pytest.raises(HunyuanLoraLayoutError, match="lora_unet_txt_in_input_embedder"):
        to_original_layout({"lora_unet_txt_in_input_embedder.lora_down.weight": down,
                            "lora_unet_txt_in_input_embedder.lora_up.weight": up})
    with pytest.raises(HunyuanLoraLayoutError, match="lacks its up matrix"):
        to_original_layout({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down})


def test_a_fused_token_refiner_lora_is_refused_with_a_reason(loaded: Any, tmp_path: Path) -> None:
    # diffusers 0.42 splits the refiner's fused q/k/v down matrix in three; PEFT then fails
    # with a size mismatch deep inside. The family says what is wrong instead.
    path = tmp_path / "refiner.safetensors"
    module = "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn_qkv"
    save_file({f"{module}.lora_A.weight": torch.zeros(3, 24),
               f"{module}.lora_B.weight": torch.zeros(72, 3)}, str(path))
    assert _probe(path) is not None
    with pytest.raises(HunyuanLoraLayoutError, match="token refiner's fused q/k/v"):
        V10.load_lora(loaded, path, "lf_refiner", LoraUse("refiner"))


def test_musubi_file_written_by_the_tiny_writer_uses_musubi_names(
        tiny: HunyuanVideoPipeline, tmp_path: Path) -> None:
    lora = make_tiny_hunyuan_lora(tiny.transformer, seed=3)
    tensors = load_file(str(write_hunyuan_lora(lora, tmp_path / "m.safetensors", "musubi")))
    assert "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight" in tensors
    assert "lora_unet_single_blocks_0_modulation_linear.alpha" in tensors
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert read_header(tmp_path / "m.safetensors").metadata["modelspec.architecture"] == (
        "hunyuan-video/lora")


def test_hunyuan_video15_lora_loads_into_the_transformer_and_switches(
        v15_folder: Path, tmp_path: Path) -> None:
    pipe = _load(v15_folder, V15)
    base = _pixels(V15.render_batch(pipe, [_spec15(cfg=1.0)], CPU)[0])
    path, expected = write_hunyuan_video15_lora(pipe.transformer, tmp_path / "l.safetensors")
    probe = _probe(path, V15)
    assert probe is not None and probe.architecture == "hunyuan_video_1_5"
    assert _probe(path, V10) is None
    V15.load_lora(pipe, path, "lf_v15", LoraUse("v15"))
    _freeze(pipe)
    assert count_patched_modules(pipe, "lf_v15") == {"transformer": expected}
    # The pipeline-level adapter API the worker uses, which diffusers does not give 1.5.
    pipe.enable_lora()
    pipe.set_adapters(["lf_v15"], adapter_weights=[{"transformer": 1.0}])
    styled = _pixels(V15.render_batch(pipe, [_spec15(cfg=1.0)], CPU)[0])
    assert np.abs(styled - base).max() > 8
    pipe.disable_lora()
    assert np.array_equal(_pixels(V15.render_batch(pipe, [_spec15(cfg=1.0)], CPU)[0]), base)
    pipe.delete_adapters(["lf_v15"])
    assert count_patched_modules(pipe, "lf_v15") == {}


@pytest.mark.parametrize("kind, version", [("hv-musubi", "1.0"), ("hv-diffusers", "1.0"),
                                           ("hv15-diffusers", "1.5")])
def test_real_size_hunyuan_loras_are_told_apart_by_block_depth(tmp_path: Path, kind: str,
                                                              version: str) -> None:
    """Attention-only files whose names Flux.1 shares: only block 19 / 39 (or 53 at width
    2048) says HunyuanVideo."""
    path = write_real_size_lora_header(tmp_path / f"{kind}.safetensors", kind)
    header = read_header(path)
    guess = recognise_hunyuan_lora(header, probe_lora_file(header))
    assert guess is not None and guess.version == version, guess
    assert "block" in guess.reason


@pytest.mark.parametrize("kind", ["flux-kohya", "flux-original", "flux-diffusers"])
def test_flux1_loras_are_not_claimed(tmp_path: Path, kind: str) -> None:
    path = write_real_size_lora_header(tmp_path / f"{kind}.safetensors", kind)
    assert _probe(path) is None and _probe(path, V15) is None


def test_a_flux1_lora_is_refused_for_hunyuan_video(farm, plugins) -> None:
    path = write_flux_like(farm.config.paths.loras / "flux1-style.safetensors")
    header = read_header(path)
    facts = probe_lora_file(header)
    assert V10.probe_lora(header, facts) is None and V15.probe_lora(header, facts) is None
    farm.drop("flux1.toml", _job(prompt="a boat <lora:flux1-style:1>"))
    assert farm.run() == 0
    assert farm.files_in("rejected") == ["flux1.toml", "flux1.toml.error.txt"]
    report = farm.rejection("flux1.toml")
    assert "flux1-style" in report and "hunyuan_video" in report
