"""FLUX.2 [klein]: tiny checkpoints built offline, both variants rendered through the hot
folder, LoRAs in every layout diffusers loads, and Flux.1 LoRAs kept out."""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: they read this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from safetensors.torch import save_file
from sd_parsers import ParserManager

from daemon.contract.family import CheckpointSource, LoadedCheckpoint, RenderError
from daemon.contract.spec import LoraUse, RenderSpec
from daemon.formats.lora_probe import probe_lora_file
from daemon.formats.safetensors_header import read_header
from daemon.output.files import read_spec
from daemon.render.lora_patching import count_patched_modules
from daemon.store.models import Render
from families.flux2_klein.flux2_klein import (
    BASE,
    DEMO_BASE,
    DEMO_DISTILLED,
    DISTILLED,
    Flux2KleinFamily,
)
from families.flux2_klein.tiny import (
    TEXT_HIDDEN,
    TEXT_LAYERS,
    build_tiny_klein_pipeline,
    make_tiny_klein_lora,
    patched_module_count,
    save_tiny_klein_folder,
    save_tiny_klein_transformer_file,
    write_klein_lora_ai_toolkit,
    write_klein_lora_diffusers,
    write_klein_lora_kohya,
    write_klein_lora_original_down,
    write_klein_lora_peft,
    write_real_size_klein_lora,
)
from families.sdxl.tiny_loras import write_flux_like
from tests.support.helpers import job_text, pixels_of, rows

FAMILY = Flux2KleinFamily()
CPU = torch.device("cpu")
LORA_WRITERS = {
    "diffusers": write_klein_lora_diffusers,
    "peft": write_klein_lora_peft,
    "ai-toolkit": write_klein_lora_ai_toolkit,
    "original-down": write_klein_lora_original_down,
    "kohya": write_klein_lora_kohya,
}


@pytest.fixture(scope="module")
def distilled() -> Flux2KleinPipeline:
    return build_tiny_klein_pipeline(seed=0, distilled=True)


@pytest.fixture(scope="module")
def distilled_folder(distilled: Flux2KleinPipeline, tmp_path_factory: pytest.TempPathFactory
                     ) -> Path:
    return save_tiny_klein_folder(distilled, tmp_path_factory.mktemp("klein") / "tiny-klein")


def _job(checkpoint: str = DEMO_DISTILLED, prompt: str = "a lantern over a lake",
         extra: str = "") -> str:
    return job_text(checkpoint=checkpoint, prompt=prompt, seed=11, width=64, height=64) + extra


def _spec(cfg: float, seed: int = 5) -> RenderSpec:
    return RenderSpec(family=FAMILY.name, checkpoint="x", prompt="a red ball", negative_prompt="",
                      seed=seed, steps=2, cfg=cfg, sampler="Euler", schedule=None, width=32,
                      height=32)


def _same_weights(want: torch.nn.Module, got: torch.nn.Module) -> None:
    """Every tensor present, materialised and bit-identical (a weight a loader failed to
    fill stays on the meta device or keeps its random init without an error)."""
    expected, actual = want.state_dict(), got.state_dict()
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert actual[key].device.type == "cpu", key
        assert torch.equal(actual[key], tensor), key


def _header_only(path: Path, shapes: dict[str, tuple[int, int]], metadata: dict[str, str]
                 | None = None, *, kohya: bool = False) -> Path:
    """A rank-1 float16 LoRA with the given module -> (in, out) shapes, for probe tests."""
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (
            ".lora_A.weight", ".lora_B.weight")
        tensors[module + down] = torch.zeros(1, fan_in, dtype=torch.float16)
        tensors[module + up] = torch.zeros(fan_out, 1, dtype=torch.float16)
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    return path


def _probe_lora(path: Path):  # type: ignore[no-untyped-def]
    header = read_header(path)
    return FAMILY.probe_lora(header, probe_lora_file(header))


# --- the tiny checkpoint ---------------------------------------------------------------------


