"""A1111 prompt weights beyond SDXL: applied to Flux.1's T5 through compel, dropped (with a
warning) for the encoders nothing can weight (FLUX.2 [klein], Wan 2.2, HunyuanVideo), whose
prompts stay as written everywhere but in the text handed to the encoder."""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: they read this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from daemon.contract.family import LoadedCheckpoint
from daemon.contract.prompt_weights import parse_prompt
from daemon.contract.samplers import make_scheduler
from daemon.contract.spec import RenderSpec
from families.flux.flux import FluxDevFamily, FluxSchnellFamily, encode_weighted_flux
from families.flux.tiny import build_tiny_flux_pipeline
from families.flux2_klein.flux2_klein import DEMO_DISTILLED, Flux2KleinFamily
from families.hunyuan_video.hunyuan_video import (
    DEMO_V10,
    DEMO_V15,
    HunyuanVideo15Family,
    HunyuanVideoFamily,
)
from families.wan22.wan22 import DEMO_CHECKPOINTS, TI2V_5B, Wan22Family

CPU = torch.device("cpu")
DEV, SCHNELL = FluxDevFamily(), FluxSchnellFamily()
KLEIN, WAN = Flux2KleinFamily(), Wan22Family()
HV10, HV15 = HunyuanVideoFamily(), HunyuanVideo15Family()


# -- Flux.1 through compel ----------------------------------------------------------------

@pytest.fixture(scope="module")
def dev() -> FluxPipeline:
    pipe = build_tiny_flux_pipeline("dev", seed=0)
    pipe.lorafarm_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def _flux_spec(prompt: str, seed: int = 11, negative: str = "", **extra: Any) -> RenderSpec:
    return RenderSpec(family=DEV.name, checkpoint="x", prompt=prompt, negative_prompt=negative,
                      seed=seed, steps=2, cfg=1.0, sampler="Euler", schedule=None, width=32,
                      height=32, extra={"guidance": 3.5, **extra})


def _images(family: Any, pipe: Any, specs: list[RenderSpec]) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in family.render_batch(pipe, specs, CPU)]


def _diffusers_encoding(pipe: FluxPipeline, text: str,
                        max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=[text], prompt_2=None, device=CPU,
                                               max_sequence_length=max_sequence_length)
    return embeds, pooled


def test_a_weight_changes_flux_t5_embedding_and_weight_1_is_plain(dev: FluxPipeline) -> None:
    plain, pooled_plain = _diffusers_encoding(dev, "a red ball")
    # Unweighted text through compel is diffusers' own Flux encoding, bit for bit: the
    # recipe (T5 at max_sequence_length, pooled CLIP-L) is the pipeline's.
    embeds, pooled = encode_weighted_flux(dev, [parse_prompt("a red ball")], 512)
    assert torch.equal(embeds, plain) and torch.equal(pooled, pooled_plain)

    up, down = (parse_prompt(p) for p in ("a (red:1.5) ball", "a [red] ball"))
    embeds, pooled = encode_weighted_flux(dev, [up, down], 512)
    assert embeds.shape == (2, 512, plain.shape[-1])
    assert not torch.allclose(embeds[:1], plain) and not torch.allclose(embeds[1:], plain)
    # Only the weighted tokens move (the tiny T5 spells `red` as 3 tokens, after `a`); the
    # rest, end marker and padding included, is diffusers' encoding of the whole text.
    moved = [i for i in range(512) if not torch.equal(embeds[0, i], plain[0, i])]
    assert moved == [1, 2, 3]
    # The pooled CLIP-L embedding is the plain text's: weights leave it alone.
    assert torch.equal(pooled[:1], pooled_plain) and torch.equal(pooled[1:], pooled_plain)

    # `(word:1.0)` is no weight at all: the plain text goes to diffusers unchanged.
    assert DEV.prompt_conditioning(dev, [_flux_spec("a (red:1.0) ball")], negative=False) == {
        "prompt": ["a red ball"]}
    mixed = DEV.prompt_conditioning(dev, [_flux_spec("a (red:1.5) ball"),
                                          _flux_spec("a (red:1.0) ball")], negative=False)
    assert set(mixed) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert torch.equal(mixed["prompt_embeds"][1:], plain)
    assert torch.equal(mixed["prompt_embeds"][:1], embeds[:1])
    assert torch.equal(mixed["pooled_prompt_embeds"][1:], pooled_plain)


