"""Pony and Illustrious: SDXL's code, their own conventions and lineage."""

from __future__ import annotations

from PIL import Image

from daemon.output.files import read_spec
from families.sdxl.illustrious import ILLUSTRIOUS_NEGATIVE, IllustriousFamily
from families.sdxl.lineage import guess_lineage
from families.sdxl.pony import PonyFamily
from tests.support.helpers import job_text


def _job(checkpoint: str, prompt: str, extra: str = "") -> str:
    return job_text(checkpoint=checkpoint, prompt=prompt, seed=3, steps=2, width=64,
                    height=64) + extra


def _infotext(png) -> str:  # type: ignore[no-untyped-def]
    with Image.open(png) as image:
        return image.text["parameters"]


def test_the_demo_checkpoints_get_their_family_from_the_header_metadata(farm) -> None:
    daemon = farm.daemon()
    daemon.start()
    infos = {info.name: info for info in daemon.registry.all()}
    daemon.close()
    assert infos["tiny-pony"].family == "pony" and infos["tiny-pony"].lineage == "pony"
    assert infos["tiny-illustrious"].family == "illustrious"
    assert infos["tiny-sdxl-single"].family == "sdxl"
    assert infos["tiny-sdxl-single"].lineage == "sdxl"
    assert infos["tiny-sdxl"].lineage == "sdxl"  # from its sidecar tiny-sdxl.toml


def test_pony_conventions_are_applied_and_recorded(farm) -> None:
    farm.drop("pony.toml", _job("tiny-pony", "source_anime, rating_safe, a fox"))
    farm.drop("pony-tagged.toml", _job("tiny-pony", "score_9, a fox"))
    farm.drop("pony-plain.toml", _job("tiny-pony", "a fox", "conventions = false\n"))
    assert farm.run() == 0
    by_job = {p.parent.name.rsplit("-", 1)[0]: p for p in farm.outputs.rglob("*.png")}
    text = _infotext(by_job["pony"])
    assert text.startswith("score_9, score_8_up, score_7_up, score_6_up, score_5_up, "
                           "score_4_up, source_anime, rating_safe, a fox")
    assert "Sampler: Euler a" in text and "Clip skip: 2" in text and "CFG scale: 7" in text
    spec = read_spec(by_job["pony"])
    assert spec.user_prompt == "source_anime, rating_safe, a fox"
    assert spec.prompt.startswith("score_9, score_8_up")
    assert _infotext(by_job["pony-tagged"]).startswith("score_9, a fox\n")
    assert _infotext(by_job["pony-plain"]).startswith("a fox\n")


def test_illustrious_gets_quality_tags_and_negative_and_never_score_tags(farm) -> None:
    farm.drop("il.toml", _job("tiny-illustrious", "score_9, score_8_up, 1girl, red scarf"))
    assert farm.run() == 0
    [png] = list(farm.outputs.rglob("*.png"))
    text = _infotext(png)
    assert text.startswith("masterpiece, best quality, good quality, 1girl, red scarf\n")
    assert "score_" not in text
    assert f"Negative prompt: {ILLUSTRIOUS_NEGATIVE}" in text
    [job] = farm.history()
    assert any("removed Pony score tags" in w for w in job["warnings"])


def test_lineage_signals() -> None:
    assert guess_lineage({"ss_sd_model_name": "ponyDiffusionV6XL_v6.safetensors"},
                         "x.safetensors")[0] == "pony"
    assert guess_lineage({}, "noobaiXL_vPred.safetensors")[0] == "illustrious"
    assert guess_lineage({"ss_tag_frequency": '{"set": {"score_9": 3, "1girl": 9}}'},
                         "style.safetensors")[0] == "pony"
    # The base-model version says "SDXL" for all three: not a lineage signal.
    assert guess_lineage({"ss_base_model_version": "sdxl_base_v1-0"}, "x.safetensors")[0] is None
    assert PonyFamily().match_score_for_lineage("illustrious") is None
    assert IllustriousFamily().match_score_for_lineage("illustrious") == 0.9
