"""Benchmark: switching LoRA sets on a loaded pipeline vs reloading the pipeline per LoRA.

    .venv/bin/python bench/lora_switch.py [--repeats 20]

Builds the tiny SDXL checkpoint and two tiny LoRAs (kohya layout, every attention module of
UNet and both text encoders) in a temporary folder, then measures, in one run:
  - switch: lorafarm's path (daemon.lora_patching.apply_loras): adapters loaded once, then
    switched with set_adapters (A -> B -> A+B -> none -> ...);
  - first load: loading one adapter into the pipeline (paid once per LoRA and pipeline);
  - reload: what a plain script does for each job: load the pipeline from disk, load the
    job's LoRA, (render), unload.
Prints medians in milliseconds and the reload/switch ratio. Tiny models make loading cheap;
on a real SDXL checkpoint (6.9 GB) the reload side grows to seconds while a switch stays in
milliseconds, so the ratio here is a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402

from daemon.contract.spec import LoraUse  # noqa: E402
from daemon.render.lora_patching import AdapterState, apply_loras  # noqa: E402
from daemon.runtime.console import quiet_libraries  # noqa: E402
from families.sdxl.sdxl import SDXLFamily  # noqa: E402
from families.sdxl.tiny import build_tiny_sdxl_pipeline, save_tiny_sdxl_folder  # noqa: E402
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original  # noqa: E402


def _ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_libraries()
    family = SDXLFamily()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tiny_sdxl_folder(build_tiny_sdxl_pipeline(seed=0), root / "model")
        files = {}
        for seed, name in ((1, "a"), (2, "b")):
            files[name] = write_kohya_original(make_tiny_lora(seed=seed),
                                               root / f"{name}.safetensors")
        lora_a = LoraUse(name="a", strength=0.8, autov3="aaaaaaaaaaaa")
        lora_b = LoraUse(name="b", strength=0.6, autov3="bbbbbbbbbbbb")

        def load_pipeline() -> StableDiffusionXLPipeline:
            return StableDiffusionXLPipeline.from_pretrained(root / "model",
                                                             local_files_only=True)

        # lorafarm: the pipeline and both adapters stay loaded; sets are switched.
        pipe = load_pipeline()
        state = AdapterState()
        first_loads = []
        for lora in (lora_a, lora_b):
            started = time.perf_counter()
            apply_loras(pipe, family, (lora,), files, state)
            first_loads.append(time.perf_counter() - started)
        sets = [(lora_a,), (lora_b,), (lora_a, lora_b), (), (lora_b, lora_a)]
        switches = []
        for i in range(args.repeats * len(sets)):
            started = time.perf_counter()
            apply_loras(pipe, family, sets[i % len(sets)], files, state)
            switches.append(time.perf_counter() - started)

        # A plain loop: reload the pipeline for a job, load its LoRA, unload.
        reloads = []
        pipeline_only = []
        for i in range(max(3, args.repeats // 4)):
            started = time.perf_counter()
            fresh = load_pipeline()
            pipeline_only.append(time.perf_counter() - started)
            fresh.load_lora_weights(str(files["a" if i % 2 else "b"]), adapter_name="job")
            fresh.unload_lora_weights()
            reloads.append(time.perf_counter() - started)
            del fresh

    switch_ms, reload_ms = _ms(switches), _ms(reloads)
    print(f"adapter first load   : {_ms(first_loads):8.2f} ms (median of {len(first_loads)})")
    print(f"LoRA set switch      : {switch_ms:8.2f} ms (median of {len(switches)}; "
          f"{state.switches} switches, {state.loads} loads)")
    print(f"pipeline reload      : {_ms(pipeline_only):8.2f} ms (median of {len(pipeline_only)})")
    print(f"reload + LoRA + unload: {reload_ms:8.2f} ms (median of {len(reloads)})")
    print(f"ratio reload/switch  : {reload_ms / switch_ms:8.1f}x")


if __name__ == "__main__":
    main()
