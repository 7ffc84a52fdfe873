"""The Flux.1 families: FLUX.1 [dev] and FLUX.1 [schnell] by Black Forest Labs.

Two families on one architecture ("flux1": a Flux.1 LoRA loads into either), because they
sample differently:

* dev is guidance-distilled: its transformer takes the guidance value as an input
  (`guidance_in`), 28 steps at guidance 3.5 by default, and sigmas shifted by image size;
* schnell is step-distilled: no guidance input at all, 4 unshifted steps.

How users have them: a diffusers folder (`FluxPipeline`), or the transformer alone as one
`.safetensors` file in Black Forest Labs' layout (`flux1-dev.safetensors`, or a ComfyUI / Forge
save with the `model.diffusion_model.` prefix) plus a diffusers Flux.1 folder "base" for
everything else (CLIP-L, T5-XXL, VAE, tokenizers, scheduler and the transformer's config),
named in config.toml: `[checkpoints.NAME] config = "path/to/FLUX.1-dev"`. The file's own
weights decide dev vs schnell (`guidance_in` keys), whichever base it is paired with.

The transformer file may be quantized, in the same BFL layout: a GGUF file
(`flux1-dev-Q8_0.gguf`, city96's), which stays quantized in memory and is dequantized layer by
layer, or an FP8 safetensors file (`flux1-dev-fp8.safetensors`, weights in float8_e4m3fn),
computed in bfloat16 on a GPU and float32 on the CPU (see families/shared/quantized.py). Both need
the same base folder; LoRAs load on top of either, unfused.

Prompts are natural language, encoded by CLIP-L (pooled) and T5 (up to 512 tokens on dev, 256
on schnell, as BFL ships them). A1111 weights, `(word:1.2)`, are applied to T5 through compel
(see `encode_weighted_flux`); a prompt without them goes to diffusers as before. There is no
negative prompt and no CFG scale: guidance is the job key `guidance` (Forge's "Distilled CFG
Scale"); a negative prompt needs `true_cfg`, which runs real classifier-free guidance at twice
the cost per step.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from daemon.plugin_api import (
    CheckpointProbe,
    CheckpointSource,
    DemoAssets,
    Family,
    FamilyDefaults,
    LoadedCheckpoint,
    LoraFacts,
    LoraProbe,
    LoraUse,
    ParsedPrompt,
    Progress,
    RenderError,
    RenderSpec,
    SafetensorsHeader,
    hookimpl,
    make_scheduler,
    parse_prompt,
    quantization_fields,
    read_json_object,
    remember_scheduler_config,
    to_compel_conjunction,
)
from families.flux.bfl import (
    BflLayoutError,
    bfl_to_diffusers,
    is_transformer_key,
    strip_bfl_prefix,
)
from families.flux.settings import SCHEDULER_SETTINGS
from families.shared.components import (
    Component,
    assemble,
    component_problem,
    component_sources,
    missing_config_parts,
    record_components,
)
from families.shared.quantized import (
    float8_dtype_of,
    load_fp8_model,
    load_gguf_model,
    load_gguf_state_dict,
    scaled_fp8_problem,
)

log = logging.getLogger(__name__)

ARCHITECTURE = "flux1"
FLUX_PIPELINES = ("FluxPipeline",)
# The family Flux.1 LoRAs are filed under: nothing in a LoRA says whether it was trained on
# dev or schnell, and both families share the architecture, so the choice is only a label.
LORA_FAMILY = "flux-dev"

# The parts ComfyUI users keep as files of their own (models/text_encoders, models/vae).
FLUX_COMPONENTS = (
    Component("text_encoder", "CLIP-L text encoder", "text_encoders"),  # clip_l.safetensors
    Component("text_encoder_2", "T5-XXL encoder", "text_encoders"),  # t5xxl_fp16.safetensors
    Component("vae", "Flux VAE", "vae"),  # ae.safetensors
)

# Single-file tells, after any `model.diffusion_model.` prefix. `vector_in` (the pooled CLIP
# input) and per-block `img_mod` are Flux.1's: Flux 2 and Chroma have neither, HunyuanVideo
# spells its fused projection `img_attn_qkv`.
_SINGLE_FILE_TELLS = ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight",
                      "single_blocks.0.linear1.weight", "vector_in.in_layer.weight")
_GUIDANCE_KEY = "guidance_in.in_layer.weight"
# Text-to-image Flux.1 takes 16 latent channels x 2 x 2; Fill (384) and Canny/Depth (128)
# concatenate conditioning channels and need other pipelines.
TEXT_TO_IMAGE_IN_CHANNELS = 64

# LoRA keys in the original (BFL / ComfyUI) naming, and PEFT's suffixes for them.
_ORIGINAL_LORA_PREFIXES = ("diffusion_model.", "text_encoders.")
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class FluxFamily(Family):
    """What FLUX.1 [dev] and [schnell] share; the two subclasses hold what differs."""

    supports_hires = True  # families/flux/hires.py
    architecture = ARCHITECTURE
    sampler_kind = "flow"
    # A1111 weights reach CLIP and T5 through compel (prompt_conditioning).
    prompt_weighting = "a1111"
    supports_negative_prompt = False  # unless the job sets true_cfg
    supports_true_cfg = True  # FluxPipeline's true_cfg_scale
    reads_gguf = True  # city96's GGUF transformers, BFL layout
    component_files = tuple(c.name for c in FLUX_COMPONENTS)  # ComfyUI clip_l, t5xxl, ae
    variant: str  # "dev" | "schnell"
    guidance_embeds: bool  # the transformer takes a guidance input (dev)
    max_sequence_length: int  # T5 tokens, as BFL's reference code uses per variant

    # -- recognition -----------------------------------------------------------------------

    def probe_checkpoint(self, source: CheckpointSource) -> CheckpointProbe | None:
        if source.kind == "folder":
            pipeline_class = (source.model_index or {}).get("_class_name")
            if pipeline_class not in FLUX_PIPELINES:
                return None
            config = read_json_object(source.path / "transformer" / "config.json")
            if config is None:
                return None  # no transformer: a base folder for single files, not a model
            if bool(config.get("guidance_embeds")) != self.guidance_embeds:
                return None
            return CheckpointProbe(
                family=self.name, score=0.9,
                reason=f"model_index.json: {pipeline_class}, transformer guidance_embeds: "
                       f"{str(self.guidance_embeds).lower()}")
        table = source.tensor_table()  # a .safetensors or .gguf file's tensors
        if table is None:
            return None
        facts = bfl_transformer_facts(table)
        if facts is None or facts.guidance != self.guidance_embeds:
            return None
        if facts.in_channels != TEXT_TO_IMAGE_IN_CHANNELS:
            return None  # Fill / Canny / Depth: not a text-to-image transformer
        guidance = ("guidance_in keys: dev" if facts.guidance else
                    "no guidance_in keys: schnell")
        container = "GGUF file" if source.kind == "gguf" else "BFL layout"
        return CheckpointProbe(
            family=self.name, score=0.9,
            reason=f"Flux.1 transformer in the {container} ({facts.double_blocks} double / "
                   f"{facts.single_blocks} single blocks, width {facts.width}); {guidance}")

    def probe_lora(self, header: SafetensorsHeader, facts: LoraFacts) -> LoraProbe | None:
        if self.name != LORA_FAMILY:
            return None  # one answer per file: both families would say the same
        found = recognise_flux1_lora(header, facts)
        if found is None:
            return None
        score, reason = found
        return LoraProbe(family=LORA_FAMILY, architecture=ARCHITECTURE, score=score,
                         reason=reason, variant=None)

    def lora_strengths(self, lora: LoraUse) -> dict[str, float]:
        # Flux.1 LoRAs patch the transformer and CLIP-L; diffusers never patches T5 (it drops
        # a kohya file's `lora_te2_` T5 part on load).
        te = lora.strength if lora.text_encoder_strength is None else lora.text_encoder_strength
        return {"transformer": lora.strength, "text_encoder": te}

    def load_lora(self, pipe: Any, path: Path, adapter_name: str, lora: LoraUse) -> None:
        pipe.load_lora_weights(self.lora_for_loading(path), adapter_name=adapter_name)

    def lora_for_loading(self, path: Path) -> str | dict[str, torch.Tensor]:
        """What to hand `pipe.load_lora_weights` for this file: its path, or its tensors
        renamed where diffusers would otherwise load nothing.

        diffusers 0.42 loads original-name Flux.1 LoRAs (`diffusion_model.double_blocks...`,
        ComfyUI's `text_encoders.clip_l...`) only with kohya's `lora_down` / `lora_up`
        suffixes; with PEFT's `lora_A` / `lora_B` it patches no module and raises nothing.
        The two pairs mean the same matrices (down = A, up = B), so renaming is exact.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if not any(key.startswith(_ORIGINAL_LORA_PREFIXES) and key.endswith(_PEFT_SUFFIXES)
                       for key in keys):
                return str(path)
            tensors = {key: handle.get_tensor(key) for key in keys}
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if key.startswith(_ORIGINAL_LORA_PREFIXES):
                key = key.replace(".lora_A.weight", ".lora_down.weight").replace(
                    ".lora_B.weight", ".lora_up.weight")
            renamed[key] = tensor
        return renamed

    def component_sources(self, checkpoint: LoadedCheckpoint) -> dict[str, Path]:
        return component_sources(checkpoint, FLUX_COMPONENTS)

    def missing_requirements(self, checkpoint: LoadedCheckpoint) -> str | None:
        if checkpoint.kind == "folder":
            # Its own weights, unless a component file is named for it.
            if not checkpoint.components:
                return None
            return component_problem(checkpoint, checkpoint.path, FLUX_COMPONENTS)
        scaled = scaled_fp8_problem(checkpoint)
        if scaled:
            return scaled
        where = f"[checkpoints.{checkpoint.name}] config"
        base = checkpoint.config_path
        if base is None:
            return (f"{checkpoint.name!r} is a Flux.1 transformer alone; the tokenizers, "
                    "scheduler and configs come from a local diffusers Flux.1 folder (lorafarm "
                    f"never downloads one): set {where} = "
                    f'"path/to/FLUX.1-{self.variant}" in config.toml, or config = "..." in a '
                    f"sidecar {checkpoint.name}.toml beside the file. The folder's transformer "
                    "weights are not needed, nor its text encoder and VAE weights where those "
                    "are files of their own (ComfyUI's clip_l, t5xxl and ae.safetensors: "
                    "text_encoder, text_encoder_2 and vae in the same table, or found in the "
                    "ComfyUI trees of paths.comfyui)")
        index = read_json_object(base / "model_index.json")
        if index is None:
            return (f"the config folder {base} for {checkpoint.name!r} has no readable "
                    f"model_index.json; point {where} at a diffusers FLUX.1 folder")
        if index.get("_class_name") not in FLUX_PIPELINES:
            return (f"the config folder {base} for {checkpoint.name!r} is a "
                    f"{index.get('_class_name')}, not a FluxPipeline; point {where} at a "
                    "diffusers FLUX.1 folder")
        if not (base / "transformer" / "config.json").is_file():
            return (f"the config folder {base} has no transformer/config.json, which "
                    f"{checkpoint.name!r} needs to be built")
        problem = component_problem(checkpoint, base, FLUX_COMPONENTS)
        if problem:
            return problem
        return missing_config_parts(base, checkpoint.name,
                                    ("tokenizer", "tokenizer_2", "scheduler"))

    def apply_conventions(self, prompt: str, negative_prompt: str | None,
                          enabled: bool) -> tuple[str, str, list[str]]:
        """No prompt conventions. A1111 weights are applied at render time, on the text as
        written (see `prompt_conditioning`); reported here is what A1111 syntax cannot do:
        unbalanced brackets, prompt editing, and BREAK, which T5 reads as a space."""
        negative = negative_prompt or ""
        notes = []
        for which, text in (("prompt", prompt), ("negative_prompt", negative)):
            parsed = parse_prompt(text)
            notes.extend(f"{which}: {warning}" for warning in parsed.warnings)
            if len(parsed.chunks) > 1:
                notes.append(f"{which}: BREAK is read as a space: Flux.1's T5 reads the whole "
                             "prompt as one sequence, with no 75-token chunks to start")
        return prompt, negative, notes

    # -- loading and rendering -------------------------------------------------------------

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> Any:
        from diffusers import FluxPipeline

        self.require_loadable(checkpoint)
        # Flux.1 (and its T5) overflow in float16 and draw black or NaN images.
        dtype = self.bfloat16_for_float16(dtype)
        # Text encoders and VAE kept as files of their own (ComfyUI's clip_l, t5xxl, ae).
        base, files, parts = assemble(checkpoint, FLUX_COMPONENTS, dtype)
        if checkpoint.kind == "folder":
            pipe = FluxPipeline.from_pretrained(checkpoint.path, dtype=dtype,
                                                local_files_only=True, **parts)
            scheduler_config = dict(pipe.scheduler.config)
        else:
            transformer = load_bfl_transformer(checkpoint.path, base, dtype,
                                               gguf=checkpoint.kind == "gguf")
            if bool(transformer.config.guidance_embeds) != self.guidance_embeds:
                raise RenderError(
                    f"{checkpoint.path.name} is a FLUX.1 "
                    f"{'dev' if transformer.config.guidance_embeds else 'schnell'} transformer "
                    f"but was filed as {self.display_name}; remove the family override in "
                    "config.toml")
            pipe = FluxPipeline.from_pretrained(base, transformer=transformer, dtype=dtype,
                                                local_files_only=True, **parts)
            # The base folder may be the other variant: the transformer decides the sigmas.
            scheduler_config = _with_settings(dict(pipe.scheduler.config),
                                              SCHEDULER_SETTINGS[self.variant])
        pipe.set_progress_bar_config(disable=True)
        # Samplers are swapped per batch, each built from these training settings (shift,
        # dynamic shifting), kept here untouched.
        remember_scheduler_config(pipe, scheduler_config)
        record_components(pipe, files)
        return pipe if device.type == "cpu" else pipe.to(device)

    def guidance(self, spec: RenderSpec) -> float:
        """The embedded guidance a render runs at; intake records the default in the spec."""
        default = self.defaults.guidance
        value = spec.extra.get("guidance", default)
        return float(value) if value is not None else 0.0

    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: torch.device,
                     progress: Progress | None = None) -> list[Image.Image]:
        first = specs[0]
        if first.cfg != 1.0:
            # Intake refuses this (FamilyDefaults.cfg_fixed); kept for specs from elsewhere.
            raise RenderError(f"{self.display_name} has no CFG scale (cfg = {first.cfg:g}): use "
                              "`guidance` for its distilled guidance, or `true_cfg` for real "
                              "classifier-free guidance with a negative prompt")
        options: dict[str, Any] = {}
        true_cfg = first.extra.get("true_cfg")
        if true_cfg is not None:
            # FluxPipeline runs real CFG only when a negative prompt is given; "" is one.
            options = {"true_cfg_scale": float(true_cfg)}
        if first.extra.get("hires"):
            from families.flux.hires import render_flux_hires

            return render_flux_hires(self, pipe, specs, options, progress)
        pipe.scheduler = make_scheduler(remember_scheduler_config(pipe), first.sampler,
                                        first.schedule, kind=self.sampler_kind)
        # CPU generators: the same seed gives the same noise on any device, and one generator
        # per render keeps each image independent of its batch.
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
        result = pipe(
            **self.prompt_conditioning(pipe, specs, negative=true_cfg is not None),
            guidance_scale=self.guidance(first),  # ignored by schnell's transformer
            num_inference_steps=first.steps,
            width=first.width,
            height=first.height,
            generator=generators,
            max_sequence_length=self.max_sequence_length,
            output_type="pil",
            callback_on_step_end=progress.callback if progress else None,
            **options,
        )
        return list(result.images)

    def prompt_conditioning(self, pipe: Any, specs: list[RenderSpec],
                            negative: bool) -> dict[str, Any]:
        """The pipeline's prompt keywords for a batch, in render order: `prompt` (and
        `negative_prompt` with `negative`, i.e. true CFG) as text when no prompt in the batch
        is weighted, otherwise `prompt_embeds` and `pooled_prompt_embeds` (and their
        `negative_*`), one row per render.

        Text goes to diffusers as the user wrote it, with A1111 escapes (`\\(`) resolved and
        BREAK read as a space: a prompt without any A1111 syntax renders exactly as it did
        before weighting existed. With weights in the batch, every distinct prompt is encoded
        alone, a weighted one through compel (`encode_weighted_flux`) and an unweighted one
        through the pipeline's own `encode_prompt`, so that a render's conditioning does not
        depend on which renders share its batch.
        """
        keys = [("prompt", [spec.prompt for spec in specs])]
        if negative:
            keys.append(("negative_prompt", [spec.negative_prompt for spec in specs]))
        parsed = {text: parse_prompt(text) for _, texts in keys for text in texts}
        if not any(p.weighted for p in parsed.values()):
            return {key: [parsed[text].stripped for text in texts] for key, texts in keys}
        weighted = [text for text, p in parsed.items() if p.weighted]
        embeds, pooled = encode_weighted_flux(pipe, [parsed[t] for t in weighted],
                                              self.max_sequence_length)
        rows = {text: (embeds[i:i + 1], pooled[i:i + 1]) for i, text in enumerate(weighted)}
        with torch.no_grad():
            for text, p in parsed.items():
                if text not in rows:
                    plain, plain_pooled, _ = pipe.encode_prompt(
                        prompt=[p.stripped], prompt_2=None, device=pipe._execution_device,
                        max_sequence_length=self.max_sequence_length)
                    rows[text] = (plain, plain_pooled)
        conditioning: dict[str, Any] = {}
        for key, texts in keys:
            prefix = "negative_" if key == "negative_prompt" else ""
            conditioning[f"{prefix}prompt_embeds"] = torch.cat([rows[t][0] for t in texts])
            conditioning[f"{prefix}pooled_prompt_embeds"] = torch.cat([rows[t][1] for t in texts])
        return conditioning

    def infotext_fields(self, spec: RenderSpec) -> list[tuple[str, object]]:
        # Forge writes "Distilled CFG Scale" beside "CFG scale: 1" for models with a guidance
        # input only; for schnell it writes nothing, since the value would do nothing.
        if not self.guidance_embeds:
            return quantization_fields(spec)
        return [("Distilled CFG Scale", self.guidance(spec)), *quantization_fields(spec)]


