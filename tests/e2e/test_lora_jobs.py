"""LoRAs in jobs, end to end on the tiny SDXL-lineage checkpoints: refused before any render
when they cannot work, proven to patch the model when they can."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from families.sdxl.tiny_loras import (
    make_tiny_lora,
    write_diffusers,
    write_kohya_diffusers_names,
    write_kohya_original,
    write_unmatched,
)
from plugins.a1111_metadata import A1111_PAIR_RE
from tests.support.helpers import job_text

BASE = {"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}
PONY = {"ss_sd_model_name": "ponyDiffusionV6XL_v6StartWithThisOne.safetensors"}


def _job(name: str, checkpoint: str = "tiny-sdxl", prompt: str = "a red lighthouse",
         loras: str = "", extra: str = "", seed: int = 11) -> tuple[str, str]:
    return name, job_text(checkpoint=checkpoint, prompt=prompt, seed=seed, steps=3,
                          sampler="Euler", width=64, height=64) + extra + loras


def _lora_table(name: str, strength: float = 1.0, te: float | None = None) -> str:
    text = f'\n[[loras]]\nname = "{name}"\nstrength = {strength}\n'
    return text + (f"text_encoder_strength = {te}\n" if te is not None else "")


@pytest.fixture
def loras(farm):  # type: ignore[no-untyped-def]
    """The same LoRA content in three layouts, a second LoRA, a Pony one and a dud."""
    folder = farm.config.paths.loras
    one = make_tiny_lora(seed=21, scale=2.0)
    write_kohya_original(one, folder / "ink-kohya.safetensors", metadata=BASE)
    write_kohya_diffusers_names(one, folder / "ink-kohya-dn.safetensors", metadata=BASE)
    write_diffusers(one, folder / "ink-diffusers.safetensors", metadata=BASE)
    write_kohya_original(make_tiny_lora(seed=22, scale=2.0), folder / "wash.safetensors",
                         metadata=BASE)
    write_kohya_original(make_tiny_lora(seed=23, scale=2.0), folder / "ponystyle.safetensors",
                         metadata=PONY)
    write_unmatched(folder / "dud.safetensors")
    # Its keys name no real module: no family claims it, so the user vouched for it.
    (folder / "dud.toml").write_text('family = "sdxl"\nlineage = "sdxl"\n')
    return folder


def _run(farm, *jobs: tuple[str, str]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    for name, text in jobs:
        farm.drop(name, text)
    assert farm.run() == 0
    images = {}
    for png in farm.outputs.rglob("*.png"):
        images[png.parent.name.rsplit("-", 1)[0]] = np.asarray(Image.open(png), dtype=np.int16)
    return images


def _renders(farm) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {job["name"]: job for job in farm.history()}


def test_one_lora_in_three_layouts_gives_the_same_image_and_patches_the_same_modules(
        farm, loras) -> None:
    images = _run(farm, _job("base.toml"),
                  _job("kohya.toml", loras=_lora_table("ink-kohya")),
                  _job("kohya-dn.toml", loras=_lora_table("ink-kohya-dn")),
                  _job("diffusers.toml", loras=_lora_table("ink-diffusers")))
    assert np.abs(images["kohya"] - images["base"]).max() > 10  # the LoRA does something
    assert np.abs(images["kohya"] - images["kohya-dn"]).max() <= 1
    assert np.abs(images["kohya"] - images["diffusers"]).max() <= 1
    jobs = _renders(farm)
    patches = [jobs[n]["renders"][0]["lora_patches"] for n in ("kohya", "kohya-dn", "diffusers")]
    counts = [next(iter(p.values())) for p in patches]
    expected = dict(make_tiny_lora(seed=21, scale=2.0).module_counts())
    expected["modules_in_file"] = sum(expected.values())
    assert counts[0] == counts[1] == counts[2] == expected


def test_stacking_strength_zero_and_prompt_tags(farm, loras) -> None:
    images = _run(
        farm, _job("base.toml"),
        _job("one.toml", loras=_lora_table("ink-kohya")),
        _job("two.toml", loras=_lora_table("ink-kohya") + _lora_table("wash", 0.7)),
        _job("zero.toml", loras=_lora_table("ink-kohya", 0.0, te=0.0)),
        _job("tag.toml", prompt="a red lighthouse <lora:ink-kohya:1.0>"),
    )
    assert np.abs(images["two"] - images["one"]).max() > 10
    assert np.array_equal(images["zero"], images["base"])  # exactly the image without it
    assert np.array_equal(images["tag"], images["one"])
    jobs = _renders(farm)
    tag_render = jobs["tag"]["renders"][0]
    assert tag_render["prompt"] == "a red lighthouse"  # the tag never reaches the encoder
    assert jobs["tag"]["job"]["prompt"] == "a red lighthouse <lora:ink-kohya:1.0>"
    assert [lora["name"] for lora in jobs["two"]["renders"][0]["loras"]] == ["ink-kohya", "wash"]


def test_infotext_links_the_resources_as_civitai_expects(farm, loras) -> None:
    _run(farm, _job("meta.toml", loras=_lora_table("ink-kohya", 0.8) + _lora_table("wash", 0.5,
                                                                                 te=0.25)))
    [png] = list(farm.outputs.rglob("*.png"))
    with Image.open(png) as image:
        text = image.text["parameters"]
    prompt_line, params = text.splitlines()[0], text.splitlines()[-1]
    assert "<lora:ink-kohya:0.8>" in prompt_line and "<lora:wash:0.25:0.5>" in prompt_line
    pairs = dict(A1111_PAIR_RE.findall(params))
    lora_hashes = json.loads(pairs["Lora hashes"])
    infos = {info["name"]: info for info in _library(farm)}
    assert lora_hashes == (f"ink-kohya: {infos['ink-kohya']['autov3']}, "
                           f"wash: {infos['wash']['autov3']}")
    hashes = json.loads(re.search(r"Hashes: (\{[^{}]*\})", params).group(1))
    assert hashes["lora:ink-kohya"] == infos["ink-kohya"]["autov2"]
    assert hashes["lora:wash"] == infos["wash"]["autov2"]
    assert re.fullmatch(r"[0-9a-f]{10}", hashes["model"])


def _library(farm) -> list[dict]:  # type: ignore[no-untyped-def]
    result = farm.cli("loras", "--json", "--config", str(farm.write_config_file()))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_refusals_at_intake_name_the_lora_and_the_checkpoint(farm, loras) -> None:
    (loras / "old.ckpt").write_bytes(b"\x80\x04pickle")
    _run(farm,
         _job("missing.toml", loras=_lora_table("ink-kohyo")),
         _job("quarantined.toml", loras=_lora_table("old")),
         _job("lineage.toml", checkpoint="tiny-illustrious", loras=_lora_table("ponystyle")),
         _job("twice.toml", prompt="x <lora:wash:1>", loras=_lora_table("wash")),
         _job("allowed.toml", checkpoint="tiny-illustrious", loras=_lora_table("ponystyle"),
              extra="allow_cross_lineage = true\n"))
    rejected = farm.jobs / "rejected"

    def report(name: str) -> str:
        return (rejected / f"{name}.error.txt").read_text()

    assert "LoRA 'ink-kohyo' is not in the library" in report("missing.toml")
    assert "did you mean 'ink-kohya'" in report("missing.toml")
    text = report("quarantined.toml")
    assert "LoRA 'old' is quarantined" in text and "pickle" in text
    text = report("lineage.toml")
    assert "LoRA 'ponystyle' is pony lineage" in text
    assert "'tiny-illustrious' is illustrious" in text
    assert "allow_cross_lineage" in text
    assert "named twice" in report("twice.toml")
    jobs = _renders(farm)
    assert jobs["allowed"]["state"] == "done"
    assert any("allowed by allow_cross_lineage" in w for w in jobs["allowed"]["warnings"])


def test_unknown_lineage_is_allowed_with_a_warning(farm, loras) -> None:
    write_kohya_original(make_tiny_lora(seed=30), loras / "anon.safetensors")
    _run(farm, _job("anon.toml", loras=_lora_table("anon")))
    [job] = farm.history()
    assert job["state"] == "done"
    assert any("lineage unknown for LoRA 'anon'" in w for w in job["warnings"])


def test_a_lora_that_patches_nothing_fails_the_render_loudly(farm, loras) -> None:
    _run(farm, _job("dud.toml", loras=_lora_table("dud")), _job("fine.toml"))
    jobs = _renders(farm)
    assert jobs["fine"]["state"] == "done"
    assert jobs["dud"]["state"] == "failed"
    error = jobs["dud"]["renders"][0]["error"]
    assert "patched no module" in error and "dud" in error
    report = (farm.jobs / "failed" / "dud.toml.error.txt").read_text()
    assert "patched no module" in report
    assert not list((farm.outputs).glob("dud-*/*.png"))


def test_trigger_words_are_appended_when_asked(farm, loras) -> None:
    write_kohya_original(make_tiny_lora(seed=31), loras / "trig.safetensors",
                         metadata={**BASE, "modelspec.trigger_phrase": "inkwash style"})
    _run(farm, _job("trig.toml", loras=_lora_table("trig"), extra="trigger_words = true\n"))
    [job] = farm.history()
    assert job["renders"][0]["prompt"] == "a red lighthouse, inkwash style"
