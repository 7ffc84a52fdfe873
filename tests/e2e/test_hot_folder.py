"""A user's story of the hot folder: drop job files, let the daemon run, look at the PNGs,
the job folders and the history."""

from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image
from sd_parsers import ParserManager

from daemon.output.files import read_spec
from tests.conftest import sdxl_job


def _pngs(farm) -> list:  # type: ignore[no-untyped-def]
    return sorted(farm.outputs.rglob("*.png"))


def test_a_job_renders_count_pngs_that_an_independent_reader_parses(farm) -> None:
    farm.drop("lighthouse.toml", sdxl_job(prompt="a red lighthouse, (best quality)", seed=41,
                                          count=3))
    assert farm.run() == 0

    pngs = _pngs(farm)
    assert len(pngs) == 3
    assert farm.files_in("done") == ["lighthouse.toml"]
    assert farm.files_in("processing") == []
    assert list(farm.jobs.glob("*.toml")) == []

    seeds = []
    for png in pngs:
        parsed = ParserManager().parse(png)
        assert parsed is not None, f"sd-parsers could not read {png}"
        prompt = parsed.full_prompt
        negative = parsed.full_negative_prompt
        assert prompt == "a red lighthouse, (best quality)"
        assert negative == "blurry"
        sampler = parsed.samplers[0]
        params = sampler.parameters
        assert int(params["steps"]) == 3
        assert float(params["cfg_scale"]) == 5.0
        seeds.append(int(params["seed"]))
        assert sampler.model is not None and sampler.model.name == "tiny-sdxl"
        assert re.fullmatch(r"[0-9a-f]{10}", sampler.model.hash)
        with Image.open(png) as image:
            assert image.size == (64, 64)
            infotext = image.text["parameters"]
        assert infotext.splitlines()[-1].startswith("Steps: 3, ")
        assert "Model hash: " in infotext and "Model: tiny-sdxl" in infotext
    assert sorted(seeds) == [41, 42, 43]

    history = farm.history()
    assert len(history) == 1
    job = history[0]
    assert job["state"] == "done" and job["file"] == "lighthouse.toml"
    assert sorted(r["seed"] for r in job["renders"]) == [41, 42, 43]
    assert all(r["state"] == "done" and r["attempts"] == 1 for r in job["renders"])
    assert sorted(r["output"] for r in job["renders"]) == [str(p) for p in pngs]


def test_the_model_hash_is_the_sha256_of_the_file(farm, assets) -> None:
    import hashlib

    farm.drop("single.toml", sdxl_job(checkpoint="tiny-sdxl-single", count=1))
    assert farm.run() == 0
    [png] = _pngs(farm)
    with Image.open(png) as image:
        infotext = image.text["parameters"]
    expected = hashlib.sha256(
        (assets.models / "tiny-sdxl-single.safetensors").read_bytes()).hexdigest()[:10]
    assert f"Model hash: {expected}" in infotext
    assert "Model: tiny-sdxl-single" in infotext


def test_the_embedded_spec_re_renders_the_same_image(farm) -> None:
    farm.drop("first.toml", sdxl_job(seed=5, count=1))
    assert farm.run() == 0
    [first] = _pngs(farm)
    spec = read_spec(first)
    assert spec.seed == 5 and spec.checkpoint == "tiny-sdxl" and spec.sampler == "DPM++ 2M"
    assert spec.schedule == "Karras"

    # A job written from the embedded spec alone gives the same pixels.
    farm.drop("again.json", json.dumps({
        "checkpoint": spec.checkpoint, "prompt": spec.user_prompt,
        "negative_prompt": spec.negative_prompt, "seed": spec.seed, "steps": spec.steps,
        "cfg": spec.cfg, "sampler": spec.sampler + " " + spec.schedule,
        "width": spec.width, "height": spec.height}))
    assert farm.run() == 0
    second = [p for p in _pngs(farm) if p != first]
    assert len(second) == 1
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second[0])))


def test_an_image_does_not_depend_on_the_batch_it_was_rendered_in(farm) -> None:
    farm.drop("batch.toml", sdxl_job(seed=100, count=4))
    assert farm.run() == 0
    batched = {read_spec(p).seed: np.asarray(Image.open(p), dtype=np.int16)
               for p in _pngs(farm)}
    farm.drop("alone.toml", sdxl_job(seed=102, count=1))
    assert farm.run() == 0
    [alone_path] = [p for p in _pngs(farm) if "alone" in str(p.parent)]
    alone = np.asarray(Image.open(alone_path), dtype=np.int16)
    # Batched matmuls may round differently in the last bit; 8-bit pixels may then differ
    # by one step at most, never more.
    assert np.abs(batched[102] - alone).max() <= 1
    assert not np.array_equal(batched[100], batched[101])