class FluxDevFamily(FluxFamily):
    name = "flux-dev"
    display_name = "FLUX.1 [dev]"
    variant = "dev"
    guidance_embeds = True
    max_sequence_length = 512
    # size_multiple 16: the VAE's factor 8 times the transformer's 2x2 latent packing.
    defaults = FamilyDefaults(width=1024, height=1024, steps=28, cfg=1.0, sampler="Euler",
                              schedule=None, size_multiple=16, guidance=3.5, cfg_fixed=1.0)

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        from families.flux.tiny import (
            build_tiny_flux_pipeline,
            build_tiny_flux_transformer,
            save_tiny_flux_folder,
            save_tiny_flux_transformer_fp8,
            save_tiny_flux_transformer_gguf,
            save_tiny_flux_transformer_single_file,
        )

        pipe = build_tiny_flux_pipeline("dev", seed=0)
        save_tiny_flux_folder(pipe, models_dir / DEMO_DEV)
        # A different transformer from the folder's, so that a render shows which was used.
        save_tiny_flux_transformer_single_file(
            build_tiny_flux_transformer("dev", seed=1), models_dir / f"{DEMO_DEV_BFL}.safetensors",
            metadata={"modelspec.architecture": "flux-1-dev", "modelspec.title": DEMO_DEV_BFL})
        # The folder's own transformer, quantized: renders comparable with the folder's.
        for quantization, name in DEMO_DEV_GGUF.items():
            save_tiny_flux_transformer_gguf(pipe.transformer, models_dir / f"{name}.gguf",
                                            quantization)
        save_tiny_flux_transformer_fp8(pipe.transformer, models_dir / f"{DEMO_DEV_FP8}.safetensors")
        quantized = [*DEMO_DEV_GGUF.values(), DEMO_DEV_FP8]
        jobs = {"flux-dev.toml": DEMO_JOB.format(name=DEMO_DEV, seed=5000, steps=3,
                                                 extra="guidance = 3.5\n"),
                "flux-dev-single-file.toml": DEMO_JOB.format(name=DEMO_DEV_BFL, seed=6000,
                                                             steps=3, extra="")}
        jobs.update({f"{name}.toml": DEMO_JOB.format(name=name, seed=5000, steps=3,
                                                     extra="guidance = 3.5\n")
                     for name in quantized})
        return DemoAssets(
            checkpoint_overrides={name: {"config": f"models/{DEMO_DEV}"}
                                  for name in (DEMO_DEV_BFL, *quantized)},
            jobs=jobs)


