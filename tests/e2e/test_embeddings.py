"""Textual-inversion embeddings: the library (embeddings/ and UI trees, read in place), A1111's
name-in-the-prompt rule on the tiny SDXL checkpoint, TI hashes, refusals and re-renders."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from daemon.cli.main import cmd_embeddings
from daemon.output.files import read_spec
from families.sdxl.tiny import TE1_HIDDEN, TE2_HIDDEN
from tests.conftest import sdxl_job
from tests.e2e.test_rerender import _a1111_png
from tests.support.helpers import pixels_of


def write_sdxl_embedding(path: Path, seed: int, vectors: int = 2) -> Path:
    """An SDXL embedding for the tiny checkpoint: random vectors of its text encoders'
    widths, under the keys A1111 and kohya write."""
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": torch.randn(vectors, TE1_HIDDEN, generator=generator),
               "clip_g": torch.randn(vectors, TE2_HIDDEN, generator=generator)}, str(path))
    return path


def _job(negative: str, seed: int = 41, checkpoint: str = "tiny-sdxl") -> str:
    return sdxl_job(checkpoint=checkpoint, count=1, seed=seed).replace(
        'negative_prompt = "blurry"', f'negative_prompt = "{negative}"')


def _output_of(farm, job: str) -> Path:  # type: ignore[no-untyped-def]
    """The output PNG of job file `job`.toml (its folder is JOB-<id>)."""
    return next(p for p in farm.outputs.rglob("*.png")
                if p.parent.name.rsplit("-", 1)[0] == job)


def _listing(farm) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cmd_embeddings(argparse.Namespace(config=farm.config.source, json=True)) == 0
    return json.loads(out.getvalue())


def test_an_embedding_named_in_the_negative_prompt_changes_the_image(farm) -> None:
    farm.drop("plain-before.toml", _job("blurry"))
    farm.drop("word-before.toml", _job("blurry, badvibes"))
    farm.drop("weighted-before.toml", _job("blurry, (badvibes:1.6)"))
    assert farm.run() == 0
    embedding = write_sdxl_embedding(farm.root / "embeddings" / "badvibes.safetensors", 3)
    farm.drop("plain-after.toml", _job("blurry"))
    farm.drop("named.toml", _job("blurry, BadVibes"))
    farm.drop("weighted.toml", _job("blurry, (badvibes:1.6)"))
    assert farm.run() == 0
    [before_plain, before_word, before_weighted, after_plain, named, weighted] = [
        _output_of(farm, name) for name in ("plain-before", "word-before", "weighted-before",
                                            "plain-after", "named", "weighted")]
    # Present but not named: nothing changes. Named (any case): the embedding is used, so
    # the image differs from the same words without the file; compel's weight applies to it.
    assert np.array_equal(pixels_of(before_plain), pixels_of(after_plain))
    assert np.abs(pixels_of(named) - pixels_of(before_word)).mean() > 1
    assert np.abs(pixels_of(weighted) - pixels_of(before_weighted)).mean() > 1
    assert np.abs(pixels_of(weighted) - pixels_of(named)).max() > 0
    autov2 = hashlib.sha256(embedding.read_bytes()).hexdigest()[:10]
    parameters = Image.open(named).text["parameters"]
    assert f'TI hashes: "badvibes: {autov2}"' in parameters
    assert f'"embed:badvibes":"{autov2}"' in parameters
    [row] = _listing(farm)
    assert (row["name"], row["state"], row["architecture"], row["vectors"], row["autov2"]) == (
        "badvibes", "ok", "sdxl", 2, autov2)


def test_a_re_render_finds_the_embedding_by_hash_then_by_name(farm) -> None:
    write_sdxl_embedding(farm.root / "embeddings" / "badvibes.safetensors", 3)
    farm.drop("first.toml", _job("blurry, badvibes"))
    assert farm.run() == 0
    [original] = list(farm.outputs.rglob("*.png"))
    # The file is renamed here: the prompt's word no longer names it, its hash does.
    os.replace(farm.root / "embeddings" / "badvibes.safetensors",
               farm.root / "embeddings" / "renamed.safetensors")
    shutil.copy(original, farm.jobs / "again.png")
    autov2 = read_spec(original).extra["embeddings"][0]["autov2"]
    _a1111_png(farm.jobs / "stranger.png",
               "a cat\nNegative prompt: easynegative\nSteps: 3, Sampler: Euler, CFG scale: 5, "
               'Seed: 1, Size: 64x64, Model: tiny-sdxl, TI hashes: "easynegative: c74b4e810b"')
    assert farm.run() == 0
    [again] = [p for p in farm.outputs.rglob("*.png") if p != original]
    assert np.array_equal(pixels_of(original), pixels_of(again))
    assert read_spec(again).extra["embeddings"][0]["file"] == "renamed"
    assert read_spec(again).extra["embeddings"][0]["autov2"] == autov2
    report = farm.rejection("stranger.png")
    assert "not found by hash or by name: easynegative (hash c74b4e810b)" in report


def test_pickles_and_embeddings_of_other_families_are_refused(farm) -> None:
    folder = farm.root / "embeddings"
    folder.mkdir()
    (folder / "oldneg.pt").write_bytes(b"\x80\x04\x95 not loaded")
    save_file({"emb_params": torch.zeros(2, 768)}, str(folder / "sd15neg.safetensors"))
    write_sdxl_embedding(folder / "xlneg.safetensors", 5)
    farm.drop("pickle.toml", _job("oldneg"))
    farm.drop("sd15.toml", _job("sd15neg, blurry"))
    farm.drop("flux.toml", 'checkpoint = "tiny-flux-dev"\nprompt = "a cat, xlneg"\n'
              "width = 64\nheight = 64\nsteps = 1\n")
    assert farm.run() == 0
    assert farm.files_in("done") == []
    report = farm.rejection("pickle.toml")
    assert "embedding 'oldneg'" in report and "pickles" in report and "quarantined" in report
    report = farm.rejection("sd15.toml")
    assert "embedding 'sd15neg'" in report and "emb_params [2, 768]" in report
    report = farm.rejection("flux.toml")
    assert "embedding 'xlneg', which is for SDXL" in report
    assert "FLUX.1 [dev] takes no textual-inversion embeddings" in report
    states = {row["name"]: row["state"] for row in _listing(farm)}
    assert states == {"oldneg": "quarantined", "sd15neg": "unrecognised", "xlneg": "ok"}


def test_a_comfyui_embeddings_folder_is_indexed_in_place_read_only(make_farm, tmp_path) -> None:
    comfy = tmp_path / "ComfyUI"
    folder = comfy / "models" / "embeddings"
    embedding = write_sdxl_embedding(folder / "sub" / "comfyneg.safetensors", 7)
    before = embedding.read_bytes()
    for path in (folder / "sub", folder, comfy / "models", comfy):
        path.chmod(0o555)
    try:
        farm = make_farm(paths={"comfyui": [str(comfy)]})
        farm.drop("comfy.toml", _job("blurry, comfyneg"))
        assert farm.run() == 0
        [png] = list(farm.outputs.rglob("*.png"))
        assert read_spec(png).extra["embeddings"][0]["path"] == str(embedding)
        assert [row["path"] for row in _listing(farm)] == [str(embedding)]
        assert embedding.read_bytes() == before
        assert sorted(p.name for p in folder.rglob("*")) == ["comfyneg.safetensors", "sub"]
    finally:
        for path in (comfy, comfy / "models", folder, folder / "sub"):
            path.chmod(0o755)


def test_embeddings_are_unloaded_after_their_batch(tmp_path) -> None:
    from families.sdxl.embeddings import embeddings_loaded
    from families.sdxl.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)
    path = write_sdxl_embedding(tmp_path / "three.safetensors", 9, vectors=3)
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2),
             pipe.text_encoder.get_input_embeddings().weight.shape[0])
    with embeddings_loaded(pipe, [{"name": "three", "path": str(path)}]):
        assert pipe.tokenizer.tokenize("a three b") == ["a</w>", "three", "b</w>"]
        assert len(pipe.tokenizer_2) == sizes[1] + 3
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2),
            pipe.text_encoder.get_input_embeddings().weight.shape[0]) == sizes


def test_the_status_page_lists_the_embeddings(farm) -> None:
    from starlette.testclient import TestClient

    from daemon.store.models import Store
    from daemon.web.server import create_app

    write_sdxl_embedding(farm.root / "embeddings" / "pagevibes.safetensors", 2)
    (farm.root / "embeddings" / "risky.bin").write_bytes(b"pickle")
    assert farm.run() == 0  # creates the history database the page reads
    app = create_app(farm.config, lambda: Store.for_path(farm.config.paths.database))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        rows = {row["name"]: row for row in client.get("/api/embeddings").json()}
        page = client.get("/loras").text
    assert rows["pagevibes"]["state"] == "ok" and rows["risky"]["state"] == "quarantined"
    assert 'id="embedding-pagevibes"' in page and rows["pagevibes"]["autov2"] in page
    assert "never loads them" in page
