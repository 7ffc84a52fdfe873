"""The FLUX.2 [klein] family: Black Forest Labs' 4B and 9B Flux 2 models with a Qwen3 text
encoder, as diffusers folders (`Flux2KleinPipeline`) or as a transformer-only single file
(the form BFL and ComfyUI distribute) next to a diffusers folder for the rest.

Two variants share one architecture and differ only in how they sample:

* distilled (the step-distilled release): 4 steps and no classifier-free guidance;
* base (the undistilled release): 50 steps, CFG 4.

diffusers tells them apart by `is_distilled` in model_index.json: with it set, the pipeline
never runs CFG whatever guidance scale it is given. The transformer weights have the same
shapes in both, so a single file's variant is a guess from its name (BFL names the base
`flux-2-klein-base-*.safetensors`).

The Qwen3 text encoder and the VAE may be files of their own, as ComfyUI users keep them
(models/text_encoders/qwen_3_4b.safetensors, models/vae/flux2-vae.safetensors), with a
diffusers config folder that then lacks their weights (families/shared/components.py).
diffusers 0.42 has no single-file loader for the Flux 2 VAE: a VAE file is taken only in
diffusers' own layout, and ComfyUI's original-layout flux2-vae.safetensors is refused (its
weights stay in vae/).

The transformer-only file may also be a quantized GGUF file (`flux-2-klein-4b-Q8_0.gguf`, BFL
key layout), loaded through diffusers' GGUF support with the same base folder, or an FP8
safetensors file (float8_e4m3fn weights, kept so in memory; see families/shared/quantized.py).

Model size (Klein 4B, hidden width 3072, or 9B, width 4096) is reported as the *lineage* of
checkpoints and LoRAs: a LoRA only loads into the size it was trained on, and the core's
lineage check then refuses a 9B LoRA on a 4B checkpoint at intake. Tiny test models have no
such size and no lineage.

Prompts are natural language (Qwen3 reads them through its chat template); there is no
negative prompt and no prompt weighting: A1111 weights are dropped from the text Qwen3 reads,
with a warning, and the prompt is recorded as written.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, TypeVar

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
    Progress,
    RenderError,
    RenderSpec,
    SafetensorsHeader,
    hookimpl,
    remember_scheduler_config,
    sampling_arguments,
    strip_explicit_weights,
    unweighted_notes,
)
from families.shared.components import (
    Component,
    assemble,
    component_problem,
    component_sources,
    missing_config_parts,
    record_components,
)

log = logging.getLogger(__name__)

KLEIN_PIPELINE = "Flux2KleinPipeline"
# The parts ComfyUI users keep as files of their own (models/text_encoders, models/vae).
KLEIN_COMPONENTS = (
    Component("text_encoder", "Qwen3 text encoder", "text_encoders"),  # qwen_3_4b.safetensors
    # flux2-vae.safetensors is in the original layout, which diffusers 0.42 cannot load: only
    # a file in diffusers' own layout fits (see families/shared/components.py).
    Component("vae", "Flux 2 VAE", "vae"),
)
DISTILLED, BASE = "distilled", "base"
VARIANTS = (DISTILLED, BASE)


def _klein_defaults(steps: int, cfg: float, cfg_fixed: float | None) -> FamilyDefaults:
    # Sides are multiples of 16: the VAE's factor 8 times the transformer's 2x2 patches.
    return FamilyDefaults(width=1024, height=1024, steps=steps, cfg=cfg, sampler="Euler",
                          schedule=None, size_multiple=16, cfg_fixed=cfg_fixed)


# The distilled model runs without CFG: a job's cfg there would be recorded but not applied.
VARIANT_DEFAULTS = {DISTILLED: _klein_defaults(4, 1.0, cfg_fixed=1.0),
                    BASE: _klein_defaults(50, 4.0, cfg_fixed=None)}

# Hidden width of the Flux 2 transformer -> model size. Flux.1 is also 3072 wide: width alone
# never says "Flux 2", it only names the size once the names or shapes have said so.
SIZES_BY_WIDTH = {3072: "klein-4b", 4096: "klein-9b", 6144: "dev"}
_SIZE_NAMES = {"klein-4b": "Klein 4B", "klein-9b": "Klein 9B", "dev": "FLUX.2 [dev]"}

# Key prefixes of transformer weights and LoRA modules, longest first.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
             "lora_transformer_", "lora_unet_")
_SEP = r"[._]"  # kohya names join module paths with "_", everyone else with "."

# Names only Flux 2 has: the fused single-block projection (diffusers), the SwiGLU MLP
# (diffusers), and the modulation shared by all blocks (both namings).
_FLUX2_NAMES = re.compile(
    rf"to{_SEP}qkv{_SEP}mlp{_SEP}proj$"
    rf"|(?:^|{_SEP})(?:double{_SEP}stream{_SEP}modulation{_SEP}(?:img|txt)"
    rf"|single{_SEP}stream{_SEP}modulation)(?:{_SEP}|$)"
    rf"|transformer{_SEP}blocks{_SEP}\d+{_SEP}ff(?:{_SEP}context)?{_SEP}linear{_SEP}(?:in|out)$"
)
# Names only Flux.1 (and HunyuanVideo, which shares its block names) has: per-block
# modulation, the pooled CLIP input, diffusers' Flux.1 single-block modules (separate q/k/v,
# proj_mlp, proj_out; Flux 2 fuses them) and its GELU MLP.
_FLUX1_NAMES = re.compile(
    rf"(?:^|{_SEP})(?:img|txt){_SEP}mod(?:{_SEP}|$)"
    rf"|single{_SEP}blocks{_SEP}\d+{_SEP}modulation"
    rf"|(?:^|{_SEP})vector{_SEP}in(?:{_SEP}|$)"
    rf"|norm1(?:{_SEP}context)?{_SEP}linear$"
    rf"|single{_SEP}transformer{_SEP}blocks{_SEP}\d+{_SEP}(?:proj{_SEP}mlp|norm{_SEP}linear"
    rf"|proj{_SEP}out)$"
    rf"|single{_SEP}transformer{_SEP}blocks{_SEP}\d+{_SEP}attn{_SEP}to{_SEP}[qkv]$"
    rf"|(?:^|{_SEP})ff(?:{_SEP}context)?{_SEP}net{_SEP}"
)
# Shape tells, as (pattern, which ratio, Flux 2 value, Flux.1 value). Flux 2's MLP is SwiGLU
# with ratio 3 (input projection 6x the width, output 3x); Flux.1's is GELU with ratio 4.
_SHAPE_TELLS = (
    (re.compile(rf"single{_SEP}blocks{_SEP}\d+{_SEP}linear1$"), "out/in", 9, 7),
    (re.compile(rf"single{_SEP}blocks{_SEP}\d+{_SEP}linear2$"), "in/out", 4, 5),
    (re.compile(rf"(?:img|txt){_SEP}mlp{_SEP}0$"), "out/in", 6, 4),
    (re.compile(rf"(?:img|txt){_SEP}mlp{_SEP}2$"), "in/out", 3, 4),
)
_DOUBLE_BLOCK_INDEX = re.compile(rf"(?:^|{_SEP})double{_SEP}blocks{_SEP}(\d+)(?:{_SEP}|$)")
MAX_FLUX2_DOUBLE_BLOCKS = 8  # Klein 4B has 5, 9B and dev 8; Flux.1 has 19
# Modules whose input is the transformer's hidden width (for the size).
_HIDDEN_INPUT = re.compile(
    rf"(?:qkv|to{_SEP}[qkv]|add{_SEP}[qkv]{_SEP}proj|linear1|to{_SEP}qkv{_SEP}mlp{_SEP}proj"
    rf"|mlp{_SEP}0|linear{_SEP}in|modulation{_SEP}(?:img|txt){_SEP}lin(?:ear)?"
    rf"|stream{_SEP}modulation{_SEP}lin(?:ear)?)$"
)
_DOWN = (".lora_down.weight", ".lora_A.weight")
_UP = (".lora_up.weight", ".lora_B.weight")

# Single-file transformer keys (after any prefix): Flux 2's shared modulation, either naming.
_SINGLE_FILE_TELLS = ("double_stream_modulation_img.lin.weight",
                      "double_stream_modulation_img.linear.weight")
_IMAGE_INPUT_KEYS = ("img_in.weight", "x_embedder.weight")
_GUIDANCE_PREFIXES = ("guidance_in.", "time_guidance_embed.guidance_embedder.")


class Flux2KleinFamily(Family):
    name = "flux2-klein"
    architecture = "flux2"
    display_name = "FLUX.2 [klein]"
    sampler_kind = "flow"
    # Qwen3 reads no weights: strip_explicit_weights text, and unweighted_notes says so.
    prompt_weighting = "stripped"
    supports_negative_prompt = False
    reads_gguf = True  # BFL-layout GGUF transformers, with a diffusers folder as the base
    component_files = tuple(c.name for c in KLEIN_COMPONENTS)  # qwen_3_4b, a diffusers VAE
    defaults = VARIANT_DEFAULTS[DISTILLED]  # the release most people run

    def defaults_for(self, variant: str | None) -> FamilyDefaults:
        return VARIANT_DEFAULTS.get(variant or DISTILLED, self.defaults)

    # -- recognition -----------------------------------------------------------------------

    def probe_checkpoint(self, source: CheckpointSource) -> CheckpointProbe | None:
        if source.kind == "folder":
            index = source.model_index or {}
            if index.get("_class_name") != KLEIN_PIPELINE:
                return None
            # diffusers' own default when the flag is missing is base (CFG on); follow it, so
            # that the variant shown is the one that runs.
            distilled = bool(index.get("is_distilled", False))
            width = _folder_width(source.path)
            return CheckpointProbe(
                family=self.name, score=0.9,
                reason=f"model_index.json: {KLEIN_PIPELINE} (is_distilled: "
                       f"{str(distilled).lower()})",
                lineage=SIZES_BY_WIDTH.get(width) if width else None,
                variant=DISTILLED if distilled else BASE)
        table = source.tensor_table()  # a .safetensors or .gguf file's tensors
        if table is None:
            return None
        keys = _transformer_keys(table.tensors)
        if not any(tell in keys for tell in _SINGLE_FILE_TELLS):
            return None
        if any(k.startswith(_GUIDANCE_PREFIXES) for k in keys):
            return None  # guidance-embedded Flux 2 is FLUX.2 [dev], not Klein
        width = next((keys[k].shape[0] for k in _IMAGE_INPUT_KEYS if k in keys), None)
        size = SIZES_BY_WIDTH.get(width) if width else None
        if size == "dev":
            return None
        variant, why = _single_file_variant(source)
        return CheckpointProbe(
            family=self.name, score=0.9,
            reason=f"Flux 2 transformer (shared double-stream modulation), width {width}; "
                   f"variant {variant}: {why}",
            lineage=size, variant=variant)

    def probe_lora(self, header: SafetensorsHeader, facts: LoraFacts) -> LoraProbe | None:
        """A Flux 2 LoRA, in any naming (diffusers, PEFT, ai-toolkit/BFL, kohya).

        Flux.1 LoRAs share Flux 2's block names in BFL and kohya naming (double_blocks,
        img_attn.qkv, single_blocks.N.linear1), so names alone claim only what Flux 2 alone
        has; otherwise the MLP shapes decide (SwiGLU ratio 3 vs Flux.1's GELU ratio 4).
        Anything with a Flux.1 trait is left alone, and so is an attention-only file at
        width 3072 with no other tell: it could be either, and a wrong claim would let a
        Flux.1 LoRA through to a Klein render.
        """
        modules = _lora_modules(header)
        names = {_strip_prefix(m) for m in modules} | {_strip_prefix(m) for m in facts.module_keys}
        flux2: list[str] = []
        flux1: list[str] = []
        for name in sorted(names):
            if _FLUX2_NAMES.search(name):
                flux2.append(f"Flux 2 module {name}")
            if _FLUX1_NAMES.search(name):
                flux1.append(f"Flux.1 module {name}")
            if (m := _DOUBLE_BLOCK_INDEX.search(name)) and int(m.group(1)) >= (
                    MAX_FLUX2_DOUBLE_BLOCKS):
                flux1.append(f"double block {m.group(1)} (Flux 2 has at most 8)")
        for module, (fan_in, fan_out) in sorted(modules.items()):
            name = _strip_prefix(module)
            for pattern, kind, flux2_ratio, flux1_ratio in _SHAPE_TELLS:
                if not pattern.search(name) or not fan_in or not fan_out:
                    continue
                ratio = fan_out / fan_in if kind == "out/in" else fan_in / fan_out
                if ratio == flux2_ratio:
                    flux2.append(f"{name} {kind} = {flux2_ratio} (Flux 2 SwiGLU MLP)")
                elif ratio == flux1_ratio:
                    flux1.append(f"{name} {kind} = {flux1_ratio} (Flux.1 MLP)")
        width = _hidden_width(modules)
        size = SIZES_BY_WIDTH.get(width) if width else None
        if not flux2 and size in ("klein-9b", "dev") and _has_flux_blocks(names):
            flux2.append(f"Flux-style blocks at width {width}, which no Flux.1 model has")
        if not flux2:
            flux2 += _metadata_tells(header.metadata, flux1)
        if flux1 or not flux2:
            return None
        if size == "dev":
            return LoraProbe(
                family=self.name, architecture=self.architecture, score=0.5,
                reason=f"FLUX.2 [dev] LoRA (width {width}): {flux2[0]}; it fits no Klein model",
                lineage=size, lineage_source=f"hidden width {width}", variant=size)
        return LoraProbe(
            family=self.name, architecture=self.architecture, score=0.9,
            reason=f"Flux 2: {flux2[0]}",
            lineage=size,
            lineage_source=(f"hidden width {width} ({_SIZE_NAMES[size]})" if size else
                            f"hidden width {width}, not a released Klein size"),
            variant=size)

    def lora_fits(self, lora_variant: str | None, checkpoint_variant: str | None) -> str | None:
        # A LoRA's variant is its model size; Klein's checkpoint variants (distilled, base)
        # share shapes, so base-trained LoRAs load into the distilled model and back. Klein
        # 4B vs 9B is the lineage check's job (both sides know their size there).
        if lora_variant == "dev":
            return ("it is a FLUX.2 [dev] LoRA (hidden width 6144); FLUX.2 [klein] is 3072 "
                    "(4B) or 4096 (9B) wide")
        return None

    def load_lora(self, pipe: Any, path: Path, adapter_name: str, lora: LoraUse) -> None:
        pipe.load_lora_weights(lora_for_diffusers(path), adapter_name=adapter_name)

    def lora_strengths(self, lora: LoraUse) -> dict[str, float]:
        # Klein LoRAs patch the transformer only; diffusers' Flux 2 loader has no text
        # encoder component, so a text-encoder weight has nothing to act on.
        return {"transformer": lora.strength}

    def component_sources(self, checkpoint: LoadedCheckpoint) -> dict[str, Path]:
        return component_sources(checkpoint, KLEIN_COMPONENTS)

    def missing_requirements(self, checkpoint: LoadedCheckpoint) -> str | None:
        if checkpoint.kind not in ("single_file", "gguf"):
            # Its own weights, unless a component file is named for it.
            if not checkpoint.components:
                return None
            return component_problem(checkpoint, checkpoint.path, KLEIN_COMPONENTS)
        where = f"[checkpoints.{checkpoint.name}] config"
        if checkpoint.config_path is None:
            return (f"{checkpoint.name!r} is a FLUX.2 [klein] transformer alone; the Qwen3 text "
                    "encoder, VAE and tokenizer come from a diffusers Klein folder of the same "
                    f'size (lorafarm never downloads one): set {where} = "path/to/klein-folder" '
                    "in config.toml. The folder's transformer weights are not needed, nor its "
                    "text encoder weights where the Qwen3 encoder is a file of its own "
                    "(ComfyUI's qwen_3_4b.safetensors: text_encoder in the same table, or found "
                    "in the ComfyUI trees of paths.comfyui)")
        folder = checkpoint.config_path
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            return (f"the config folder {folder} for {checkpoint.name!r} has no "
                    f"model_index.json; point {where} at a diffusers FLUX.2 [klein] folder")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("_class_name") != KLEIN_PIPELINE:
            return (f"the config folder {folder} for {checkpoint.name!r} is a "
                    f"{index.get('_class_name')}, not a {KLEIN_PIPELINE}; point {where} at a "
                    "diffusers FLUX.2 [klein] folder")
        if not (folder / "transformer" / "config.json").is_file():
            return (f"the config folder {folder} has no transformer/config.json, which "
                    f"{checkpoint.name!r} needs to be built")
        problem = component_problem(checkpoint, folder, KLEIN_COMPONENTS)
        if problem:
            return problem
        return missing_config_parts(folder, checkpoint.name, ("tokenizer", "scheduler"))

    def apply_conventions(self, prompt: str, negative_prompt: str | None,
                          enabled: bool) -> tuple[str, str, list[str]]:
        """No prompt conventions; nothing weights a Qwen3 encoder, so A1111 weights are
        dropped at render time, with a warning here. The prompt is kept as written."""
        prompt, negative, notes = super().apply_conventions(prompt, negative_prompt, enabled)
        return prompt, negative, [*notes, *unweighted_notes(self.display_name, prompt, negative)]

    # -- loading and rendering -------------------------------------------------------------

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> Any:
        from diffusers import Flux2KleinPipeline

        self.require_loadable(checkpoint)
        # Klein and its Qwen3 encoder ship in bfloat16 and diffusers runs them so; float16
        # risks the overflow Flux.1 is known for. Not measured on real Klein weights here.
        dtype = self.bfloat16_for_float16(dtype)
        # Qwen3 and the VAE kept as files of their own (ComfyUI's qwen_3_4b, a diffusers VAE).
        base, files, parts = assemble(checkpoint, KLEIN_COMPONENTS, dtype)
        if checkpoint.kind == "folder":
            pipe = Flux2KleinPipeline.from_pretrained(checkpoint.path, dtype=dtype,
                                                      local_files_only=True, **parts)
        else:
            transformer = _load_single_file_transformer(checkpoint, dtype)
            # The folder lends everything but the transformer; the variant is the single
            # file's own, whatever the folder's model_index.json says.
            pipe = Flux2KleinPipeline.from_pretrained(
                base, transformer=transformer, dtype=dtype, local_files_only=True,
                is_distilled=checkpoint.variant != BASE, **parts)
        pipe.set_progress_bar_config(disable=True)
        record_components(pipe, files)
        # Samplers are swapped per batch, each built from the checkpoint's own training
        # settings (shift, dynamic shifting), kept here untouched.
        remember_scheduler_config(pipe)
        return pipe if device.type == "cpu" else pipe.to(device)

    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: torch.device,
                     progress: Progress | None = None) -> list[Image.Image]:
        first = specs[0]
        # A distilled pipeline never runs CFG; it only warns about a scale above 1 on every
        # call. The base variant runs real CFG against the empty prompt at spec.cfg.
        guidance = 1.0 if pipe.config.is_distilled else first.cfg
        result = pipe(
            # keyword: the first positional is `image`; A1111 weights read as plain text
            prompt=[strip_explicit_weights(spec.prompt)[0] for spec in specs],
            guidance_scale=guidance,
            width=first.width,
            height=first.height,
            output_type="pil",
            # The job's sampler and steps, one CPU generator per render, the step callback.
            **sampling_arguments(pipe, specs, progress, self.sampler_kind),
        )
        return list(result.images)

    # -- demo ------------------------------------------------------------------------------

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        from families.flux2_klein.tiny import build_tiny_klein_pipeline, save_tiny_klein_folder

        save_tiny_klein_folder(build_tiny_klein_pipeline(seed=0, distilled=True),
                               models_dir / DEMO_DISTILLED)
        save_tiny_klein_folder(build_tiny_klein_pipeline(seed=1, distilled=False),
                               models_dir / DEMO_BASE)
        job = ('checkpoint = "{name}"\n'
               'prompt = "a paper lantern floating over a misty lake at dawn"\n'
               "seed = {seed}\ncount = 2\nsteps = {steps}\n{cfg}width = 64\nheight = 64\n")
        return DemoAssets(jobs={
            "flux2-klein.toml": job.format(name=DEMO_DISTILLED, seed=3000, steps=4, cfg=""),
            "flux2-klein-base.toml": job.format(name=DEMO_BASE, seed=4000, steps=4,
                                                cfg="cfg = 4.0\n"),
        })


DEMO_DISTILLED = "tiny-flux2-klein"
DEMO_BASE = "tiny-flux2-klein-base"


# --- helpers --------------------------------------------------------------------------------


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


T = TypeVar("T")


def _transformer_keys(tensors: dict[str, T]) -> dict[str, T]:
    """A single file's transformer keys without ComfyUI's or a trainer's prefix. A file with
    `model.diffusion_model.` keys may also hold other components: only those keys count."""
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        inner = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if inner:
            return inner
    return dict(tensors)


def _folder_width(folder: Path) -> int | None:
    """Hidden width of a diffusers folder's transformer, from its config (no weights)."""
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text("utf-8"))
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _single_file_variant(source: CheckpointSource) -> tuple[str, str]:
    """(variant, why) for a transformer file: the weights cannot tell base from distilled."""
    stated = source.metadata.get("lorafarm.variant", "").strip().lower()
    if stated in VARIANTS:
        return stated, "lorafarm.variant metadata"
    if re.search(r"(?:^|[-_. ])base(?:$|[-_. ])", source.path.stem, re.IGNORECASE):
        return BASE, f"'base' in the file name {source.path.name!r}"
    return DISTILLED, (f"no 'base' in the file name {source.path.name!r} (BFL names the "
                       "undistilled release flux-2-klein-base-*)")