class FluxSchnellFamily(FluxFamily):
    name = "flux-schnell"
    display_name = "FLUX.1 [schnell]"
    variant = "schnell"
    guidance_embeds = False
    max_sequence_length = 256
    # guidance None: schnell has no guidance input, so a job's `guidance` is an error at
    # intake rather than a number that silently does nothing.
    defaults = FamilyDefaults(width=1024, height=1024, steps=4, cfg=1.0, sampler="Euler",
                              schedule=None, size_multiple=16, guidance=None, cfg_fixed=1.0)

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        from families.flux.tiny import build_tiny_flux_pipeline, save_tiny_flux_folder

        save_tiny_flux_folder(build_tiny_flux_pipeline("schnell", seed=0),
                              models_dir / DEMO_SCHNELL)
        return DemoAssets(jobs={"flux-schnell.toml": DEMO_JOB.format(
            name=DEMO_SCHNELL, seed=7000, steps=2, extra="")})


DEMO_DEV = "tiny-flux-dev"
DEMO_DEV_BFL = "tiny-flux-dev-bfl"
# tiny-flux-dev's transformer, quantized; the same job on each shows what quantization does.
DEMO_DEV_GGUF = {"Q8_0": "tiny-flux-dev-Q8_0", "Q4_0": "tiny-flux-dev-Q4_0"}
DEMO_DEV_FP8 = "tiny-flux-dev-fp8"
DEMO_SCHNELL = "tiny-flux-schnell"
DEMO_JOB = ('checkpoint = "{name}"\n'
            'prompt = "a lighthouse keeper reading by lamplight, rain on the window"\n'
            "seed = {seed}\ncount = 2\nsteps = {steps}\n{extra}width = 64\nheight = 64\n")


