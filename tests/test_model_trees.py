"""Existing ComfyUI and A1111/Forge installs are indexed in place and rendered from, and not
a byte in them changes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from families.sdxl_tiny_loras import make_tiny_lora, write_kohya_original


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_comfyui_and_a1111_trees_are_used_read_only(make_farm, assets, tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(assets.models / "tiny-sdxl-single.safetensors",
                comfy / "models" / "checkpoints" / "comfy-model.safetensors")
    comfy_loras = comfy / "models" / "loras"
    write_kohya_original(make_tiny_lora(seed=8), comfy_loras / "comfy-ink.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    webui = tmp_path / "stable-diffusion-webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(assets.models / "tiny-pony.safetensors",
                webui / "models" / "Stable-diffusion" / "webui-pony.safetensors")
    webui_loras = webui / "models" / "Lora"
    write_kohya_original(make_tiny_lora(seed=9), webui_loras / "webui-ink.safetensors",
                         metadata={"ss_sd_model_name": "ponyDiffusionV6XL"})
    for tree in (comfy, webui):
        (tree / "models" / "sd.ckpt").write_bytes(b"\x80pickle")  # listed, never loaded
    before = {tree: _snapshot(tree) for tree in (comfy, webui)}

    farm = make_farm(paths={"comfyui": [str(comfy)], "a1111": [str(webui)]},
                     checkpoints={"comfy-model": {"config": str(assets.configs / "tiny-sdxl")},
                                  "webui-pony": {"config": str(assets.configs / "tiny-sdxl")}})
    farm.drop("comfy.toml", 'checkpoint = "comfy-model"\nprompt = "a boat <lora:comfy-ink:0.8>"\n'
                            'seed = 1\nsteps = 2\nwidth = 64\nheight = 64\nsampler = "Euler"\n')
    farm.drop("webui.toml", 'checkpoint = "webui-pony"\nprompt = "a fox <lora:webui-ink:0.8>"\n'
                            'seed = 2\nsteps = 2\nwidth = 64\nheight = 64\n')
    assert farm.run() == 0
    assert farm.files_in("done") == ["comfy.toml", "webui.toml"], farm.files_in("rejected")
    assert len(list(farm.outputs.rglob("*.png"))) == 2
    for tree in (comfy, webui):
        assert _snapshot(tree) == before[tree], f"{tree} was modified"
