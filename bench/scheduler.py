"""Benchmark: lorafarm's scheduler against the plain diffusers loop a user would write.

    .venv/bin/python bench/scheduler.py [--renders 120] [--size 192] [--steps 16]

In one run, on tiny random-weight SDXL checkpoints built here:
1. A mixed queue (3 checkpoints x 4 LoRA sets, jobs of 2 renders, shuffled arrival order),
   rendered by
   - lorafarm (in-process daemon, until idle), and
   - the plain loop: jobs in arrival order, reload the pipeline when the checkpoint
     changes, load that job's LoRAs, render one image at a time, save it, unload.
   Prints both throughputs and their ratio, pipeline loads, LoRA loads and the busy fraction
   (seconds inside pipeline calls / wall seconds). Targets: >= 2x, loads == checkpoints,
   busy >= 0.9. It also splits the time outside pipeline calls into batches that loaded a
   pipeline or a LoRA and the rest (claims, bookkeeping, hand-offs).

   Why 192 px and 16 steps: what the busy fraction measures is the share of fixed costs
   (pipeline loads, LoRA loads) in a night's work, so the renders must weigh against the
   loads roughly as they do on real hardware. On the tiny models a pipeline load is ~0.1 s
   and a LoRA load ~0.3-0.8 s (almost all of it PEFT building adapter layers, which costs
   the same Python time on a real model), while one 128 px render is ~0.1 s: there the
   loads weigh several times more than they do for a real 1024 px, 30-step SDXL render of
   a few seconds, and the figure says more about PEFT than about the scheduler. Pass
   `--size 128 --steps 12` to see that case.
2. 5,000 job files dropped at once: all accepted; time and peak memory.
3. The scheduler's decision time with 50,000 queued renders (target < 20 ms).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from sqlalchemy import insert, select, update  # noqa: E402

from daemon.config import config_from_dict  # noqa: E402
from daemon.contract.loader import Plugins  # noqa: E402
from daemon.contract.spec import RenderSpec  # noqa: E402
from daemon.queue.scheduler import claim_next_batch  # noqa: E402
from daemon.runtime.console import quiet_libraries  # noqa: E402
from daemon.runtime.runner import Daemon  # noqa: E402
from daemon.store.models import Batch, Job, Render, Store  # noqa: E402
from daemon.store.queries import stats  # noqa: E402
from families.sdxl.tiny import build_tiny_sdxl_pipeline, save_tiny_sdxl_folder  # noqa: E402
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original  # noqa: E402

CHECKPOINTS = ("model-a", "model-b", "model-c")
LORA_SETS: tuple[tuple[str, ...], ...] = ((), ("ink",), ("wash",), ("ink", "wash"))
META = {"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}


def build_assets(root: Path) -> None:
    for seed, name in enumerate(CHECKPOINTS):
        save_tiny_sdxl_folder(build_tiny_sdxl_pipeline(seed=seed), root / "models" / name)
        (root / "models" / f"{name}.toml").write_text('lineage = "sdxl"\n')
    for seed, name in ((1, "ink"), (2, "wash")):
        write_kohya_original(make_tiny_lora(seed=seed), root / "loras" / f"{name}.safetensors",
                             metadata=META)


def make_queue(renders: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for i in range(renders // 2):
        jobs.append({"name": f"job{i:04d}", "checkpoint": CHECKPOINTS[i % 3],
                     "loras": LORA_SETS[(i // 3) % 4], "seed": 1000 + 2 * i})
    rng.shuffle(jobs)
    return jobs


def job_text(job: dict, size: int, steps: int) -> str:
    text = (f'checkpoint = "{job["checkpoint"]}"\nprompt = "a lighthouse"\nseed = {job["seed"]}\n'
            f'count = 2\nsteps = {steps}\ncfg = 5.0\nsampler = "Euler"\nwidth = {size}\n'
            f"height = {size}\n")
    for name in job["loras"]:
        text += f'\n[[loras]]\nname = "{name}"\nstrength = 0.8\n'
    return text


def config_for(assets: Path, farm: Path, **worker):  # type: ignore[no-untyped-def]
    """A farm folder using the shared models and LoRAs under `assets`."""
    return config_from_dict({
        "paths": {"jobs": "jobs", "loras": str(assets / "loras"),
                  "models": str(assets / "models"),
                  "inputs": "inputs", "outputs": "outputs", "state": "state"},
        "intake": {"settle_seconds": 0.0, "retry_young_seconds": 0.0, "rescan_seconds": 5.0},
        "worker": {"max_batch": 4, "pipelines_in_memory": 3, **worker},
        "web": {"enabled": False}, "report": {"enabled": False},
    }, base=farm)


def run_lorafarm(root: Path, queue: list[dict], size: int, steps: int) -> dict:
    farm = root / "farm"
    farm.mkdir()
    config = config_for(root, farm)
    config.ensure_folders()
    for job in queue:
        (config.paths.jobs / f"{job['name']}.toml").write_text(job_text(job, size, steps))
    started = time.perf_counter()
    Daemon(config, plugins=Plugins()).run(until_idle=True)
    wall = time.perf_counter() - started
    store = Store(f"sqlite:///{config.paths.database}", writer=False)
    figures = stats(store)
    with store.session() as session:
        done = session.scalars(select(Render.id).where(Render.state == "done")).all()
        batches = session.execute(select(Batch.pipeline_loads, Batch.lora_loads,
                                         Batch.pipeline_seconds, Batch.wall_seconds)).all()
    store.dispose()
    idle_loading = sum(b.wall_seconds - b.pipeline_seconds for b in batches
                       if b.pipeline_loads or b.lora_loads)
    idle_other = sum(b.wall_seconds - b.pipeline_seconds for b in batches
                     if not (b.pipeline_loads or b.lora_loads))
    return {"wall": wall, "renders": len(done), "idle_loading": idle_loading,
            "idle_other": idle_other, **figures}


def run_plain_loop(root: Path, queue: list[dict], size: int, steps: int) -> dict:
    out = root / "plain"
    out.mkdir()
    pipe = None
    current = None
    pipeline_loads = lora_loads = renders = 0
    pipeline_seconds = 0.0
    started = time.perf_counter()
    for job in queue:
        if job["checkpoint"] != current:
            pipe = StableDiffusionXLPipeline.from_pretrained(root / "models" / job["checkpoint"],
                                                             local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            current = job["checkpoint"]
            pipeline_loads += 1
        for name in job["loras"]:
            pipe.load_lora_weights(str(root / "loras" / f"{name}.safetensors"),
                                   adapter_name=name)
            lora_loads += 1
        if job["loras"]:
            pipe.set_adapters(list(job["loras"]), adapter_weights=[0.8] * len(job["loras"]))
        for i in range(2):
            call = time.perf_counter()
            image = pipe(prompt="a lighthouse", num_inference_steps=steps, guidance_scale=5.0,
                         width=size, height=size,
                         generator=torch.Generator("cpu").manual_seed(job["seed"] + i)).images[0]
            pipeline_seconds += time.perf_counter() - call
            image.save(out / f"{job['name']}-{i}.png")
            renders += 1
        if job["loras"]:
            pipe.unload_lora_weights()
    wall = time.perf_counter() - started
    return {"wall": wall, "renders": renders, "pipeline_loads": pipeline_loads,
            "lora_loads": lora_loads, "busy_fraction": pipeline_seconds / wall}


def bench_intake(root: Path, files: int) -> dict:
    farm = root / "intake"
    farm.mkdir()
    config = config_for(root, farm)
    config.ensure_folders()
    job = {"checkpoint": "model-a", "loras": ("ink",), "seed": 0}
    for i in range(files):
        (config.paths.jobs / f"drop{i:05d}.toml").write_text(
            job_text({**job, "seed": i}, 64, 4))
    daemon = Daemon(config, plugins=Plugins())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    daemon.start()  # the start-up scan takes every file in jobs/
    seconds = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with daemon.store.session() as session:
        accepted = len(session.scalars(select(Job.id).where(Job.state == "queued")).all())
    daemon.close()
    return {"files": files, "accepted": accepted, "seconds": seconds,
            "peak_rss_mb": rss_after / 1024, "rss_growth_mb": (rss_after - rss_before) / 1024}


def bench_decision(root: Path, queued: int, samples: int = 50) -> dict:
    store = Store.for_path(root / "decision" / "db.sqlite")
    store.migrate()
    rng = random.Random(1)
    with store.session() as session:
        job = Job(name="big", file_name="big.toml", content_hash="x", state="queued")
        session.add(job)
        session.flush()
        rows = []
        for i in range(queued):
            spec = RenderSpec(family="sdxl", checkpoint=rng.choice(CHECKPOINTS), prompt="p",
                              negative_prompt="", seed=i, steps=rng.choice((20, 25, 30)),
                              cfg=5.0, sampler="Euler", schedule=None, width=1024, height=1024)
            rows.append({"job_id": job.id, "index": i, "seed": i, "state": "queued",
                         "attempts": 0, "priority": rng.choice((0, 0, 0, 1)),
                         "checkpoint": spec.checkpoint, "batch_key": spec.batch_key(),
                         "spec_json": spec.to_json()})
        session.execute(insert(Render), rows)
    timings = []
    for i in range(samples):
        started = time.perf_counter()
        batch = claim_next_batch(store, 8, loaded=[CHECKPOINTS[i % 3]],
                                 active_key=None, max_wait_seconds=3600)
        timings.append(time.perf_counter() - started)
        with store.session() as session:  # put them back: the queue stays at full size
            session.execute(update(Render).where(Render.id.in_([c.render_id for c in batch]))
                            .values(state="queued"))
    store.dispose()
    return {"queued": queued, "median_ms": statistics.median(timings) * 1000,
            "p95_ms": sorted(timings)[int(0.95 * len(timings))] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=120)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--drop-files", type=int, default=5000)
    parser.add_argument("--queued", type=int, default=50000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_assets(root)
        queue = make_queue(args.renders)
        farm = run_lorafarm(root, queue, args.size, args.steps)
        plain = run_plain_loop(root, queue, args.size, args.steps)
        intake = bench_intake(root, args.drop_files)
        decision = bench_decision(root, args.queued)

    def rate(result: dict) -> float:
        return result["renders"] / result["wall"] * 60

    print(f"mixed queue: {args.renders} renders, {len(CHECKPOINTS)} checkpoints, "
          f"{len(LORA_SETS)} LoRA sets, {args.size}px, {args.steps} steps, shuffled")
    print(f"  lorafarm   : {rate(farm):7.1f} renders/min  wall {farm['wall']:6.1f}s  "
          f"pipeline loads {farm['pipeline_loads']}  LoRA loads {farm['lora_loads']}  "
          f"switches {farm['lora_switches']}  busy {farm['busy_fraction']:.2f}  "
          f"mean batch {farm['mean_batch_size']}")
    print(f"               outside pipeline calls: {farm['idle_loading']:.2f}s in batches that "
          f"loaded a pipeline or LoRA, {farm['idle_other']:.2f}s in the rest "
          f"(claims, bookkeeping; {farm['batches']} batches in all); pipeline calls "
          f"{farm['pipeline_seconds']:.1f}s of {farm['wall_seconds']:.1f}s batch wall")
    print(f"  plain loop : {rate(plain):7.1f} renders/min  wall {plain['wall']:6.1f}s  "
          f"pipeline loads {plain['pipeline_loads']}  LoRA loads {plain['lora_loads']}  "
          f"busy {plain['busy_fraction']:.2f}")
    print(f"  throughput ratio lorafarm/plain: {rate(farm) / rate(plain):.2f}x")
    print(f"intake: {intake['accepted']}/{intake['files']} job files accepted in "
          f"{intake['seconds']:.1f}s ({intake['files'] / intake['seconds']:.0f} files/s), "
          f"peak RSS {intake['peak_rss_mb']:.0f} MB")
    print(f"decision time with {decision['queued']} queued renders: median "
          f"{decision['median_ms']:.2f} ms, p95 {decision['p95_ms']:.2f} ms")


if __name__ == "__main__":
    main()