# --- single files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BflTransformerFacts:
    """What a BFL-layout Flux.1 transformer file says about itself, from its header."""

    guidance: bool
    double_blocks: int
    single_blocks: int
    width: int
    in_channels: int


def bfl_transformer_facts(header: SafetensorsHeader) -> BflTransformerFacts | None:
    """Facts about a Flux.1 transformer in the BFL layout, or None if the file is not one."""
    shapes = {key: info.shape for key, info in strip_bfl_prefix(header.tensors).items()}
    if not all(tell in shapes for tell in _SINGLE_FILE_TELLS):
        return None
    img_in = shapes.get("img_in.weight")
    if img_in is None or len(img_in) != 2:
        return None
    blocks = {kind: {int(m.group(1)) for key in shapes
                     if (m := re.match(rf"{kind}\.(\d+)\.", key))}
              for kind in ("double_blocks", "single_blocks")}
    return BflTransformerFacts(
        guidance=_GUIDANCE_KEY in shapes,
        double_blocks=len(blocks["double_blocks"]),
        single_blocks=len(blocks["single_blocks"]),
        width=img_in[0],
        in_channels=img_in[1],
    )


def load_bfl_transformer(path: Path, base: Path, dtype: torch.dtype, *, gguf: bool = False) -> Any:
    """A BFL-layout Flux.1 transformer file as a diffusers FluxTransformer2DModel, its config
    from the base folder's transformer/config.json, depth and guidance from the file itself.

    The keys are converted here (see families.flux.bfl for why not by diffusers) and the
    converted state dict goes through diffusers' single-file loader (meta-device init, dtype).
    A GGUF file (`gguf`) stays quantized (GGUFLinear layers computing in `dtype`); an FP8
    file keeps its float8 weights (Float8Linear layers computing in `dtype`).
    """
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    if gguf:
        state = load_gguf_state_dict(path)
    else:
        with safe_open(str(path), framework="pt") as handle:
            # Only the transformer's tensors: an all-in-one file also carries VAE and encoders.
            state = {key: handle.get_tensor(key) for key in handle.keys()
                     if is_transformer_key(key)}
    try:
        converted = bfl_to_diffusers(state)
    except BflLayoutError as exc:
        raise RenderError(f"{path.name}: {exc}") from exc
    shape = {"guidance_embeds": converted.guidance, "num_layers": converted.double_blocks,
             "num_single_layers": converted.single_blocks}
    if gguf:
        return load_gguf_model(FluxTransformer2DModel, converted.state_dict, base, "transformer",
                               dtype, path, **shape)
    if float8_dtype_of(converted.state_dict) is not None:
        return load_fp8_model(FluxTransformer2DModel, converted.state_dict, base, "transformer",
                              dtype, path, **shape)
    transformer = FluxTransformer2DModel.from_single_file(
        converted.state_dict, config=str(base), subfolder="transformer", dtype=dtype,
        local_files_only=True, guidance_embeds=converted.guidance,
        num_layers=converted.double_blocks, num_single_layers=converted.single_blocks)
    # diffusers leaves a weight the state dict lacks on the meta device without an error.
    missing = [name for name, tensor in (*transformer.named_parameters(),
                                         *transformer.named_buffers())
               if tensor.device.type == "meta"]
    if missing:
        raise RenderError(f"{path.name} lacks {len(missing)} transformer weights (e.g. "
                          f"{missing[0]}) for the config in {base}/transformer")
    return transformer


