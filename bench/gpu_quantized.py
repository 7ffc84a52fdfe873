"""GPU check for quantized bases: a full-size random-weight FLUX.1 transformer on CUDA in
bfloat16, FP8 and GGUF Q8_0, a few minutes at most.

    .venv/bin/python bench/gpu_quantized.py [--steps 10] [--size 1024] [--batch 1]
    .venv/bin/python bench/gpu_quantized.py --tiny      # the same code at tiny size, on the CPU

Prints, per form of the same weights, the memory the weights take, the peak memory of a
denoising step and the seconds per step (transformer forward at `--size`, 512 text tokens):

* bf16: the transformer as diffusers loads it;
* fp8 layerwise: diffusers' `enable_layerwise_casting(storage_dtype=float8_e4m3fn,
  compute_dtype=bfloat16)` (norms, embeddings and the output projection stay bfloat16);
* fp8 lorafarm: what lorafarm loads an FP8 file as (families/shared/quantized.py: every Linear kept
  in float8 bytes, widened per forward; LoRAs keep their own precision on top);
* gguf Q8_0: diffusers' GGUF loader (`from_single_file(..., quantization_config=
  GGUFQuantizationConfig(compute_dtype=bfloat16))`), GGUFLinear dequantizing per forward.

The weights are random (no hub here): speed and memory are those of the real architecture.
The Q8_0 blocks are made on the GPU by the same rule as the `gguf` package (checked against
it on a small matrix first). Exits with a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

FULL = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "axes_dims_rope": (16, 56, 56)}
TINY = {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 64, "pooled_projection_dim": 32,
        "axes_dims_rope": (4, 6, 6)}
TEXT_TOKENS = 512
Q8_0_BLOCK, Q8_0_BYTES = 32, 34  # 32 int8 weights and one float16 scale per block


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    """GGML Q8_0 blocks of a 2-D weight as bytes (rows, cols / 32 * 34), computed where the
    weight is: per 32 weights d = max|w| / 127 (float16) and q = round(w / d) (int8), rounded
    half away from zero as the `gguf` package does."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // Q8_0_BLOCK, Q8_0_BLOCK)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    scaled = blocks * inverse
    quants = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(torch.int8)
    packed = torch.cat([scale.to(torch.float16).view(torch.uint8), quants.view(torch.uint8)],
                       dim=-1)
    return packed.reshape(rows, cols // Q8_0_BLOCK * Q8_0_BYTES)


def check_q8_0_against_gguf() -> None:
    import gguf

    sample = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    expected = gguf.quants.quantize(sample.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(q8_0(sample), torch.from_numpy(expected)), "Q8_0 blocks differ from gguf"


def build_bf16(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on the device: no float32 detour
    try:
        with device:
            model = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True,
                                           **shape)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def is_block_linear(model: torch.nn.Module, key: str) -> bool:
    """Weights of the Linear layers GGUF converters quantize (2-D, width a multiple of 32)."""
    module_name, _, param = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return (param == "weight" and isinstance(module, torch.nn.Linear)
            and module.in_features % Q8_0_BLOCK == 0)


def inputs(shape: dict[str, Any], size: int, batch: int, device: torch.device,
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tokens = (size // 16) ** 2  # 8x VAE, 2x2 packing
    generator = torch.Generator("cpu").manual_seed(1)

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=generator).to(device=device, dtype=dtype)

    side = size // 16
    rows = torch.arange(side).repeat_interleave(side)
    columns = torch.arange(side).repeat(side)
    image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).to(device)
    return {"hidden_states": randn(batch, tokens, 64),
            "encoder_hidden_states": randn(batch, TEXT_TOKENS, shape["joint_attention_dim"]),
            "pooled_projections": randn(batch, shape["pooled_projection_dim"]),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype),
            "img_ids": image_ids.to(dtype),
            "txt_ids": torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype)}


