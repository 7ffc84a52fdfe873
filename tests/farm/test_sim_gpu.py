"""The simulated GPU (bench/sim_gpu.py) that the farm benchmark runs on: loaded through config
`plugins`, it renders marker checkpoints by sleeping per step, with LoRAs patched through
PEFT, while the rest (intake, library, claims, outputs, history) is the real daemon."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from PIL import Image

from bench.sim_gpu import write_sim_checkpoint, write_sim_lora
from daemon.cli.main import history_records
from daemon.config import config_from_dict
from daemon.contract.loader import Plugins
from daemon.runtime.runner import Daemon


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


def test_database_pool_size_caps_a_daemons_connections(tmp_path: Path, postgres_url) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    from daemon.config import ConfigError

    write_sim_checkpoint(tmp_path / "models" / "sim-a.safetensors", step_seconds=0.01)
    config = config_from_dict({
        "plugins": ["bench.sim_gpu"], "database_url": postgres_url, "database_pool_size": 2,
        "intake": {"settle_seconds": 0.0, "retry_young_seconds": 0.0},
        "web": {"enabled": False},
    }, base=tmp_path, source=tmp_path / "config.toml")
    config.paths.jobs.mkdir(parents=True)
    for n in range(4):
        (config.paths.jobs / f"j{n}.toml").write_text(
            f'checkpoint = "sim-a"\nprompt = "a barn"\nseed = {n}\ncount = 3\nsteps = 3\n')
    seen: list[int] = []
    daemon = Daemon(config, plugins=Plugins(config.plugins))
    name = postgres_url.rsplit("/", 1)[1]

    def count_connections() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as db:
            while not done.is_set():
                seen.append(db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                       "%s AND pid <> pg_backend_pid()", (name,)).fetchone()[0])
                time.sleep(0.02)

    done = threading.Event()
    watcher = threading.Thread(target=count_connections, daemon=True)
    watcher.start()
    try:
        assert daemon.run(until_idle=True) == 0
    finally:
        done.set()
        watcher.join(timeout=10)
    assert [job["state"] for job in history_records(config, limit=10)] == ["done"] * 4
    assert seen and max(seen) <= 2
    for bad in (1, -3, "2", True):
        try:
            config_from_dict({"database_pool_size": bad}, base=tmp_path)
        except ConfigError as exc:
            assert "database_pool_size must be 0" in str(exc)
        else:
            raise AssertionError(f"database_pool_size = {bad!r} was accepted")