# --- LoRA recognition -----------------------------------------------------------------------

_PREFIXES = ("lora_unet_", "lora_transformer_", "model.diffusion_model.", "diffusion_model.",
             "transformer.")
_TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_", "text_encoder.",
                          "text_encoders.")
_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)"
                    r"_(\d+)_(.+)$")
# Module names inside a block (with "_" for "."), and how their output width relates to their
# input width: (out multiple, in multiple), i.e. out * in_multiple == in * out_multiple. The
# ratios are Flux.1's at any width (MLP ratio 4, GELU), so they also hold for tiny models.
_SQUARE = (1, 1)
_BFL_DOUBLE = {
    "img_attn_qkv": (3, 1), "txt_attn_qkv": (3, 1), "img_attn_proj": _SQUARE,
    "txt_attn_proj": _SQUARE, "img_mlp_0": (4, 1), "txt_mlp_0": (4, 1), "img_mlp_2": (1, 4),
    "txt_mlp_2": (1, 4), "img_mod_lin": (6, 1), "txt_mod_lin": (6, 1),
    # XLabs: q/k/v and output projection of the image (1) and text (2) streams
    "processor_qkv_lora1": (3, 1), "processor_qkv_lora2": (3, 1),
    "processor_proj_lora1": _SQUARE, "processor_proj_lora2": _SQUARE,
}
_BFL_SINGLE = {
    "linear1": (7, 1), "linear2": (1, 5), "modulation_lin": (3, 1),
    "processor_qkv_lora": (3, 1), "processor_proj_lora": _SQUARE,
}
_DIFFUSERS_DOUBLE = {
    **{f"attn_{name}": _SQUARE for name in (
        "to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_add_out")},
    "ff_net_0_proj": (4, 1), "ff_net_2": (1, 4), "ff_context_net_0_proj": (4, 1),
    "ff_context_net_2": (1, 4), "norm1_linear": (6, 1), "norm1_context_linear": (6, 1),
}
_DIFFUSERS_SINGLE = {
    "attn_to_q": _SQUARE, "attn_to_k": _SQUARE, "attn_to_v": _SQUARE, "proj_mlp": (4, 1),
    "proj_out": (1, 5), "norm_linear": (3, 1),
}
# Names HunyuanVideo spells differently (img_mlp_fc1, img_mod_linear, modulation_linear):
# with one of these the file cannot be a HunyuanVideo LoRA.
_FLUX_ONLY_BFL = {"img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2", "img_mod_lin",
                  "txt_mod_lin", "modulation_lin", "processor_qkv_lora1", "processor_qkv_lora2",
                  "processor_proj_lora1", "processor_proj_lora2", "processor_qkv_lora",
                  "processor_proj_lora"}
