"""Benchmark: how often a LoRA-epoch comparison loads LoRA files.

    .venv/bin/python bench/epoch_sweep.py [--epochs 30] [--prompts 2] [--seeds 2]

Writes the tiny SDXL checkpoint and `--epochs` kohya epoch files of one tiny LoRA
(mystyle-000001 ... ) into a temporary farm, drops one job sweeping
`lora = ["mystyle-*", "none"]` x prompts x seeds, runs the daemon until idle, and prints
the renders, the LoRA files, and the LoRA loads the worker recorded (the `batches` table, as
`lorafarm stats` shows it). Each file loaded once means loads == files.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from daemon.config import config_from_dict  # noqa: E402
from daemon.contract.loader import Plugins  # noqa: E402
from daemon.runtime.console import quiet_libraries  # noqa: E402
from daemon.runtime.runner import Daemon  # noqa: E402
from daemon.store.models import Store  # noqa: E402
from daemon.store.queries import stats  # noqa: E402
from families.sdxl.sdxl import SDXLFamily  # noqa: E402
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=4)
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        SDXLFamily().build_demo(root / "models", root / "configs")
        loras = root / "loras"
        loras.mkdir()
        for epoch in range(1, args.epochs + 1):
            write_kohya_original(make_tiny_lora(seed=epoch), loras / f"mystyle-{epoch:06d}"
                                 ".safetensors", metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
        combos = (args.epochs + 1) * args.prompts * args.seeds
        config = config_from_dict({
            "paths": {"models": str(root / "models")},
            "intake": {"settle_seconds": 0.0, "retry_young_seconds": 0.0},
            "worker": {"max_batch": args.max_batch},
            "web": {"enabled": False},
            "limits": {"max_count": max(100, combos)},
            "checkpoints": {"tiny-sdxl-single": {"config": str(root / "configs/tiny-sdxl")}},
        }, base=root)
        prompts = json.dumps([f"prompt number {n} of a lighthouse" for n in range(args.prompts)])
        seeds = json.dumps(list(range(1, args.seeds + 1)))
        jobs = root / "jobs"
        jobs.mkdir()
        # The LoRA axis is not the outer one on purpose: renders are queued prompt by prompt.
        (jobs / "epochs.toml").write_text(
            'checkpoint = "tiny-sdxl"\nsteps = 1\nwidth = 64\nheight = 64\nsampler = "Euler"\n'
            f"[sweep]\nprompt = {prompts}\nlora = [\"mystyle-*\", \"none\"]\nseed = {seeds}\n")
        started = time.perf_counter()
        assert Daemon(config, plugins=Plugins()).run(until_idle=True) == 0
        wall = time.perf_counter() - started
        store = Store(f"sqlite:///{config.paths.database}", writer=False)
        figures = stats(store)
        store.engine.dispose()
        print(f"epoch files: {args.epochs} (+ baseline), prompts: {args.prompts}, "
              f"seeds: {args.seeds}")
        print(f"renders: {figures['renders']} (expected {combos}), batches: "
              f"{figures['batches']}, mean batch size: {figures['mean_batch_size']}")
        print(f"LoRA loads: {figures['lora_loads']} for {args.epochs} files "
              f"(switches: {figures['lora_switches']}), pipeline loads: "
              f"{figures['pipeline_loads']}, wall: {wall:.1f} s")


if __name__ == "__main__":
    main()
