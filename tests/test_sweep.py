"""Sweeps: a [sweep] table renders the cartesian product and writes a labelled grid."""

from __future__ import annotations

from PIL import Image

from daemon.outputs import read_spec
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original


def test_a_sweep_renders_the_product_and_a_labelled_grid(farm) -> None:
    write_kohya_original(make_tiny_lora(seed=2), farm.config.paths.loras / "ink.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    farm.drop("sweep.toml", """\
checkpoint = "tiny-sdxl"
prompt = "a red lighthouse"
seed = 5
steps = 2
width = 64
height = 64
sampler = "Euler"

[[loras]]
name = "ink"

[sweep]
cfg = [3.0, 7.0]
prompt_sr = ["red", "blue", "green"]
"lora:ink" = [0.0, 1.0]
""")
    assert farm.run() == 0
    [job] = farm.history()
    assert job["state"] == "done" and len(job["renders"]) == 2 * 3 * 2
    specs = [read_spec(p) for p in farm.outputs.rglob("0*.png")]
    combos = {(s.cfg, s.prompt, s.loras[0].strength) for s in specs}
    assert len(combos) == 12
    assert {s.prompt for s in specs} == {"a red lighthouse", "a blue lighthouse",
                                         "a green lighthouse"}
    [grid] = list(farm.outputs.rglob("grid.png"))
    with Image.open(grid) as image:
        # 2 columns (cfg) x 6 rows (3 prompts x 2 strengths) of 64 px cells plus labels.
        assert image.size == (160 + 2 * 64, 24 + 6 * 64)


def test_bad_sweeps_are_rejected_with_the_fix(farm) -> None:
    base = 'checkpoint = "tiny-sdxl"\nprompt = "a cat"\nwidth = 64\nheight = 64\n'
    farm.drop("axis.toml", base + "[sweep]\ncfgs = [1.0]\n")
    farm.drop("search.toml", base + '[sweep]\nprompt_sr = ["dog", "fox"]\n')
    farm.drop("big.toml", base + "[sweep]\nseed = [" + ", ".join(map(str, range(101))) + "]\n")
    farm.drop("lora.toml", base + '[sweep]\n"lora:ink" = [0.5]\n')
    assert farm.run() == 0

    assert "unknown sweep axis `cfgs`" in farm.rejection("axis.toml")
    assert "did you mean `cfg`" in farm.rejection("axis.toml")
    assert "searches for 'dog', which is not in the prompt" in farm.rejection("search.toml")
    assert "101 combinations; at most 100" in farm.rejection("big.toml")
    assert "names a LoRA the job does not list" in farm.rejection("lora.toml")