_TOP_LEVEL = {"img_in", "txt_in", "time_in_in_layer", "time_in_out_layer", "vector_in_in_layer",
              "vector_in_out_layer", "guidance_in_in_layer", "guidance_in_out_layer",
              "final_layer_linear", "final_layer_adaLN_modulation_1", "x_embedder",
              "context_embedder", "proj_out", "norm_out_linear",
              "time_text_embed_timestep_embedder_linear_1",
              "time_text_embed_timestep_embedder_linear_2",
              "time_text_embed_text_embedder_linear_1", "time_text_embed_text_embedder_linear_2",
              "time_text_embed_guidance_embedder_linear_1",
              "time_text_embed_guidance_embedder_linear_2"}
MAX_DOUBLE_BLOCK = 18  # Flux.1 has double blocks 0..18 (HunyuanVideo 0..19)
MAX_SINGLE_BLOCK = 37  # and single blocks 0..37 (HunyuanVideo 0..39)
FLUX1_WIDTH = 3072
# Widths of full-size models start far above any test model's; there, the width must be Flux.1's.
REAL_MODEL_MIN_WIDTH = 1024
_OTHER_MODELS_IN_METADATA = re.compile(r"flux[-_.]?2|klein|hunyuan|hyv|chroma|wan|sd3|qwen",
                                       re.IGNORECASE)