def test_tiny_klein_has_the_real_layout(distilled: Flux2KleinPipeline) -> None:
    te = distilled.text_encoder.config
    assert te.num_hidden_layers == TEXT_LAYERS >= 28  # hidden_states[27] is read
    assert te.head_dim == 8  # explicit: Qwen3Config's default (128) ignores the width
    assert distilled.transformer.config.joint_attention_dim == 3 * TEXT_HIDDEN
    assert distilled.transformer.config.guidance_embeds is False
    assert distilled.vae_scale_factor == 8
    assert distilled.config.is_distilled is True
    assert te.vocab_size >= len(distilled.tokenizer)
    text = distilled.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red ball"}], tokenize=False,
        add_generation_prompt=True, enable_thinking=False)
    assert text == ("<|im_start|>user\na red ball<|im_end|>\n<|im_start|>assistant\n"
                    "<think>\n\n</think>\n\n")
    ids = distilled.tokenizer(text).input_ids
    assert ids[0] == distilled.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert distilled.tokenizer.decode(ids) == text


def test_builds_are_deterministic_and_leave_the_callers_rng_alone(
        distilled: Flux2KleinPipeline) -> None:
    rng = torch.get_rng_state()
    again = build_tiny_klein_pipeline(seed=0, distilled=True)
    base = build_tiny_klein_pipeline(seed=1, distilled=False)
    assert torch.equal(torch.get_rng_state(), rng)
    _same_weights(distilled.transformer, again.transformer)
    assert not torch.equal(distilled.transformer.x_embedder.weight,
                           base.transformer.x_embedder.weight)
    assert base.config.is_distilled is False