def _lora_modules(header: SafetensorsHeader) -> dict[str, tuple[int | None, int | None]]:
    """Module -> (input width, output width) from the lora_down/A and lora_up/B shapes."""
    found: dict[str, list[int | None]] = {}
    for key, info in header.tensors.items():
        if len(info.shape) != 2:
            continue
        for suffixes, slot, dim in ((_DOWN, 0, 1), (_UP, 1, 0)):
            for suffix in suffixes:
                if key.endswith(suffix):
                    found.setdefault(key[: -len(suffix)], [None, None])[slot] = info.shape[dim]
    return {module: (pair[0], pair[1]) for module, pair in found.items()}


def _hidden_width(modules: dict[str, tuple[int | None, int | None]]) -> int | None:
    widths = Counter(fan_in for module, (fan_in, _) in modules.items()
                     if fan_in and _HIDDEN_INPUT.search(_strip_prefix(module)))
    return widths.most_common(1)[0][0] if widths else None


def _has_flux_blocks(names: set[str]) -> bool:
    return any(re.match(rf"(?:double{_SEP}blocks|single{_SEP}blocks|transformer{_SEP}blocks"
                        rf"|single{_SEP}transformer{_SEP}blocks){_SEP}\d+", name)
               for name in names)


def _metadata_tells(metadata: dict[str, str], flux1: list[str]) -> list[str]:
    """Trainer metadata naming the model, for files whose keys could be Flux.1 or Flux 2."""
    found: list[str] = []
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key, "").lower()
        if re.search(r"flux[-_.]?2|klein", value):
            found.append(f"{key} = {metadata[key]!r}")
        elif re.search(r"flux[-_.]?1", value):
            flux1.append(f"{key} = {metadata[key]!r}")
    return found