_FLUX1_IN_METADATA = re.compile(r"flux[-_.]?1|flux1", re.IGNORECASE)


def _lora_shapes(header: SafetensorsHeader) -> dict[str, tuple[int | None, int | None]]:
    """LoRA module -> (input width from the down matrix, output width from the up matrix)."""
    found: dict[str, list[int | None]] = {}
    suffixes = (((".lora_down.weight", ".lora_A.weight", ".down.weight"), 0, 1),
                ((".lora_up.weight", ".lora_B.weight", ".up.weight"), 1, 0))
    for key, info in header.tensors.items():
        if len(info.shape) != 2:
            continue
        for ends, slot, dim in suffixes:
            end = next((e for e in ends if key.endswith(e)), None)
            if end:
                found.setdefault(key[: -len(end)], [None, None])[slot] = info.shape[dim]
                break
    return {module: (pair[0], pair[1]) for module, pair in found.items()}


def _normalise(module: str) -> str | None:
    """A transformer module name without its layout prefix and with "_" for "."; None for
    text-encoder modules."""
    if module.startswith(_TEXT_ENCODER_PREFIXES):
        return None
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    return module.replace(".", "_")


def recognise_flux1_lora(header: SafetensorsHeader,
                         facts: LoraFacts) -> tuple[float, str] | None:
    """(score, reason) when the LoRA is for Flux.1, from key names, block indices, the shape
    ratios of Flux.1's modules and trainer metadata; None when anything says otherwise.

    Every transformer module must be one Flux.1 has, in one of the namings diffusers loads
    (kohya `lora_unet_double_blocks_0_img_attn_qkv`, `diffusion_model.double_blocks...`,
    XLabs `double_blocks.0.processor.qkv_lora1`, diffusers `transformer.transformer_blocks...`).
    Flux 2 (fused `to_qkv_mlp_proj`, shared modulation) and HunyuanVideo (`img_mlp_fc1`, blocks
    19 / 38 and up) fail that test. Names HunyuanVideo shares (qkv, proj, linear1/2 in kohya
    naming) and diffusers names (shared with HunyuanVideo and Chroma) score lower.
    """
    stated = [f"{key} = {header.metadata[key]!r}" for key in (
        "modelspec.architecture", "ss_base_model_version") if header.metadata.get(key)]
    metadata = " ".join(stated)
    if _OTHER_MODELS_IN_METADATA.search(metadata) and not _FLUX1_IN_METADATA.search(metadata):
        return None
    shapes = _lora_shapes(header)
    modules = set(facts.module_keys) | set(shapes)
    blocks: dict[str, set[int]] = {"double": set(), "single": set()}
    bfl_names = flux_only = 0
    text_encoder = t5 = False
    for module in sorted(modules):
        name = _normalise(module)
        if name is None:
            text_encoder = True
            t5 = t5 or module.startswith("lora_te2_") or ".t5xxl." in module
            continue
        if name in _TOP_LEVEL:
            continue
        match = _BLOCK.match(name)
        if match is None:
            return None  # a module Flux.1 does not have
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        double = kind in ("double_blocks", "transformer_blocks")
        bfl = kind in ("double_blocks", "single_blocks")
        table = {(True, True): _BFL_DOUBLE, (True, False): _BFL_SINGLE,
                 (False, True): _DIFFUSERS_DOUBLE, (False, False): _DIFFUSERS_SINGLE}[(bfl, double)]
        ratio = table.get(rest)
        if ratio is None:
            return None
        if index > (MAX_DOUBLE_BLOCK if double else MAX_SINGLE_BLOCK):
            return None  # deeper than Flux.1: HunyuanVideo or another model
        fan_in, fan_out = shapes.get(module, (None, None))
        if fan_in and fan_out and fan_out * ratio[1] != fan_in * ratio[0]:
            return None  # the right name at the wrong shape (Flux 2's SwiGLU MLP, ...)
        if fan_in and fan_in >= REAL_MODEL_MIN_WIDTH and fan_in != FLUX1_WIDTH and ratio[1] == 1:
            return None  # a full-size model of another width (Flux 2 9B/dev, SD3, ...)
        blocks["double" if double else "single"].add(index)
        if bfl:
            bfl_names += 1
            # BFL's dotted fused name counts too: HunyuanVideo's original layout writes
            # `img_attn_qkv`.
            if rest in _FLUX_ONLY_BFL or ".img_attn.qkv" in module or ".txt_attn.qkv" in module:
                flux_only += 1
    if not (blocks["double"] or blocks["single"]):
        return None
    if flux_only:
        score, naming = 0.8, "Flux.1 block names"
    elif bfl_names:
        score, naming = 0.6, "block names Flux.1 shares with HunyuanVideo"
    elif blocks["single"]:
        score, naming = 0.7, "diffusers Flux.1 names"
    else:
        score, naming = 0.5, "diffusers double-block names (also SD3 / HunyuanVideo-like)"
    if _FLUX1_IN_METADATA.search(metadata):
        score = max(score, 0.95)
        naming += f"; {', '.join(stated)}"
    extent = ", ".join(f"{kind} blocks {min(found)}..{max(found)}" if len(found) > 1 else
                       f"{kind} block {min(found)}" for kind, found in blocks.items() if found)
    reason = f"Flux.1 LoRA: {extent} ({naming})"
    if text_encoder:
        reason += "; patches CLIP-L too"
    if t5:
        reason += "; its T5 part is not applied (diffusers loads no T5 LoRA)"
    if facts.dora:
        reason += "; its DoRA magnitudes (dora_scale) are not applied (diffusers drops them)"
    return score, reason