def test_schnell_weights_within_its_shorter_t5_sequence() -> None:
    pipe = build_tiny_flux_pipeline("schnell", seed=0)
    conditioning = SCHNELL.prompt_conditioning(
        pipe, [_flux_spec("a (red:1.3) ball BREAK at dusk")], negative=False)
    plain, _ = _diffusers_encoding(pipe, "a red ball at dusk", 256)
    assert conditioning["prompt_embeds"].shape == plain.shape == (1, 256, plain.shape[-1])
    # BREAK is read as a space; without the weight the text is the plain one.
    unweighted = SCHNELL.prompt_conditioning(pipe, [_flux_spec("a red ball BREAK at dusk")],
                                             negative=False)
    assert unweighted == {"prompt": ["a red ball at dusk"]}


def test_a_weighted_flux_render_in_a_batch_equals_the_same_render_alone(
        dev: FluxPipeline) -> None:
    weighted, plain = _flux_spec("a (red:1.5) ball", seed=11), _flux_spec("a red ball", seed=12)
    [weighted_alone] = _images(DEV, dev, [weighted])
    [plain_alone] = _images(DEV, dev, [plain])
    batch = _images(DEV, dev, [plain, weighted, _flux_spec("a (red:1.5) ball", seed=13)])
    # As for any batch (tests/families/test_flux.py): the transformer may round differently by 1.
    assert np.abs(batch[1] - weighted_alone).max() <= 1
    assert np.abs(batch[0] - plain_alone).max() <= 1
    assert not np.array_equal(batch[1], batch[2])  # its own seed
    # A weighted prompt is a different image from the same seed unweighted.
    [unweighted] = _images(DEV, dev, [_flux_spec("a red ball", seed=11)])
    assert not np.array_equal(weighted_alone, unweighted)


def test_a_plain_flux_batch_renders_exactly_as_before(dev: FluxPipeline) -> None:
    specs = [_flux_spec("a red lighthouse", seed=3), _flux_spec("a blue boat, 16:9", seed=4)]
    assert DEV.prompt_conditioning(dev, specs, negative=False) == {
        "prompt": ["a red lighthouse", "a blue boat, 16:9"]}
    # FluxFamily.render_batch as it was before prompt weighting: the text to diffusers.
    dev.scheduler = make_scheduler(dev.lorafarm_scheduler_config, "Euler", None, kind="flow")
    before = dev(prompt=[s.prompt for s in specs], guidance_scale=3.5, num_inference_steps=2,
                 width=32, height=32, max_sequence_length=512, output_type="pil",
                 generator=[torch.Generator("cpu").manual_seed(s.seed) for s in specs]).images
    now = _images(DEV, dev, specs)
    for a, b in zip(before, now, strict=True):
        assert np.array_equal(np.asarray(a, dtype=np.int16), b)


def test_true_cfg_weights_the_negative_prompt_too(dev: FluxPipeline) -> None:
    spec = _flux_spec("a ball", negative="(blurry:1.4)", true_cfg=4.0)
    conditioning = DEV.prompt_conditioning(dev, [spec], negative=True)
    assert set(conditioning) == {"prompt_embeds", "pooled_prompt_embeds",
                                 "negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    plain, _ = _diffusers_encoding(dev, "a ball")
    assert torch.equal(conditioning["prompt_embeds"], plain)
    assert not torch.allclose(conditioning["negative_prompt_embeds"],
                              _diffusers_encoding(dev, "blurry")[0])
    # The negative embeddings reach the pipeline's real CFG.
    weighted = _images(DEV, dev, [spec])[0]
    unweighted = _images(DEV, dev, [_flux_spec("a ball", negative="blurry", true_cfg=4.0)])[0]
    assert not np.array_equal(weighted, unweighted)


def test_flux_reports_what_a1111_syntax_cannot_do_and_keeps_the_prompt() -> None:
    prompt, negative, notes = DEV.apply_conventions("a (red:1.2) ball", None, True)
    assert (prompt, negative, notes) == ("a (red:1.2) ball", "", [])
    prompt, _, notes = DEV.apply_conventions("a (red ball BREAK at dusk", None, True)
    assert prompt == "a (red ball BREAK at dusk"
    assert notes[0].startswith("prompt: unbalanced brackets")
    assert notes[1].startswith("prompt: BREAK is read as a space")


def test_a_weighted_flux_job_records_the_prompt_as_written(farm) -> None:
    farm.drop("weighted.toml", 'checkpoint = "tiny-flux-dev"\n'
                               'prompt = "a (red:1.5) lighthouse, [fog]"\nseed = 21\n'
                               "steps = 2\nwidth = 64\nheight = 64\n")
    assert farm.run() == 0
    [png] = list(farm.outputs.rglob("*.png"))
    with Image.open(png) as image:
        assert image.text["parameters"].splitlines()[0] == "a (red:1.5) lighthouse, [fog]"
    [job] = farm.history()
    assert job["warnings"] == [] and job["renders"][0]["state"] == "done"


# -- families that cannot weight: stripped for the encoder only ------------------------------

class _Seen(Exception):
    """Raised once the encoder calls a test waits for are made: no need to denoise."""


def _encoder_calls(monkeypatch: pytest.MonkeyPatch, pipe: Any, calls: int) -> list[Any]:
    """Records the `prompt` (and `negative_prompt`) of each `encode_prompt` call; the
    `calls`-th call stops the render."""
    seen: list[Any] = []
    real = pipe.encode_prompt

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs.get("prompt"), kwargs.get("negative_prompt")))
        if len(seen) == calls:
            raise _Seen
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", record)
    return seen