def test_bad_files_are_rejected_with_a_useful_report_and_the_rest_still_render(farm) -> None:
    farm.drop("good.toml", sdxl_job(count=1))
    farm.drop("malformed.toml", 'checkpoint = "tiny-sdxl"\nprompt = "unclosed\n')
    farm.drop("unknown-key.toml", sdxl_job(count=1) + "stpes = 20\n")
    farm.drop("unknown-checkpoint.toml", sdxl_job(checkpoint="tiny-sdx", count=1))
    farm.drop("out-of-range.toml", sdxl_job(count=1).replace("steps = 3", "steps = 5000"))
    farm.drop("bad-sampler.toml", sdxl_job(count=1, sampler="Eulr a"))
    farm.drop("odd-size.json", json.dumps({"checkpoint": "tiny-sdxl", "prompt": "x",
                                           "width": 70, "height": 64}))
    farm.drop("notes.txt", "not a job")
    farm.drop("binary.toml", b"\x00\x01\x02\xff")
    assert farm.run() == 0

    assert farm.files_in("done") == ["good.toml"]
    rejected = farm.files_in("rejected")

    def report(name: str) -> str:
        assert name in rejected and f"{name}.error.txt" in rejected
        return farm.rejection(name)

    text = report("malformed.toml")
    assert "line 2" in text and "TOML" in text and "How to fix" in text
    text = report("unknown-key.toml")
    assert "unknown key `stpes`" in text and "did you mean `steps`" in text and "line 11" in text
    text = report("unknown-checkpoint.toml")
    assert "unknown checkpoint 'tiny-sdx'" in text and "tiny-sdxl" in text and "line 1" in text
    text = report("out-of-range.toml")
    assert "`steps` = 5000 is out of range" in text and "1 to 150" in text
    assert "limits.max_steps" in text
    text = report("bad-sampler.toml")
    assert "Eulr a" in text and "Euler a" in text
    text = report("odd-size.json")
    assert "`width` = 70 is not a multiple of 8" in text and "use 64 or 72" in text
    text = report("notes.txt")
    assert ".toml" in text and ".json" in text
    text = report("binary.toml")
    assert "binary" in text

    states = {job["file"]: job["state"] for job in farm.history()}
    assert states["good.toml"] == "done"
    assert all(state == "rejected" for name, state in states.items() if name != "good.toml")
    assert len(_pngs(farm)) == 1


def test_the_same_content_dropped_twice_while_unfinished_is_queued_once(farm) -> None:
    text = sdxl_job(count=1, seed=9)
    daemon = farm.daemon()
    daemon.start()  # accept without rendering: the first copy stays unfinished
    farm.drop("once.toml", text)
    assert daemon.intake.scan().accepted
    farm.drop("once-again.toml", text)
    result = daemon.intake.scan()
    assert result.accepted == [] and result.rejected == ["once-again.toml"]
    daemon.close()
    report = farm.rejection("once-again.toml")
    assert "already queued as job 1 (once.toml)" in report

    assert farm.run() == 0
    assert len(_pngs(farm)) == 1
    # Once finished, the same file dropped again is a new run.
    farm.drop("once.toml", text)
    assert farm.run() == 0
    assert len(_pngs(farm)) == 2
    assert farm.files_in("done") == ["once.job3.toml", "once.toml"]


def test_a_file_still_being_written_is_not_taken(make_farm) -> None:
    farm = make_farm(intake={"settle_seconds": 30.0, "retry_young_seconds": 30.0})
    daemon = farm.daemon()
    daemon.start()
    path = farm.jobs / "slow.toml"
    path.write_text('checkpoint = "tiny-sdxl"\n')  # half written, just modified
    result = daemon.intake.scan()
    assert result.pending == ["slow.toml"] and not result.rejected
    # Files being written under a temporary name are ignored entirely.
    (farm.jobs / "next.toml.part").write_text("x")
    (farm.jobs / ".hidden.toml").write_text("x")
    assert daemon.intake.scan().pending == ["slow.toml"]
    daemon.close()