@pytest.mark.parametrize("variant", [DISTILLED, BASE])
def test_folder_round_trip(variant: str, tmp_path: Path) -> None:
    pipe = build_tiny_klein_pipeline(seed=2, distilled=variant == DISTILLED)
    folder = save_tiny_klein_folder(pipe, tmp_path / variant)

    loaded = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)

    for name in ("transformer", "vae", "text_encoder"):
        _same_weights(getattr(pipe, name), getattr(loaded, name))
    assert loaded.config.is_distilled is (variant == DISTILLED)
    prompt = "a Red ball, 2 cubes!"
    assert loaded.tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids
    assert loaded.tokenizer.chat_template == pipe.tokenizer.chat_template
    public = {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    probe = FAMILY.probe_checkpoint(CheckpointSource.for_folder(variant, folder))
    assert probe is not None and probe.variant == variant and probe.lineage is None


@pytest.mark.parametrize(("layout", "prefix"), [("original", ""), ("diffusers", ""),
                                                ("original", "model.diffusion_model.")])
def test_single_transformer_file_loads_with_the_folder_for_the_rest(
        distilled: Flux2KleinPipeline, distilled_folder: Path, tmp_path: Path,
        layout: str, prefix: str) -> None:
    path = save_tiny_klein_transformer_file(distilled, tmp_path / "flux-2-klein-tiny.safetensors",
                                            layout=layout, prefix=prefix)
    source = CheckpointSource(name=path.stem, path=path, kind="single_file",
                              header=read_header(path))
    probe = FAMILY.probe_checkpoint(source)
    assert probe is not None and probe.variant == DISTILLED and probe.family == "flux2-klein"

    checkpoint = LoadedCheckpoint(name=path.stem, path=path, kind="single_file",
                                  config_path=distilled_folder, variant=BASE)
    pipe = FAMILY.load_pipeline(checkpoint, CPU, torch.float32)

    _same_weights(distilled.transformer, pipe.transformer)
    _same_weights(distilled.text_encoder, pipe.text_encoder)
    assert pipe.config.is_distilled is False  # the file's variant, not the folder's


def test_single_file_names_and_requirements(distilled_folder: Path, tmp_path: Path) -> None:
    base_file = tmp_path / "flux-2-klein-base-4b.safetensors"
    save_file({"img_in.weight": torch.zeros(3072, 1),
               "double_stream_modulation_img.lin.weight": torch.zeros(1, 1)}, str(base_file))
    probe = FAMILY.probe_checkpoint(CheckpointSource(
        name="k", path=base_file, kind="single_file", header=read_header(base_file)))
    assert probe is not None and probe.variant == BASE and probe.lineage == "klein-4b"
    dev_file = tmp_path / "flux2-dev.safetensors"  # guidance embedding: FLUX.2 [dev]
    save_file({"img_in.weight": torch.zeros(6144, 1), "guidance_in.in_layer.weight":
               torch.zeros(1, 1), "double_stream_modulation_img.lin.weight": torch.zeros(1, 1)},
              str(dev_file))
    assert FAMILY.probe_checkpoint(CheckpointSource(
        name="d", path=dev_file, kind="single_file", header=read_header(dev_file))) is None

    def problem(config: Path | None) -> str | None:
        return FAMILY.missing_requirements(LoadedCheckpoint(
            name="k", path=base_file, kind="single_file", config_path=config))

    assert "[checkpoints.k] config" in (problem(None) or "")
    assert "no model_index.json" in (problem(tmp_path) or "")
    assert problem(distilled_folder) is None
    with pytest.raises(RenderError, match="config"):
        FAMILY.load_pipeline(LoadedCheckpoint(name="k", path=base_file, kind="single_file",
                                              config_path=None), CPU, torch.float32)


def test_distilled_ignores_cfg_and_base_applies_it(distilled: Flux2KleinPipeline) -> None:
    base = build_tiny_klein_pipeline(seed=1, distilled=False)
    for pipe in (distilled, base):
        pipe.lorafarm_scheduler_config = dict(pipe.scheduler.config)
    plain, guided = (FAMILY.render_batch(distilled, [_spec(c)], CPU)[0] for c in (1.0, 4.0))
    assert plain.tobytes() == guided.tobytes()
    plain, guided = (FAMILY.render_batch(base, [_spec(c)], CPU)[0] for c in (1.0, 4.0))
    assert plain.tobytes() != guided.tobytes()


def test_variant_defaults() -> None:
    distilled, base = FAMILY.defaults_for(DISTILLED), FAMILY.defaults_for(BASE)
    assert (distilled.steps, distilled.cfg, base.steps, base.cfg) == (4, 1.0, 50, 4.0)
    for d in (distilled, base):
        assert (d.width, d.height, d.size_multiple, d.sampler, d.guidance) == (
            1024, 1024, 16, "Euler", None)
    assert FAMILY.defaults_for(None) == distilled
    assert FAMILY.lora_strengths(LoraUse("x", 0.7, text_encoder_strength=0.2)) == {
        "transformer": 0.7}


# --- the hot folder, both variants --------------------------------------------------------


def test_distilled_job_renders_with_klein_defaults_and_readable_metadata(farm) -> None:
    farm.drop("klein.toml", _job(prompt="a (glowing:1.2) lantern over a lake",
                                 extra="count = 2\n"))
    assert farm.run() == 0
    pngs = sorted(farm.outputs.rglob("*.png"))
    assert len(pngs) == 2 and farm.files_in("done") == ["klein.toml"]
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (64, 64)
            infotext = image.text["parameters"]
        prompt, params = infotext.split("\n")
        assert prompt == "a (glowing:1.2) lantern over a lake"  # no weighting, left as written
        assert params.startswith("Steps: 4, Sampler: Euler, CFG scale: 1, Seed: 1")
        assert "Negative prompt" not in infotext and "Schedule type" not in infotext
        assert f"Model: {DEMO_DISTILLED}" in params
        parsed = ParserManager().parse(png)
        assert parsed is not None and parsed.full_prompt == prompt
        sampler = parsed.samplers[0]
        assert int(sampler.parameters["steps"]) == 4
        assert float(sampler.parameters["cfg_scale"]) == 1.0
        assert sampler.model is not None and sampler.model.name == DEMO_DISTILLED
    assert sorted(read_spec(p).seed for p in pngs) == [11, 12]
    spec = read_spec(pngs[0])
    assert spec.family == "flux2-klein" and spec.negative_prompt == ""
    assert spec.prompt == "a (glowing:1.2) lantern over a lake"
    [job] = farm.history()
    assert any("no prompt weighting: (glowing:1.2)" in note for note in job["warnings"])
    expected_hash = hashlib.sha256((farm.assets.models / DEMO_DISTILLED / "transformer" /
                                    "diffusion_pytorch_model.safetensors").read_bytes())
    assert spec.checkpoint_hash == expected_hash.hexdigest()[:10]


def test_base_job_gets_base_defaults_and_renders_with_cfg(farm) -> None:
    daemon = farm.daemon()
    daemon.start()
    infos = {info.name: info for info in daemon.registry.all()}
    _, renders, _ = daemon.intake.resolver.parse("defaults.toml", _job(DEMO_BASE).encode())
    daemon.close()
    assert infos[DEMO_BASE].family == "flux2-klein" and infos[DEMO_BASE].variant == BASE
    assert infos[DEMO_DISTILLED].variant == DISTILLED
    assert (renders[0].steps, renders[0].cfg, renders[0].sampler) == (50, 4.0, "Euler")

    farm.drop("base.toml", _job(DEMO_BASE, extra="steps = 3\n"))
    assert farm.run() == 0
    [png] = farm.outputs.rglob("*.png")
    with Image.open(png) as image:
        params = image.text["parameters"].splitlines()[-1]
    assert params.startswith("Steps: 3, Sampler: Euler, CFG scale: 4, Seed: 11, Size: 64x64")
    assert f"Model: {DEMO_BASE}" in params


def test_a_negative_prompt_or_a_bad_size_is_rejected(farm) -> None:
    farm.drop("neg.toml", _job(extra='negative_prompt = "blurry"\n'))
    farm.drop("size.toml", _job().replace("width = 64", "width = 72"))
    assert farm.run() == 0
    rejected = farm.files_in("rejected")
    assert "neg.toml" in rejected and "size.toml" in rejected
    report = farm.rejection("neg.toml")
    assert "takes no negative prompt" in report and "line 6" in report
    report = farm.rejection("size.toml")
    assert "multiple of 16" in report and "use 64 or 80" in report
    assert not list(farm.outputs.rglob("*.png"))


def test_a_comfyui_transformer_file_renders_like_its_folder(make_farm, assets) -> None:
    config = str(assets.models / DEMO_DISTILLED)
    farm = make_farm(private_models=True,
                     checkpoints={"klein-comfy": {"config": config}})
    save_tiny_klein_transformer_file(
        build_tiny_klein_pipeline(seed=0, distilled=True),
        farm.config.paths.models / "klein-comfy.safetensors", prefix="model.diffusion_model.")
    farm.drop("folder.toml", _job(extra="steps = 2\n"))
    farm.drop("single.toml", _job("klein-comfy", extra="steps = 2\n"))
    assert farm.run() == 0
    by_job = {p.parent.name.rsplit("-", 1)[0]: p for p in farm.outputs.rglob("*.png")}
    assert np.array_equal(pixels_of(by_job["folder"]), pixels_of(by_job["single"]))


# --- LoRAs ---------------------------------------------------------------------------------


def test_every_layout_patches_the_expected_modules_and_renders_the_same_image(farm) -> None:
    transformer = build_tiny_klein_pipeline(seed=0).transformer
    blocks = make_tiny_klein_lora(transformer, seed=7, rank=2, alpha=1.0)
    full = make_tiny_klein_lora(transformer, seed=8, rank=2, alpha=1.0, extras=True)
    loras = farm.config.paths.loras
    for layout, write in LORA_WRITERS.items():
        write(blocks, loras / f"blocks-{layout}.safetensors")
        write(full, loras / f"full-{layout}.safetensors")
    farm.drop("plain.toml", _job(extra="steps = 2\n"))
    for layout in LORA_WRITERS:
        for kind in ("blocks", "full"):
            farm.drop(f"{kind}-{layout}.toml", _job(
                prompt=f"a lantern <lora:{kind}-{layout}:1>", extra="steps = 2\n"))
    farm.drop("zero.toml", _job(prompt="a lantern over a lake <lora:full-kohya:0>",
                                extra="steps = 2\n"))
    assert farm.run() == 0
    assert len(farm.files_in("done")) == 2 + 2 * len(LORA_WRITERS)

    by_job = {p.parent.name.rsplit("-", 1)[0]: p for p in farm.outputs.rglob("*.png")}
    plain = pixels_of(by_job["plain"])
    for kind in ("blocks", "full"):
        first = pixels_of(by_job[f"{kind}-diffusers"])
        assert np.abs(first - plain).max() > 0  # the LoRA changed the image
        for layout in LORA_WRITERS:
            assert np.abs(pixels_of(by_job[f"{kind}-{layout}"]) - first).max() <= 1, layout
    assert np.array_equal(pixels_of(by_job["zero"]), plain)  # strength 0 is the base exactly

    reports = [json.loads(r.lora_report_json) for r in rows(farm.config, Render)
               if r.lora_report_json]
    # Fused q/k/v count three modules; the full LoRA adds modulation, adaLN and img_in.
    assert (patched_module_count(blocks), patched_module_count(full)) == (11, 15)
    patched = {name: counts for report in reports for name, counts in report.items()}
    for layout in LORA_WRITERS:
        assert patched[f"blocks-{layout}"]["transformer"] == 11, layout
        assert patched[f"full-{layout}"]["transformer"] == 15, layout

    for name in patched:
        probe = _probe_lora(loras / f"{name}.safetensors")
        assert probe is not None and probe.architecture == "flux2", name
        assert probe.lineage is None and probe.variant is None  # tiny width: no real size


def test_what_plain_diffusers_gets_wrong_and_load_lora_fixes(
        distilled: Flux2KleinPipeline, distilled_folder: Path, tmp_path: Path) -> None:
    """diffusers 0.42 alone: raw PEFT with non-block names raises, BFL names with kohya
    suffixes load nothing, kohya drops the modulation and adaLN modules, and a BFL-named
    adaLN LoRA is applied with shift and scale swapped. If a diffusers upgrade fixes one of
    these, this test says so and the workaround in `lora_for_diffusers` can go."""
    full = make_tiny_klein_lora(distilled.transformer, seed=8, extras=True)

    def load(write, plain: bool):  # type: ignore[no-untyped-def]
        path = write(full, tmp_path / f"{write.__name__}.safetensors")
        pipe = Flux2KleinPipeline.from_pretrained(distilled_folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if plain:
            pipe.load_lora_weights(str(path), adapter_name="a")
        else:
            FAMILY.load_lora(pipe, path, "a", LoraUse("a"))
        pipe.lorafarm_scheduler_config = dict(pipe.scheduler.config)
        return pipe, count_patched_modules(pipe, "a").get("transformer", 0)

    with pytest.raises(ValueError, match="should be empty"):
        load(write_klein_lora_peft, plain=True)
    assert load(write_klein_lora_original_down, plain=True)[1] == 0
    assert load(write_klein_lora_kohya, plain=True)[1] == 15 - 3
    reference, _ = load(write_klein_lora_diffusers, plain=True)
    swapped, count = load(write_klein_lora_ai_toolkit, plain=True)
    fixed, fixed_count = load(write_klein_lora_ai_toolkit, plain=False)
    assert count == fixed_count == 15

    def image(pipe: Flux2KleinPipeline) -> bytes:
        return FAMILY.render_batch(pipe, [_spec(1.0)], CPU)[0].tobytes()

    assert image(swapped) != image(reference) == image(fixed)


def test_a_flux1_lora_is_refused_for_klein(farm) -> None:
    write_flux_like(farm.config.paths.loras / "flux1-style.safetensors")
    farm.drop("flux1.toml", _job(prompt="a lantern <lora:flux1-style:1>"))
    assert farm.run() == 0
    assert farm.files_in("rejected") == ["flux1.toml", "flux1.toml.error.txt"]
    report = farm.rejection("flux1.toml")
    assert "flux1-style" in report


def test_a_lora_of_another_klein_size_is_refused_at_intake(make_farm) -> None:
    # The tiny checkpoint has no real size; config.toml gives it one, as a user can.
    farm = make_farm(checkpoints={DEMO_DISTILLED: {"lineage": "klein-4b"}})
    write_real_size_klein_lora(farm.config.paths.loras / "nine-b.safetensors", size="klein-9b")
    farm.drop("mismatch.toml", _job(prompt="a lantern <lora:nine-b:1>"))
    assert farm.run() == 0
    assert "mismatch.toml" in farm.files_in("rejected")
    report = farm.rejection("mismatch.toml")
    assert "klein-9b" in report and "klein-4b" in report


@pytest.mark.parametrize("size, width", [("klein-4b", 3072), ("klein-9b", 4096)])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_real_size_flux2_loras_name_their_model_size(tmp_path: Path, size: str, width: int,
                                                     layout: str) -> None:
    path = write_real_size_klein_lora(tmp_path / "x.safetensors", size=size, layout=layout)
    probe = _probe_lora(path)
    assert probe is not None and probe.score == 0.9
    assert probe.lineage == probe.variant == size
    assert str(width) in (probe.lineage_source or "")


def test_flux2_dev_lora_is_named_as_such(tmp_path: Path) -> None:
    probe = _probe_lora(write_real_size_klein_lora(tmp_path / "d.safetensors", size="dev"))
    assert probe is not None and probe.lineage == "dev" and probe.score < 0.9
    assert "fits no Klein model" in probe.reason
    assert "FLUX.2 [dev]" in (FAMILY.lora_fits("dev", DISTILLED) or "")
    assert FAMILY.lora_fits("klein-4b", BASE) is None and FAMILY.lora_fits(None, None) is None


def test_flux2_names_alone_are_enough(tmp_path: Path) -> None:
    modulation = _header_only(tmp_path / "mod.safetensors", {
        "diffusion_model.double_stream_modulation_img.lin": (3072, 18432)})
    fused = _header_only(tmp_path / "fused.safetensors", {
        "transformer.single_transformer_blocks.3.attn.to_qkv_mlp_proj": (3072, 27648)})
    by_metadata = _header_only(tmp_path / "meta.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216)},
        {"modelspec.architecture": "flux-2-klein-4b/lora"}, kohya=True)
    for path in (modulation, fused, by_metadata):
        probe = _probe_lora(path)
        assert probe is not None and probe.lineage == "klein-4b", path.name
    # Trainers forked from Flux.1 scripts may keep Flux.1's modelspec (as Wan 2.2 LoRAs say
    # wan2.1): the keys outrank it. Width 4096 with Flux block names is Klein 9B.
    stale = _header_only(tmp_path / "stale.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv": (4096, 12288)},
        {"modelspec.architecture": "flux-1-dev/lora"}, kohya=True)
    probe = _probe_lora(stale)
    assert probe is not None and probe.lineage == "klein-9b"


def test_flux1_loras_in_every_naming_are_not_claimed(tmp_path: Path) -> None:
    cases = {
        # kohya Flux.1 with per-block modulation (sd-scripts)
        "kohya": write_flux_like(tmp_path / "kohya.safetensors"),
        # ai-toolkit / BFL names: same block names as Flux 2, GELU MLP ratio 4, linear1 7x
        "original": _header_only(tmp_path / "original.safetensors", {
            "diffusion_model.double_blocks.0.img_attn.qkv": (3072, 9216),
            "diffusion_model.double_blocks.0.img_mlp.0": (3072, 12288),
            "diffusion_model.single_blocks.0.linear1": (3072, 21504)}),
        # diffusers Flux.1: separate q/k/v in single blocks, proj_mlp
        "diffusers": _header_only(tmp_path / "diffusers.safetensors", {
            "transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
            "transformer.single_transformer_blocks.0.attn.to_q": (3072, 3072),
            "transformer.single_transformer_blocks.0.proj_mlp": (3072, 12288)}),
        # attention only, block 18: Flux 2 has at most 8 double blocks
        "deep": _header_only(tmp_path / "deep.safetensors", {
            "diffusion_model.double_blocks.18.img_attn.qkv": (3072, 9216)}),
        # attention only at width 3072: either model; not claimed without another tell
        "ambiguous": _header_only(tmp_path / "ambiguous.safetensors", {
            "diffusion_model.double_blocks.0.img_attn.qkv": (3072, 9216)}),
        # says Flux.1 in its metadata, keys silent
        "flux1-metadata": _header_only(tmp_path / "meta1.safetensors", {
            "lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216)},
            {"modelspec.architecture": "flux-1-dev/lora"}, kohya=True),
    }
    for name, path in cases.items():
        assert _probe_lora(path) is None, name


def test_build_demo_writes_both_variants_and_a_job_each(tmp_path: Path) -> None:
    assets = FAMILY.build_demo(tmp_path / "models", tmp_path / "configs")
    assert set(assets.jobs) == {"flux2-klein.toml", "flux2-klein-base.toml"}
    for name in (DEMO_DISTILLED, DEMO_BASE):
        source = CheckpointSource.for_folder(name, tmp_path / "models" / name)
        probe = FAMILY.probe_checkpoint(source)
        assert probe is not None
        assert probe.variant == (DISTILLED if name == DEMO_DISTILLED else BASE)
    size = sum(f.stat().st_size for f in (tmp_path / "models").rglob("*") if f.is_file())
    assert size < 8 * 1024 * 1024


def test_cfg_on_a_distilled_checkpoint_is_refused_at_intake(farm) -> None:
    farm.drop("cfg.toml", f'checkpoint = "{DEMO_DISTILLED}"\nprompt = "a cat"\ncfg = 4.0\n'
                          "width = 64\nheight = 64\nsteps = 2\n")
    assert farm.run() == 0
    report = farm.rejection("cfg.toml")
    assert "distilled to run without CFG" in report and "remove cfg" in report