# --- LoRA files diffusers 0.42 loads wrongly, partly or not at all --------------------------

# kohya module -> diffusers module for what diffusers' kohya converter for Flux 2 drops with
# only a log warning (it converts block attention and MLPs, img_in, txt_in, time_in and
# final_layer.linear).
_KOHYA_DROPPED = {
    "lora_unet_double_stream_modulation_img_lin": "double_stream_modulation_img.linear",
    "lora_unet_double_stream_modulation_txt_lin": "double_stream_modulation_txt.linear",
    "lora_unet_single_stream_modulation_lin": "single_stream_modulation.linear",
    "lora_unet_final_layer_adaLN_modulation_1": "norm_out.linear",
}
_BFL_ADALN = "final_layer.adaLN_modulation.1"
_LORA_SUFFIXES = {".lora_down.weight": "down", ".lora_A.weight": "down",
                  ".lora_up.weight": "up", ".lora_B.weight": "up", ".alpha": "alpha"}
# Raw PEFT keys in diffusers naming that diffusers' ai-toolkit converter (where it sends raw
# PEFT files) does not accept: only block modules pass through it.
_DIFFUSERS_TOP_LEVEL = ("x_embedder.", "context_embedder.", "time_guidance_embed.",
                        "double_stream_modulation_", "single_stream_modulation.", "norm_out.",
                        "proj_out.")


