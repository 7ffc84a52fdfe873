"""Sidecar NAME.toml files: one reader for checkpoints and LoRAs, so a broken sidecar reads the
same wherever it lies, and the message names the file and the key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from daemon.library.loras import LoraLibrary
from daemon.library.registry import Registry
from daemon.library.sidecars import (
    CheckpointSidecar,
    LoraSidecar,
    SidecarError,
    read_checkpoint_sidecar,
    read_lora_sidecar,
)
from daemon.store.models import Store
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original


def test_no_sidecar_is_none(tmp_path: Path) -> None:
    assert read_checkpoint_sidecar("absent", tmp_path / "absent.safetensors") is None
    assert read_lora_sidecar(tmp_path / "absent.safetensors") is None
    (tmp_path / "folder.toml").mkdir()  # a folder of that name is not a sidecar either
    assert read_lora_sidecar(tmp_path / "folder.safetensors") is None


def test_random_bytes_are_not_toml(tmp_path: Path) -> None:
    (tmp_path / "noise.toml").write_bytes(os.urandom(64) + b"\xff\xfe\x00")
    for read in (lambda: read_lora_sidecar(tmp_path / "noise.safetensors"),
                 lambda: read_checkpoint_sidecar("noise", tmp_path / "noise.safetensors")):
        with pytest.raises(SidecarError, match=r"^sidecar noise\.toml is not valid TOML: "):
            read()
    (tmp_path / "broken.toml").write_text('family = "sdxl\n')  # unterminated string
    with pytest.raises(SidecarError, match=r"sidecar broken\.toml is not valid TOML: .*line 1"):
        read_lora_sidecar(tmp_path / "broken.safetensors")


@pytest.mark.parametrize(("text", "message"), [
    ("family = 3\n", 'sidecar x.toml: family = 3 must be text, e.g. family = "sdxl"'),
    ("[lineage]\nname = \"pony\"\n", "sidecar x.toml: lineage = {'name': 'pony'} must be text"),
    ('variant = ["a"]\n', "sidecar x.toml: variant = ['a'] must be text"),
    ('trigger_words = "kawaii"\n', "sidecar x.toml: trigger_words must be a list of strings"),
    ("trigger_words = [1, 2]\n", "sidecar x.toml: trigger_words must be a list of strings"),
])
def test_a_lora_sidecar_of_the_wrong_shape_names_the_key(tmp_path: Path, text: str,
                                                         message: str) -> None:
    (tmp_path / "x.toml").write_text(text)
    with pytest.raises(SidecarError) as caught:
        read_lora_sidecar(tmp_path / "x.safetensors")
    assert str(caught.value).startswith(message)


def test_a_checkpoint_sidecar_of_the_wrong_shape_names_the_key(tmp_path: Path) -> None:
    cases = {'config = 7\n': "sidecar c.toml: config = 7 must be text",
             'transformer_2 = true\n': "sidecar c.toml: transformer_2 = True must be text",
             'cfg = 99\n': "sidecar c.toml: cfg = 99 must be a number from 0 to 30",
             'steps = "six"\n': "sidecar c.toml: steps = 'six' must be a number",
             'vae = ""\n': "sidecar c.toml: vae must be a file name or path"}
    for text, message in cases.items():
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(SidecarError) as caught:
            read_checkpoint_sidecar("c", tmp_path / "c.safetensors")
        assert str(caught.value).startswith(message), text


def test_an_unknown_key_is_named_with_the_key_it_is_a_typo_of(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text('linage = "pony"\ncolour = "red"\n')
    with pytest.raises(SidecarError) as lora:
        read_lora_sidecar(tmp_path / "m.safetensors")
    assert str(lora.value) == (
        "sidecar m.toml: unknown key(s) colour, linage (did you mean lineage?); "
        "allowed: family, lineage, trigger_words, expert, variant")
    # A key that only the other kind takes is unknown here: steps is a checkpoint preset.
    (tmp_path / "m.toml").write_text("stpes = 4\n")
    with pytest.raises(SidecarError, match=r"unknown key\(s\) stpes \(did you mean steps\?\)"):
        read_checkpoint_sidecar("m", tmp_path / "m.safetensors")
    (tmp_path / "m.toml").write_text("steps = 4\n")
    with pytest.raises(SidecarError, match=r"unknown key\(s\) steps; allowed: family"):
        read_lora_sidecar(tmp_path / "m.safetensors")


def test_a_lora_sidecar_read_through_the_one_reader(tmp_path: Path) -> None:
    (tmp_path / "ink.toml").write_text('family = "sdxl"\nlineage = "pony"\nexpert = "high"\n'
                                       'trigger_words = ["ink style", "sketch"]\n')
    sidecar = read_lora_sidecar(tmp_path / "ink.safetensors")
    assert sidecar == LoraSidecar(path=tmp_path / "ink.toml", family="sdxl", lineage="pony",
                                  expert="high", trigger_words=("ink style", "sketch"))
    assert sidecar.values() == {"family": "sdxl", "lineage": "pony", "expert": "high",
                                "trigger_words": ("ink style", "sketch")}


def test_a_checkpoint_sidecar_read_through_the_one_reader(tmp_path: Path) -> None:
    # A folder checkpoint with a dot in its name: the sidecar is NAME.toml, not cut at the dot.
    (tmp_path / "sd-v1.5").mkdir()
    (tmp_path / "sd-v1.5.toml").write_text(
        'lineage = "sd15"\nconfig = "configs/base"\ntransformer_2 = "low.gguf"\n'
        'vae = "ae.safetensors"\ntext_encoder = "enc/clip_l.safetensors"\n'
        'cfg = 4\nsampler = "Euler a"\n')
    sidecar = read_checkpoint_sidecar("sd-v1.5", tmp_path / "sd-v1.5")
    assert isinstance(sidecar, CheckpointSidecar)
    assert sidecar.path == tmp_path / "sd-v1.5.toml" and sidecar.family is None
    assert sidecar.config == (tmp_path / "configs" / "base").resolve()
    assert sidecar.transformer_2 == (tmp_path / "low.gguf").resolve()
    # A bare file name stays bare (found in the UI trees' folders later); a path resolves.
    assert sidecar.components == {"vae": Path("ae.safetensors"),
                                  "text_encoder": (tmp_path / "enc/clip_l.safetensors").resolve()}
    assert sidecar.preset == {"cfg": 4.0, "sampler": "Euler a"}
    assert isinstance(sidecar.preset["cfg"], float)
    assert set(sidecar.values()) == {"lineage", "config", "transformer_2", "vae", "text_encoder",
                                     "cfg", "sampler"}


@pytest.mark.parametrize("content", [
    os.urandom(48) + b"\xff",
    b"family = 3\n",
    b"[family]\nname = 'sdxl'\n",
    b'lineage = ["pony"]\n',
])
def test_the_registry_and_the_library_report_the_same_error(make_farm, assets, tmp_path: Path,
                                                            content: bytes) -> None:
    """The same bad sidecar beside a checkpoint and beside a LoRA of the same name: the
    checkpoint is unrecognised, the LoRA quarantined, and both say the same thing."""
    models, loras = tmp_path / "my-models", tmp_path / "my-loras"
    models.mkdir()
    shutil.copy(assets.models / "tiny-sdxl-single.safetensors", models / "same.safetensors")
    write_kohya_original(make_tiny_lora(seed=3), loras / "same.safetensors")
    for folder in (models, loras):
        (folder / "same.toml").write_bytes(content)
    farm = make_farm(paths={"models": str(models), "loras": str(loras)})
    store = Store.for_path(farm.config.paths.database)
    store.migrate()
    registry = Registry(farm.config, store, farm.plugins)
    try:
        [checkpoint] = [info for info in registry.scan() if info.name == "same"]
        [lora] = LoraLibrary(farm.config, store, farm.plugins).scan()
    finally:
        registry.close()
        store.dispose()
    assert checkpoint.state == "unrecognised" and lora.state == "quarantined"
    assert checkpoint.reason == lora.reason
    assert checkpoint.reason.startswith("sidecar same.toml")
