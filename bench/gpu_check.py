"""GPU check: a full-size random-weight SDXL on CUDA, a few minutes at most.

    .venv/bin/python bench/gpu_check.py [--steps 20] [--batch 4] [--size 1024]

Prints
1. images per minute of the full-size SDXL UNet + VAE at batch 1 against batch N (fp16);
2. the busy fraction (seconds inside pipeline calls / wall seconds) of lorafarm running a
   short mixed queue (two checkpoints, two LoRA sets) on that GPU, from `lorafarm stats`;
3. the pipeline cache's RAM tier: seconds to move the pipeline to CPU RAM and back against
   a load of the same pipeline from disk (daemon/render/pipeline_cache.py).
The weights are random (no hub here): speed and memory are those of the real architecture.
The text encoders are full width with a tiny vocabulary, which costs nothing measurable.
Exits with a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def full_size_sdxl(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """SDXL base's real UNet, VAE and text-encoder widths with random weights."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from families.sdxl.tiny import _tiny_clip_tokenizer  # the in-memory byte-level tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                        sample_size=1024, scaling_factor=0.13025)
    tokenizer = _tiny_clip_tokenizer("<|endoftext|>")
    tokenizer_2 = _tiny_clip_tokenizer("!")
    vocab = len(tokenizer)
    common = {"vocab_size": vocab, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
              "max_position_embeddings": 77}
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12,
                                       pad_token_id=vocab - 1, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, projection_dim=1280, hidden_act="gelu", pad_token_id=0,
        **common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=scheduler)
    return pipe.to(dtype=dtype)


def images_per_minute(pipe, batch: int, steps: int, size: int) -> float:  # type: ignore[no-untyped-def]
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    kwargs = dict(prompt=["a lighthouse"] * batch, num_inference_steps=steps, width=size,
                  height=size, generator=generators, output_type="pil")
    pipe(**{**kwargs, "num_inference_steps": 2})  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    pipe(**kwargs)
    torch.cuda.synchronize()
    return batch / (time.perf_counter() - started) * 60


def busy_fraction_of_a_mixed_queue(pipe, root: Path, steps: int, size: int) -> dict:  # type: ignore[no-untyped-def]
    from daemon.config import config_from_dict
    from daemon.contract.loader import Plugins
    from daemon.runtime.runner import Daemon
    from daemon.store.models import Store
    from daemon.store.queries import stats

    for name in ("sdxl-a", "sdxl-b"):
        pipe.save_pretrained(root / "models" / name, safe_serialization=True)
        (root / "models" / f"{name}.toml").write_text('lineage = "sdxl"\n')
    config = config_from_dict({
        "paths": {"models": str(root / "models")},
        "intake": {"settle_seconds": 0.0, "retry_young_seconds": 0.0},
        "worker": {"max_batch": 4, "pipelines_in_memory": 2},
        "web": {"enabled": False}, "report": {"enabled": False}}, base=root)
    config.ensure_folders()
    for i in range(12):
        (config.paths.jobs / f"job{i:02d}.toml").write_text(
            f'checkpoint = "sdxl-{"ab"[i % 2]}"\nprompt = "a lighthouse"\nseed = {i}\n'
            f'count = 2\nsteps = {steps}\nwidth = {size}\nheight = {size}\n'
            f'sampler = "{"Euler" if i % 3 else "DPM++ 2M Karras"}"\n')
    started = time.perf_counter()
    Daemon(config, plugins=Plugins()).run(until_idle=True)
    wall = time.perf_counter() - started
    store = Store(f"sqlite:///{config.paths.database}", writer=False)
    figures = stats(store)
    store.dispose()
    return {"wall_seconds": round(wall, 1), **figures}


def ram_tier_against_disk(pipe, root: Path) -> dict:  # type: ignore[no-untyped-def]
    """Seconds for a load from disk onto the GPU, a move to CPU RAM and one back."""
    from diffusers import StableDiffusionXLPipeline

    from daemon.render.pipeline_cache import CPU, move_pipeline, pipeline_bytes

    folder = root / "tier"
    pipe.save_pretrained(folder)
    for file in folder.rglob("*.safetensors"):  # out of the page cache: a cold load
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cuda = torch.device("cuda")

    def timed(action) -> float:  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        started = time.perf_counter()
        action()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    loaded = []
    load = timed(lambda: loaded.append(StableDiffusionXLPipeline.from_pretrained(
        folder, torch_dtype=torch.float16, local_files_only=True).to(cuda)))
    down = timed(lambda: move_pipeline(loaded[0], CPU))
    up = timed(lambda: move_pipeline(loaded[0], cuda))
    return {"gib": sum(pipeline_bytes(loaded[0]).values()) / 2**30, "load": load,
            "down": down, "up": up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with an NVIDIA GPU")
        sys.exit(2)
    from daemon.runtime.console import quiet_libraries

    quiet_libraries()
    device = torch.cuda.get_device_name(0)
    pipe = full_size_sdxl(torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    single = images_per_minute(pipe, 1, args.steps, args.size)
    batched = images_per_minute(pipe, args.batch, args.steps, args.size)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{device}: SDXL (random weights, fp16) {args.size}px {args.steps} steps")
    print(f"  batch 1: {single:6.1f} images/min   batch {args.batch}: {batched:6.1f} images/min  "
          f"ratio {batched / single:.2f}x   peak {peak:.1f} GiB")
    pipe.to("cpu")
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        figures = busy_fraction_of_a_mixed_queue(pipe, Path(tmp), args.steps, args.size)
    print(f"  mixed queue (24 renders, 2 checkpoints, 2 samplers): busy fraction "
          f"{figures['busy_fraction']}, {figures['renders_per_hour']} renders/hour, "
          f"pipeline loads {figures['pipeline_loads']}, mean batch {figures['mean_batch_size']}")
    with tempfile.TemporaryDirectory() as tmp:
        tier = ram_tier_against_disk(pipe, Path(tmp))
    print(f"  RAM tier ({tier['gib']:.1f} GiB): to CPU {tier['down']:.2f}s, back to the GPU "
          f"{tier['up']:.2f}s, against a load from disk {tier['load']:.2f}s "
          f"({tier['load'] / tier['up']:.1f}x)")


if __name__ == "__main__":
    main()