def lora_for_diffusers(path: Path) -> str | dict[str, torch.Tensor]:
    """What to hand `load_lora_weights` for a Flux 2 LoRA file: the path itself where
    diffusers 0.42 loads the file fully and correctly, else its tensors adjusted so it does.

    Adjusted, each only where needed (measured on the tiny model):
    * BFL names with kohya suffixes (`diffusion_model.*.lora_down.weight`, ComfyUI's save
      format): diffusers sends them to its kohya converter, which knows only `lora_unet_`
      names, and loads nothing. Renamed to lora_A/lora_B.
    * BFL names with `.alpha` keys: the ai-toolkit converter refuses them. Alpha / rank is
      folded into lora_B.
    * ComfyUI's `model.diffusion_model.` prefix: the converter expects `diffusion_model.`.
    * The final adaLN projection in BFL naming: BFL orders its output (shift, scale), diffusers
      (scale, shift); the converters swap the halves for checkpoints but not for LoRAs, which
      then modulate with shift and scale exchanged. lora_B's halves are swapped here.
    * kohya files with the shared modulation or final adaLN modules: the kohya converter drops
      them. The rest goes through diffusers' converter, those modules are added in diffusers
      naming.
    * Raw PEFT files with non-block diffusers names (x_embedder, modulation, ...): the
      converter raises. Loaded under diffusers' `transformer.` prefix instead.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        if any(k.startswith("lora_unet_") for k in keys):
            if not any(k.split(".", 1)[0] in _KOHYA_DROPPED for k in keys):
                return str(path)
            tensors = {key: handle.get_tensor(key) for key in keys}
            return _kohya_with_dropped_modules(tensors)
        original = [k for k in keys if k.startswith(("diffusion_model.",
                                                     "model.diffusion_model."))]
        if original:
            needs_work = any(k.startswith("model.") or k.endswith((".lora_down.weight",
                             ".alpha")) or f".{_BFL_ADALN}." in k for k in original)
            if not needs_work:
                return str(path)
            return _original_for_diffusers({key: handle.get_tensor(key) for key in keys})
        peft = [k.removeprefix("base_model.model.") for k in keys
                if k.startswith("base_model.model.")]
        if peft and any(k.startswith(_DIFFUSERS_TOP_LEVEL) for k in peft):
            return {f"transformer.{k.removeprefix('base_model.model.')}": handle.get_tensor(k)
                    for k in keys}
    return str(path)


def _lora_pairs(tensors: dict[str, torch.Tensor], prefix: str
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Module (without `prefix`) -> {"down", "up", "alpha"} tensors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        for suffix, part in _LORA_SUFFIXES.items():
            if key.endswith(suffix):
                modules.setdefault(key[len(prefix):-len(suffix)], {})[part] = tensor
                break
    return modules


def _scaled_pair(parts: dict[str, torch.Tensor], swap_halves: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    down, up = parts["down"], parts["up"]
    scaled = up.float()
    if "alpha" in parts:  # kohya semantics: update = alpha / rank * up @ down
        scaled = scaled * (float(parts["alpha"]) / down.shape[0])
    if swap_halves:
        first, second = scaled.chunk(2, dim=0)
        scaled = torch.cat([second, first], dim=0)
    return down, scaled.to(up.dtype)


def _original_for_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bare = {k.removeprefix("model.").removeprefix("diffusion_model."): v
            for k, v in tensors.items() if k.startswith(("diffusion_model.",
                                                         "model.diffusion_model."))}
    out: dict[str, torch.Tensor] = {}
    for module, parts in _lora_pairs(bare, "").items():
        down, up = _scaled_pair(parts, swap_halves=module == _BFL_ADALN)
        out[f"diffusion_model.{module}.lora_A.weight"] = down
        out[f"diffusion_model.{module}.lora_B.weight"] = up
    return out


def _kohya_with_dropped_modules(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers import Flux2KleinPipeline

    dropped = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in _KOHYA_DROPPED}
    rest = {k: v for k, v in tensors.items() if k not in dropped}
    out: dict[str, torch.Tensor] = {}
    if rest:
        out.update(Flux2KleinPipeline.lora_state_dict(rest))
    for module, parts in _lora_pairs(dropped, "").items():
        target = _KOHYA_DROPPED[module]
        down, up = _scaled_pair(parts, swap_halves=target == "norm_out.linear")
        out[f"transformer.{target}.lora_A.weight"] = down
        out[f"transformer.{target}.lora_B.weight"] = up
    return out


def _load_single_file_transformer(checkpoint: LoadedCheckpoint, dtype: torch.dtype) -> Any:
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers,
    )
    from safetensors.torch import load_file

    from families.shared.quantized import (
        float8_dtype_of,
        load_fp8_model,
        load_gguf_model,
        load_gguf_state_dict,
    )

    assert checkpoint.config_path is not None  # checked by missing_requirements
    if checkpoint.kind == "gguf":
        # diffusers' Flux 2 converter only renames and splits along rows, which quantized
        # (row-blocked) tensors allow: the GGUF tensors go through it as they are.
        return load_gguf_model(Flux2Transformer2DModel, load_gguf_state_dict(checkpoint.path),
                               checkpoint.config_path, "transformer", dtype, checkpoint.path)
    # Loaded here rather than by path so that a ComfyUI prefix can be stripped first;
    # diffusers' converter knows BFL's and its own names only.
    state = _transformer_keys(load_file(str(checkpoint.path)))
    if float8_dtype_of(state) is not None:
        converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
        return load_fp8_model(Flux2Transformer2DModel, converted, checkpoint.config_path,
                              "transformer", dtype, checkpoint.path)
    transformer = Flux2Transformer2DModel.from_single_file(
        state, config=str(checkpoint.config_path), subfolder="transformer", dtype=dtype,
        local_files_only=True)
    # diffusers leaves a weight the file lacks on the meta device without an error; such a
    # model would fail obscurely mid-render, or not at all and draw noise.
    missing = [name for name, tensor in (*transformer.named_parameters(),
                                         *transformer.named_buffers())
               if tensor.device.type == "meta"]
    if missing:
        raise RenderError(
            f"{checkpoint.path.name} lacks {len(missing)} transformer weights (e.g. "
            f"{missing[0]}): it is not a complete FLUX.2 [klein] transformer of the size of "
            f"the config folder {checkpoint.config_path}")
    return transformer


@hookimpl
def register_families(register: Any) -> None:
    register(Flux2KleinFamily())