def _load(family: Any, assets: Any, name: str, variant: str | None = None) -> Any:
    checkpoint = LoadedCheckpoint(name=name, path=assets.models / name, kind="folder",
                                  config_path=None, variant=variant)
    return family.load_pipeline(checkpoint, CPU, torch.float32)


WEIGHTED = "a (red:1.3) boat BREAK on a [calm] lake, \\(tiny\\)"
# Explicit weights and BREAK go; plain brackets are punctuation to these encoders.
STRIPPED = "a red boat on a [calm] lake, (tiny)"


def _video_spec(family: Any, **fields: Any) -> RenderSpec:
    base: dict[str, Any] = {
        "family": family.name, "checkpoint": "x", "prompt": WEIGHTED, "negative_prompt": "",
        "seed": 1, "steps": 1, "cfg": 1.0, "sampler": "Euler", "schedule": None, "width": 32,
        "height": 32, "extra": {"frames": 5, "fps": 8}}
    base.update(fields)
    return RenderSpec(**base)


def test_klein_encodes_the_prompt_without_weights(monkeypatch: pytest.MonkeyPatch,
                                                  assets: Any) -> None:
    pipe = _load(KLEIN, assets, DEMO_DISTILLED)
    seen = _encoder_calls(monkeypatch, pipe, 1)
    with pytest.raises(_Seen):
        KLEIN.render_batch(pipe, [_video_spec(KLEIN, extra={}),
                                  _video_spec(KLEIN, prompt="a plain lake", extra={})], CPU)
    assert seen == [([STRIPPED, "a plain lake"], None)]


def test_wan_encodes_both_prompts_without_weights(monkeypatch: pytest.MonkeyPatch,
                                                  assets: Any) -> None:
    pipe = _load(WAN, assets, DEMO_CHECKPOINTS[TI2V_5B], TI2V_5B)
    seen = _encoder_calls(monkeypatch, pipe, 1)
    spec = _video_spec(WAN, negative_prompt="(blurry:1.2), static", cfg=5.0, sampler="UniPC",
                       extra={"frames": 5, "fps": 8, "flow_shift": 5.0})
    with pytest.raises(_Seen):
        WAN.render_batch(pipe, [spec], CPU)
    assert seen == [([STRIPPED], ["blurry, static"])]


def test_hunyuan_video_encodes_both_prompts_without_weights(monkeypatch: pytest.MonkeyPatch,
                                                            assets: Any) -> None:
    pipe = _load(HV10, assets, DEMO_V10)
    seen = _encoder_calls(monkeypatch, pipe, 2)  # the prompt, then true CFG's negative
    spec = _video_spec(HV10, negative_prompt="[blurry]", extra={
        "frames": 5, "fps": 8, "guidance": 6.0, "flow_shift": 7.0, "true_cfg": 4.0})
    with pytest.raises(_Seen):
        HV10.render_batch(pipe, [spec], CPU)
    assert seen == [([STRIPPED], None), (["[blurry]"], None)]

    pipe = _load(HV15, assets, DEMO_V15)
    seen = _encoder_calls(monkeypatch, pipe, 2)
    with pytest.raises(_Seen):
        HV15.render_batch(pipe, [_video_spec(HV15, negative_prompt="(blurry:0.5)", cfg=6.0)],
                          CPU)
    assert seen == [([STRIPPED], None), (["blurry"], None)]


@pytest.mark.parametrize("family", [KLEIN, WAN, HV10, HV15], ids=lambda f: f.name)
def test_families_without_weighting_keep_the_prompt_and_warn(family: Any) -> None:
    prompt, negative, notes = family.apply_conventions(WEIGHTED, None, True)
    assert prompt == WEIGHTED
    assert notes[0] == (f"prompt: {family.display_name} has no prompt weighting: (red:1.3) "
                        "read as plain text; BREAK read as a space")
    # Plain prompts, escapes, stray and plain brackets: nothing to say.
    assert family.apply_conventions("a boat :) \\(tiny\\)", "", True)[2] == []
    assert family.apply_conventions("a man (about 40) walks", "", True)[2] == []