# --- prompt weighting -----------------------------------------------------------------------


def encode_weighted_flux(pipe: Any, prompts: list[ParsedPrompt],
                         max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPipeline's `prompt_embeds` and `pooled_prompt_embeds` for A1111-weighted prompts
    through compel, one row per prompt, each encoded alone.

    T5 takes the weights. compel encodes each prompt's runs as one sequence of
    `max_sequence_length` tokens, truncated and padded as diffusers' own Flux encoding (for
    text without weights the result is diffusers' to the bit), and moves each weighted
    token's embedding away from the empty prompt's by its weight; a weight below 1 blends
    toward the prompt with that run masked out. compel's prompt structure is built from the
    parsed runs, never from compel's text syntax, so the user's text is not rewritten. Each run
    is tokenized on its own (`a (red:1.2), b` tokenizes `, b` alone), as A1111 does.

    BREAK: A1111's BREAK pads the current 75-token CLIP chunk and starts the next; T5 has no
    chunks, so the runs of all BREAK chunks are joined with a space (`keep_breaks=False`).

    The pooled CLIP-L embedding is that of the plain text, unweighted: a pooled output is one
    vector for the whole text, which compel does not weight.
    """
    from compel import Compel, ReturnedEmbeddingsType

    device = str(pipe._execution_device)
    tokenizer_2 = pipe.tokenizer_2
    if tokenizer_2.model_max_length < max_sequence_length:
        # compel also truncates each run at the tokenizer's own limit before joining them.
        tokenizer_2 = copy.copy(tokenizer_2)
        tokenizer_2.model_max_length = max_sequence_length
    # Built per batch, not cached: a LoRA set may patch CLIP-L, and compel caches the empty
    # prompt's encoding.
    t5 = Compel(tokenizer=tokenizer_2, text_encoder=pipe.text_encoder_2,
                truncate_long_prompts=True, model_max_length=max_sequence_length, device=device)
    clip = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                  returned_embeddings_type=ReturnedEmbeddingsType.POOLED,
                  truncate_long_prompts=True, device=device)
    with torch.no_grad():
        embeds = [t5.build_conditioning_tensor_for_conjunction(
            to_compel_conjunction(parsed, keep_breaks=False))[0] for parsed in prompts]
        pooled = [clip.conditioning_provider.get_pooled_embeddings([parsed.stripped],
                                                                   device=device)
                  for parsed in prompts]
    return (torch.cat(embeds).to(pipe._execution_device),
            torch.cat(pooled).to(pipe._execution_device, dtype=pipe.text_encoder.dtype))


# --- helpers --------------------------------------------------------------------------------


def _with_settings(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """`config` with `settings` set explicitly: a scheduler config lists the keys it left at
    their defaults in `_use_default_values`, and make_scheduler would drop them again."""
    defaults = [key for key in config.get("_use_default_values", []) if key not in settings]
    return {**config, **settings, "_use_default_values": defaults}


@hookimpl
def register_families(register: Any) -> None:
    register(FluxDevFamily())
    register(FluxSchnellFamily())