def measure(name: str, model: Any, feed: dict[str, torch.Tensor], steps: int,
            device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    weights = torch.cuda.memory_allocated() if cuda else 0
    with torch.inference_mode():
        model(**feed, return_dict=False)  # warm-up: kernels, allocator
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            out = model(**feed, return_dict=False)[0]
        sync()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return {"name": name, "weights_gib": weights / 2**30, "peak_gib": peak / 2**30,
            "s_per_step": seconds, "output": out.float().cpu()}


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny widths on the CPU: checks this script, measures nothing")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_quantized: no CUDA device here (torch.cuda.is_available() is False); run it "
              "on a machine with an NVIDIA GPU, or pass --tiny to check the script on the CPU")
        sys.exit(2)
    from diffusers import FluxTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from daemon.runtime.console import quiet_libraries
    from families.shared.quantized import load_fp8_model, load_gguf_model

    quiet_libraries()
    check_q8_0_against_gguf()
    shape = TINY if args.tiny else FULL
    device = torch.device("cpu" if args.tiny else "cuda")
    # bfloat16 on the GPU as lorafarm runs Flux there; float32 on the CPU, as lorafarm does.
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size, steps = (64, 2) if args.tiny else (args.size, args.steps)
    feed = inputs(shape, size, args.batch, device, dtype)
    results: list[dict[str, Any]] = []

    import gguf

    model = build_bf16(shape, device, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    config = dict(model.config)
    results.append(measure("bf16" if not args.tiny else "fp32", model, feed, steps, device))

    # The other forms of the same weights, kept on the CPU as a file would give them.
    state = model.state_dict()
    fp8_state: dict[str, torch.Tensor] = {}
    gguf_state: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        linear = is_block_linear(model, key)
        bias_of_linear = key.endswith(".bias") and is_block_linear(model, key[:-5] + ".weight")
        fp8_state[key] = (tensor.to(torch.float8_e4m3fn) if linear or bias_of_linear
                          else tensor).cpu()
        gguf_state[key] = (GGUFParameter(q8_0(tensor).cpu(),
                                         quant_type=gguf.GGMLQuantizationType.Q8_0)
                           if linear else tensor.float().cpu())

    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    release()
    results.append(measure("fp8 layerwise", model, feed, steps, device))
    del model, state
    release()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        _save_config(config, base / "transformer")
        loaders: list[tuple[str, Callable[[], Any]]] = [
            ("fp8 lorafarm", lambda: load_fp8_model(
                FluxTransformer2DModel, fp8_state, base, "transformer", dtype, base / "fp8")),
            ("gguf Q8_0", lambda: load_gguf_model(
                FluxTransformer2DModel, gguf_state, base, "transformer", dtype, base / "gguf")),
        ]
        for name, load in loaders:
            started = time.perf_counter()
            loaded = load().to(device)
            load_seconds = time.perf_counter() - started
            release()
            result = measure(name, loaded, feed, steps, device)
            result["load_s"] = load_seconds
            results.append(result)
            del loaded
            release()

    where = "CPU (--tiny: a check of this script, not a measurement)" if args.tiny else \
        torch.cuda.get_device_name(0)
    print(f"{where}: FLUX.1 transformer, random weights, {parameters / 1e9:.2f}B parameters, "
          f"{size}x{size}, batch {args.batch}, {TEXT_TOKENS} text tokens, {steps} steps")
    print(f"  {'form':<14} {'weights GiB':>11} {'peak GiB':>9} {'s/step':>8} "
          f"{'vs bf16':>8} {'max |out - bf16|':>17}")
    reference = results[0]
    for result in results:
        drift = (result["output"] - reference["output"]).abs().max().item()
        print(f"  {result['name']:<14} {result['weights_gib']:>11.2f} {result['peak_gib']:>9.2f} "
              f"{result['s_per_step']:>8.3f} "
              f"{result['s_per_step'] / reference['s_per_step']:>7.2f}x {drift:>17.4f}")


def _save_config(config: dict[str, Any], folder: Path) -> None:
    """A transformer config.json for the single-file loaders, without building a model."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()
             if not k.startswith("_") or k == "_class_name"}
    clean["_class_name"] = "FluxTransformer2DModel"
    (folder / "config.json").write_text(json.dumps(clean, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
