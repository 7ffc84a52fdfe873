"""The simulated GPU (bench/sim_gpu.py) that the farm benchmark runs on: loaded through config
`plugins`, it renders marker checkpoints by sleeping per step, with LoRAs patched through
PEFT, while the rest (intake, library, claims, outputs, history) is the real daemon."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bench.sim_gpu import write_sim_checkpoint, write_sim_lora
from daemon.cli import history_records
from daemon.config import config_from_dict
from daemon.plugins import Plugins
from daemon.runner import Daemon


def test_a_sim_farm_renders_checkpoints_and_lora_sets(tmp_path: Path) -> None:
    write_sim_checkpoint(tmp_path / "models" / "sim-a.safetensors", step_seconds=0.01)
    write_sim_checkpoint(tmp_path / "models" / "sim-b.safetensors", step_seconds=0.01)
    write_sim_lora(tmp_path / "loras" / "ink.safetensors", rank=2, seed=1)
    write_sim_lora(tmp_path / "loras" / "glow.safetensors", rank=4, seed=2)
    config = config_from_dict({
        "plugins": ["bench.sim_gpu"],
        "intake": {"settle_seconds": 0.0, "retry_young_seconds": 0.0},
        "web": {"enabled": False},
    }, base=tmp_path, source=tmp_path / "config.toml")
    jobs = config.paths.jobs
    jobs.mkdir(parents=True)
    (jobs / "plain.toml").write_text('checkpoint = "sim-a"\nprompt = "a lighthouse"\n'
                                     "seed = 1\ncount = 2\nsteps = 5\n")
    (jobs / "styled.toml").write_text(
        'checkpoint = "sim-b"\nprompt = "a barn"\nseed = 2\ncount = 2\nsteps = 5\n'
        '[[loras]]\nname = "ink"\nstrength = 0.8\n[[loras]]\nname = "glow"\n')
    (jobs / "typo.toml").write_text('checkpoint = "sim-c"\nprompt = "x"\n')
    plugins = Plugins(config.plugins)
    assert "sim_gpu" in plugins.families
    assert Daemon(config, plugins=plugins).run(until_idle=True) == 0

    history = {job["file"]: job for job in history_records(config, limit=10)}
    assert history["typo.toml"]["state"] == "rejected"
    assert "unknown checkpoint 'sim-c'" in history["typo.toml"]["error"]
    for name in ("plain.toml", "styled.toml"):
        assert history[name]["state"] == "done"
        for render in history[name]["renders"]:
            with Image.open(render["output"]) as image:
                assert image.size == (64, 64)
                # The A1111 infotext plugin wrote its metadata as for any image.
                assert "Steps: 5" in image.info["parameters"]
    styled = history["styled.toml"]["renders"][0]
    assert [lora["name"] for lora in styled["loras"]] == ["ink", "glow"]
    # PEFT patched the simulated layer: one module per LoRA, as the file holds.
    patches = styled["lora_patches"]
    assert patches["ink"]["transformer"] == 1 and patches["glow"]["modules_in_file"] == 1
    assert sorted(p.name for p in (jobs / "done").iterdir()) == ["plain.toml", "styled.toml"]
