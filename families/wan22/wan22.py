"""The Wan 2.2 family: Alibaba's open video models as diffusers folders.

Three releases, told apart by model_index.json and the component configs (no weights read):

* T2V-A14B (`WanPipeline`): two 14B experts, `transformer` for high noise and
  `transformer_2` for low noise, switched where the timestep falls below
  `boundary_ratio * 1000` (0.875);
* I2V-A14B (`WanImageToVideoPipeline`): the same pair with 36 input channels (noise,
  first-frame mask, image latents), boundary 0.9, and no CLIP image encoder (Wan 2.1 I2V's);
* TI2V-5B (`WanPipeline`, `expand_timesteps=True`): one 5B transformer on the Wan 2.2 VAE
  (48 latent channels, 16x spatial compression). It renders text-to-video, and
  image-to-video when a job gives an image: diffusers does that in
  `WanImageToVideoPipeline` (its `expand_timesteps` branch keeps the first frame's latents and
  gives them timestep 0), built here from the loaded components.

Each expert has its own guidance scale: the job's `cfg` drives the high-noise expert and
`guidance_2` the low-noise one. `flow_shift` reshapes the flow UniPC sigmas.

Quantized GGUF transformers (city96's / QuantStack's `wan2.2_t2v_high_noise_14B_Q8_0.gguf`,
original key layout) load too, with a diffusers folder of the same release as their base for
UMT5, VAE, tokenizer, scheduler and configs. An A14B release is two GGUF files, one per expert;
the pair is declared in the HIGH-noise file's sidecar (NAME.toml beside it) or in config.toml's
`[checkpoints.NAME]`, which names the LOW-noise file; that file is then part of this
checkpoint, not one of its own:

    # wan2.2_t2v_high_noise_14B_Q8_0.toml
    config = "Wan2.2-T2V-A14B-Diffusers"
    transformer_2 = "wan2.2_t2v_low_noise_14B_Q8_0.gguf"

TI2V-5B is one GGUF file with `config` alone. The release (and its defaults) comes from the
file's shapes, or for sizes no release has (tiny test models) from the base folder.

The UMT5 encoder and the VAE may be files of their own, as ComfyUI users keep them
(models/text_encoders/umt5_xxl_fp16.safetensors, models/vae/wan_2.1_vae.safetensors): named
with `text_encoder` / `vae` in the sidecar or config.toml, or paired from the ComfyUI trees
when the base folder lacks their weights (families/shared/components.py). The base folder then
needs no weights. diffusers 0.42 converts the Wan 2.1 VAE's original layout (the A14B
releases') but not the Wan 2.2 VAE's (TI2V-5B): that one stays in the base folder.

LoRAs: Wan 2.2 A14B LoRAs come per expert, often as a HIGH and a LOW file. A LoRA's `expert`
(job `[[loras]] expert`, sidecar, or guessed from the file name) decides where it loads:
`high` into `transformer`, `low` into `transformer_2` (diffusers' `load_into_transformer_2`),
`both` (or unknown) into each. A 14B LoRA does not fit the 5B model and the reverse; the width
of the LoRA's matrices says which (5120 = 14B, 3072 = 5B, 1536 = Wan 2.1 1.3B).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageOps

from daemon.plugin_api import (
    CheckpointProbe,
    CheckpointSource,
    DemoAssets,
    Family,
    FamilyDefaults,
    GgufError,
    LoadedCheckpoint,
    LoraFacts,
    LoraProbe,
    LoraUse,
    RenderedVideo,
    RenderError,
    RenderSpec,
    SafetensorsHeader,
    cpu_generators,
    hookimpl,
    job_scheduler,
    pipeline_facts,
    quantization_fields,
    read_gguf_header,
    read_json_object,
    remember_scheduler_config,
    step_callback,
    strip_explicit_weights,
    unweighted_notes,
)
from families.shared.components import (
    Component,
    choose_components,
    component_problem,
    component_sources,
    load_components,
    missing_config_parts,
    record_components,
)
from families.wan22.variants import I2V_A14B, T2V_A14B, TI2V_5B, VARIANT_SETTINGS

if TYPE_CHECKING:
    from daemon.plugin_api import Progress

log = logging.getLogger(__name__)

# The TI2V-5B pipeline's image-to-video view (sharing its parts), built once per pipeline
# and kept in its pipeline_facts extras.
IMAGE_VIEW = "wan22.image_view"

VARIANTS = (T2V_A14B, I2V_A14B, TI2V_5B)
WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
# The parts ComfyUI users keep as files of their own (models/text_encoders, models/vae). The
# Wan 2.1 VAE file (A14B) converts; the Wan 2.2 VAE (TI2V-5B) does not in diffusers 0.42, so
# its weights stay in the base folder.
WAN_COMPONENTS = (
    Component("text_encoder", "UMT5-XXL encoder", "text_encoders"),  # umt5_xxl_fp16.safetensors
    Component("vae", "Wan VAE", "vae"),  # wan_2.1_vae.safetensors
)

# LoRA model sizes, from the width of the transformer they patch.
SIZE_BY_WIDTH = {5120: "14b", 3072: "5b", 1536: "1.3b"}
SIZE_TITLES = {"14b": "Wan 14B (2.1 or 2.2 A14B)", "5b": "Wan 2.2 TI2V-5B",
               "1.3b": "Wan 2.1 1.3B"}
VARIANTS_BY_SIZE = {"14b": (T2V_A14B, I2V_A14B), "5b": (TI2V_5B,), "1.3b": ()}
# Model size words in header metadata (modelspec.architecture and training model names),
# for LoRAs whose width is not a real one (tiny test files) or to confirm it.
_SIZE_WORDS = (("5b", re.compile(r"ti2v|(?<![\d.])5b", re.IGNORECASE)),
               ("1.3b", re.compile(r"1[._]3b", re.IGNORECASE)),
               ("14b", re.compile(r"a?14b", re.IGNORECASE)))
_SIZE_METADATA_KEYS = ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name")

# LoRA module names (facts.module_keys, suffixes already removed) per layout. The ten block
# linears: self/cross attention q, k, v, o and the feed-forward halves; k_img / v_img are the
# image cross-attention of Wan 2.1 I2V (its diffusers name: add_k_proj / add_v_proj).
_ORIGINAL = re.compile(r"^(?:model\.)?(?:diffusion_model\.)?blocks\.(\d+)\."
                       r"(?:(?:self_attn|cross_attn)\.(?:q|k|v|o|k_img|v_img)|ffn\.[02])$")
_MUSUBI = re.compile(r"^lora_unet_blocks_(\d+)_"
                     r"(?:(?:self_attn|cross_attn)_(?:q|k|v|o|k_img|v_img)|ffn_[02])$")
_DIFFUSERS = re.compile(r"^(transformer|base_model\.model)\.blocks\.(\d+)\."
                        r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)"
                        r"|ffn\.net\.(?:0\.proj|2))$")
_SELF_ATTN_Q = re.compile(r"(?:self_attn[._]q|attn1\.to_q)$")
_WAN21_IMAGE_ATTN = re.compile(r"(?:k_img|v_img|add_k_proj|add_v_proj)$")
_DOWN = (".lora_down.weight", ".lora_A.weight")
_UP = (".lora_up.weight", ".lora_B.weight")
# Expert words in LoRA file names: "..._HIGH.safetensors", "high_noise_model", "HighNoise",
# "-low-noise". A bare high/low must stand alone between separators.
_EXPERT_WORDS = {
    "high": re.compile(r"(?:^|[^a-z0-9])high(?:[_\-. ]?noise)?(?=$|[^a-z0-9])", re.IGNORECASE),
    "low": re.compile(r"(?:^|[^a-z0-9])low(?:[_\-. ]?noise)?(?=$|[^a-z0-9])", re.IGNORECASE),
}
_EXPERT_METADATA_KEYS = ("ss_output_name", "modelspec.title")
# A HIGH/LOW pair shares its name but for the expert word: the word and its separator.
_PAIR_WORD = re.compile(r"(?:[_\-. ]?)(?<![a-z0-9])(high|low)(?:[_\-. ]?noise)?(?![a-z0-9])",
                        re.IGNORECASE)

# diffusers and PEFT build models under accelerate's `init_empty_weights`, which patches
# torch.nn.Module for the whole process, not one thread: two loads at once (the worker
# prefetches the next checkpoint while the current one loads or takes LoRAs) leave weights on
# the meta device. Wan loads and LoRA loads therefore take turns. (A process-wide lock in the
# core would also cover other families; see the family's report.)
_LOADING = threading.Lock()

# Single original-layout transformer files (ComfyUI's split files, the official release's
# shards): block names plus the 3-D patch embedding.
_SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


class Wan22Family(Family):
    name = "wan22"
    architecture = "wan"
    display_name = "Wan 2.2"
    sampler_kind = "flow"
    # UMT5 reads no weights: strip_explicit_weights text, and unweighted_notes says so.
    prompt_weighting = "stripped"
    produces = "video"
    takes_image = True
    reads_gguf = True  # original-layout GGUF experts, with a diffusers folder as the base
    component_files = tuple(c.name for c in WAN_COMPONENTS)  # ComfyUI umt5_xxl, wan_2.1_vae
    defaults = VARIANT_SETTINGS[T2V_A14B].defaults

    def defaults_for(self, variant: str | None) -> FamilyDefaults:
        settings = VARIANT_SETTINGS.get(variant or "")
        return settings.defaults if settings else self.defaults

    def image_input(self, variant: str | None) -> str:
        """Whether a job for this release gives a first frame: "required" (I2V-A14B),
        "optional" (TI2V-5B) or "none" (T2V-A14B). For the core to check at intake; until it
        does, render_batch fails such a job with the same message."""
        settings = VARIANT_SETTINGS.get(variant or "")
        return settings.image if settings else "optional"

    def size_for_image(self, variant: str | None, image_width: int,
                       image_height: int) -> tuple[int, int]:
        """The render size for a job that gives an image but no width/height: the default
        area (832x480, 1280x704) at the image's aspect ratio, in multiples of the size step,
        as the official image-to-video scripts size their videos."""
        d = self.defaults_for(variant)
        area, step = d.width * d.height, d.size_multiple
        aspect = image_width / image_height
        width = max(step, round(math.sqrt(area * aspect) / step) * step)
        height = max(step, round(math.sqrt(area / aspect) / step) * step)
        return width, height

    # -- recognition -----------------------------------------------------------------------

    def probe_checkpoint(self, source: CheckpointSource) -> CheckpointProbe | None:
        if source.kind == "folder":
            return self._probe_folder(source)
        table = source.tensor_table()  # a .safetensors or .gguf file's tensors
        if table is None:
            return None
        probe = self._probe_single_file(table)
        if probe is None or source.kind != "gguf":
            return probe
        return self._probe_gguf(source, probe)

    def _probe_gguf(self, source: CheckpointSource, probe: CheckpointProbe) -> CheckpointProbe:
        """A GGUF expert: the release from its shapes, else from the base folder's
        model_index.json (tiny test sizes match no release)."""
        variant, notes = probe.variant, [probe.reason.replace("original-layout single file",
                                                              "GGUF file")]
        if variant is None and source.config_path is not None:
            try:
                base = self._probe_folder(CheckpointSource.for_folder("base",
                                                                      source.config_path))
            except (OSError, ValueError):
                base = None
            if base is not None:
                variant = base.variant
                notes.append(f"release from the base folder {source.config_path.name}: "
                             f"{VARIANT_SETTINGS[str(variant)].title}")
        if source.transformer_2 is not None:
            notes.append(f"low-noise expert {source.transformer_2.name}")
        return CheckpointProbe(family=self.name, score=probe.score, variant=variant,
                               reason="; ".join(notes))

    def _probe_folder(self, source: CheckpointSource) -> CheckpointProbe | None:
        index = source.model_index or {}
        pipeline_class = index.get("_class_name")
        if pipeline_class not in WAN_PIPELINES:
            return None
        transformer = read_json_object(source.path / "transformer" / "config.json") or {}
        vae = read_json_object(source.path / "vae" / "config.json") or {}
        second = index.get("transformer_2")
        two_experts = isinstance(second, list) and bool(second) and second[0] is not None
        in_channels = transformer.get("in_channels")
        z_dim = vae.get("z_dim")
        found = (f"model_index.json: {pipeline_class}, "
                 f"{'two experts' if two_experts else 'one transformer'}, "
                 f"boundary_ratio {index.get('boundary_ratio')}, expand_timesteps "
                 f"{bool(index.get('expand_timesteps'))}; transformer in_channels "
                 f"{in_channels}; VAE z_dim {z_dim}")
        if two_experts and index.get("boundary_ratio") is not None:
            image = pipeline_class == "WanImageToVideoPipeline" or in_channels == 36
            variant = I2V_A14B if image else T2V_A14B
        elif not two_experts and index.get("expand_timesteps") and z_dim == 48:
            variant = TI2V_5B
        else:
            # One transformer without expanded timesteps is Wan 2.1 (or VACE and others on its
            # code): not this family's defaults or LoRA rules.
            return None
        if transformer.get("image_dim") is not None:
            return None  # a CLIP image branch: Wan 2.1 I2V, which Wan 2.2 dropped
        return CheckpointProbe(family=self.name, score=0.9, variant=variant,
                               reason=f"{VARIANT_SETTINGS[variant].title} ({found})")

    def _probe_single_file(self, header: SafetensorsHeader) -> CheckpointProbe | None:
        for prefix in _SINGLE_FILE_PREFIXES:
            q = header.tensors.get(f"{prefix}blocks.0.self_attn.q.weight")
            patch = header.tensors.get(f"{prefix}patch_embedding.weight")
            if q is not None and patch is not None and len(patch.shape) == 5:
                break
        else:
            return None
        if any(key.startswith(f"{prefix}img_emb.") for key in header.tensors):
            return None  # Wan 2.1 I2V's CLIP image embedding
        width, in_channels = q.shape[0], patch.shape[1]
        variant = {(5120, 16): T2V_A14B, (5120, 36): I2V_A14B, (3072, 48): TI2V_5B}.get(
            (width, in_channels))
        if width in SIZE_BY_WIDTH and variant is None:
            return None  # a real size that is no Wan 2.2 release (Wan 2.1 1.3B, 14B at 16/36)
        what = VARIANT_SETTINGS[variant].title if variant else "a Wan transformer"
        return CheckpointProbe(family=self.name, score=0.8, variant=variant,
                               reason=f"original-layout single file: {what} (width {width}, "
                                      f"{in_channels} input channels)")

    def component_sources(self, checkpoint: LoadedCheckpoint) -> dict[str, Path]:
        return component_sources(checkpoint, WAN_COMPONENTS)

    def missing_requirements(self, checkpoint: LoadedCheckpoint) -> str | None:
        if checkpoint.kind == "gguf":
            return _gguf_requirements(checkpoint)
        if checkpoint.kind != "folder":
            return (f"{checkpoint.name!r} is a single Wan transformer file; lorafarm loads Wan "
                    "2.2 from diffusers folders (an A14B release is two expert files plus the "
                    "UMT5 encoder and VAE), or from GGUF experts with such a folder as their "
                    "base: use the diffusers folder of this release (e.g. "
                    "Wan2.2-T2V-A14B-Diffusers)")
        # Its own weights, unless a component file is named for it.
        if not checkpoint.components:
            return None
        return component_problem(checkpoint, checkpoint.path, WAN_COMPONENTS)

    def probe_lora(self, header: SafetensorsHeader, facts: LoraFacts) -> LoraProbe | None:
        layout = _wan_lora_layout(facts.module_keys)
        if layout is None:
            return None
        notes = []
        size, how = _lora_size(header)
        if size is not None:
            notes.append(f"{SIZE_TITLES[size]} ({how})")
        if any(_WAN21_IMAGE_ATTN.search(module) for module in facts.module_keys):
            notes.append("trained on Wan 2.1 I2V: its image cross-attention layers have no "
                         "counterpart in Wan 2.2 and are left out")
        expert, expert_from = expert_of(header.path.name, header.metadata)
        if expert:
            notes.append(f"{expert}-noise expert ({expert_from})")
        reason = f"Wan LoRA, {layout} layout" + (f"; {'; '.join(notes)}" if notes else "")
        return LoraProbe(family=self.name, architecture=self.architecture, score=0.9,
                         reason=reason, variant=size, expert=expert)

    def lora_fits(self, lora_variant: str | None, checkpoint_variant: str | None) -> str | None:
        if lora_variant is None or checkpoint_variant not in VARIANT_SETTINGS:
            return None  # unknown size: diffusers will tell at load time
        if checkpoint_variant in VARIANTS_BY_SIZE.get(lora_variant, ()):
            return None
        fitting = VARIANTS_BY_SIZE.get(lora_variant, ())
        hint = (f"it fits {' and '.join(VARIANT_SETTINGS[v].title for v in fitting)}"
                if fitting else "no Wan 2.2 release has that size")
        return (f"it is a {SIZE_TITLES.get(lora_variant, lora_variant)} LoRA and the checkpoint "
                f"is {VARIANT_SETTINGS[checkpoint_variant].title}; a LoRA only loads into the "
                f"model size it was trained on ({hint})")

    # -- LoRA loading ----------------------------------------------------------------------

    def load_lora(self, pipe: Any, path: Path, adapter_name: str, lora: LoraUse) -> None:
        """Load into the expert(s) the LoRA is for: `high` -> transformer, `low` ->
        transformer_2, `both` / unknown -> each (one adapter name in both). On the one-
        transformer TI2V-5B an expert LoRA is an error: it was trained for an A14B expert."""
        two_experts = getattr(pipe, "transformer_2", None) is not None
        expert = lora.expert if lora.expert in ("high", "low") else None
        if not two_experts and expert is not None:
            raise RenderError(
                f"LoRA {lora.name!r} is for the {expert}-noise expert of Wan 2.2 A14B, but this "
                "checkpoint has a single transformer (TI2V-5B). Use a 5B LoRA, or set "
                'expert = "both" for it under [[loras]] to apply it anyway')
        source = lora_source_for_diffusers(path)
        targets = {"high": (False,), "low": (True,), None: (False, True)}[expert]
        for into_second in targets if two_experts else (False,):
            # diffusers' original-layout converter scales alpha into the tensors in place: each
            # expert gets its own copy of a state dict.
            fresh = source if isinstance(source, str) else {
                key: value.clone() for key, value in source.items()}
            with _LOADING:
                pipe.load_lora_weights(fresh, adapter_name=adapter_name,
                                       load_into_transformer_2=into_second)

    def lora_strengths(self, lora: LoraUse) -> dict[str, float]:
        strength = lora.strength
        high = strength if lora.expert in (None, "both", "high") else 0.0
        low = strength if lora.expert in (None, "both", "low") else 0.0
        # The core keeps only the components the adapter patched: a one-transformer model
        # gets the "transformer" entry alone.
        return {"transformer": high, "transformer_2": low}

    def lora_pair_name(self, stem: str) -> tuple[str, str] | None:
        """(shared name, expert) when `stem` names one expert of a HIGH/LOW pair, e.g.
        `wan22-lightning_HIGH` -> ("wan22-lightning", "high"); None otherwise."""
        return lora_pair_name(stem)

    def apply_conventions(self, prompt: str, negative_prompt: str | None,
                          enabled: bool) -> tuple[str, str, list[str]]:
        """The official negative prompt when the job gives none; nothing weights a UMT5
        encoder, so A1111 weights are dropped at render time, with a warning here. The
        prompts are kept as written."""
        prompt, negative, notes = super().apply_conventions(prompt, negative_prompt, enabled)
        return prompt, negative, [*notes, *unweighted_notes(self.display_name, prompt, negative)]

    # -- loading and rendering -------------------------------------------------------------

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> Any:
        from diffusers import WanImageToVideoPipeline, WanPipeline

        self.require_loadable(checkpoint)
        folder = checkpoint.path if checkpoint.kind == "folder" else checkpoint.config_path
        assert folder is not None  # checked by missing_requirements
        index = read_json_object(folder / "model_index.json") or {}
        pipeline_class = (WanImageToVideoPipeline
                          if index.get("_class_name") == "WanImageToVideoPipeline"
                          else WanPipeline)
        # UMT5 and VAE kept as files of their own (ComfyUI's umt5_xxl, wan_2.1_vae).
        files = choose_components(checkpoint, folder, WAN_COMPONENTS)
        with _LOADING:
            experts = _load_gguf_experts(checkpoint, dtype) if checkpoint.kind == "gguf" else {}
            parts = load_components(folder, files, component_dtypes(dtype), checkpoint.name)
            pipe = pipeline_class.from_pretrained(folder, dtype=component_dtypes(dtype),
                                                  local_files_only=True, **experts, **parts)
        record_components(pipe, files)
        pipe.set_progress_bar_config(disable=True)
        # Samplers and flow shift are set per batch, each built from the checkpoint's own
        # scheduler settings, kept here untouched.
        remember_scheduler_config(pipe)
        # One video at a time through the VAE: a batch costs no more VAE memory than one
        # video, and a video's pixels do not depend on its batch.
        pipe.vae.enable_slicing()
        if pipe.vae.config.z_dim == 48:
            # The Wan 2.2 VAE at 1280x704x121 frames needs tens of GB untiled; its tiles are
            # 256 px, so small renders are not tiled at all.
            pipe.vae.enable_tiling()
        return pipe if device.type == "cpu" else pipe.to(device)

    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: torch.device,
                     progress: Progress | None = None) -> list[RenderedVideo]:
        first = specs[0]
        extra = first.extra
        image = _load_input_image(first)
        runner = _pipeline_for(pipe, image is not None)
        shift = extra.get("flow_shift")
        runner.scheduler = job_scheduler(
            pipe, first, self.sampler_kind,
            overrides={"flow_shift": float(shift)} if shift is not None else None)
        # CPU generators: the same seed gives the same noise on any device, and one generator
        # per render keeps each video independent of its batch.
        generators = cpu_generators(specs)
        kwargs: dict[str, Any] = {
            # UMT5 has no prompt weighting: A1111 weights are read as plain text.
            "prompt": [strip_explicit_weights(spec.prompt)[0] for spec in specs],
            "negative_prompt": [strip_explicit_weights(spec.negative_prompt)[0] for spec in specs],
            "height": first.height,
            "width": first.width,
            "num_frames": int(extra["frames"]),
            "num_inference_steps": first.steps,
            "guidance_scale": first.cfg,
            "generator": generators,
            "output_type": "pil",
            "callback_on_step_end": step_callback(progress),
        }
        if runner.config.boundary_ratio is not None:
            kwargs["guidance_scale_2"] = float(extra.get("guidance_2", first.cfg))
        if image is not None:
            kwargs["image"] = ImageOps.fit(image, (first.width, first.height),
                                           method=Image.Resampling.LANCZOS)
        result = runner(**kwargs)
        fps = int(extra["fps"])
        return [RenderedVideo(frames=list(frames), fps=fps) for frames in result.frames]

    def batch_cost(self, spec: RenderSpec) -> int:
        """Estimated accelerator bytes one clip adds to a batch (weights not counted: two
        A14B experts are ~57 GB in bfloat16, the 5B ~10 GB, UMT5-XXL ~11 GB).

        From the shapes, not measured (no GPU here): per latent token, the peak inside one
        block holds the hidden state, q/k/v/out and the feed-forward activation in bfloat16
        (SDPA keeps no attention matrix), doubled for float32 norm/RoPE temporaries and
        allocator slack; TI2V-5B adds its per-token timestep embedding (7 x width, float32).
        Plus the decoded float32 video. The VAE decodes one clip at a time (slicing), so its
        own peak does not grow with the batch. 832x480x81 on A14B: ~5.8 GiB a clip;
        1280x704x121 on 5B: ~6.7 GiB.
        """
        frames = int(spec.extra.get("frames") or 81)
        latent_frames = (frames - 1) // 4 + 1
        # The core sets guidance_2 exactly for the two-expert (A14B) releases.
        two_experts = spec.extra.get("guidance_2") is not None
        pixels_per_token = 16 if two_experts else 32  # VAE 8x (A14B) or 16x (5B), 2x2 patches
        width, ffn = (5120, 13824) if two_experts else (3072, 14336)
        tokens = (latent_frames * (spec.height // pixels_per_token)
                  * (spec.width // pixels_per_token))
        per_token = (ffn + 6 * width) * 2 * 2 + (0 if two_experts else 7 * width * 4)
        video = frames * spec.height * spec.width * 3 * 4
        return tokens * per_token + video

    def infotext_fields(self, spec: RenderSpec) -> list[tuple[str, object]]:
        extra = spec.extra
        fields: list[tuple[str, object]] = [("Frames", extra.get("frames")),
                                            ("FPS", extra.get("fps")),
                                            ("Flow shift", extra.get("flow_shift"))]
        if extra.get("guidance_2") is not None:
            fields.append(("Low-noise CFG scale", extra["guidance_2"]))
        if extra.get("image_sha256"):
            fields.append(("Init image hash", str(extra["image_sha256"])[:10]))
        fields += quantization_fields(spec)
        return [(key, value) for key, value in fields if value is not None]

    # -- demo ------------------------------------------------------------------------------

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        from families.wan22.tiny import (
            build_tiny_wan_pipeline,
            save_tiny_wan_folder,
            save_tiny_wan_transformer_gguf,
            write_tiny_input_image,
        )

        for variant, seed in ((T2V_A14B, 0), (I2V_A14B, 1), (TI2V_5B, 2)):
            save_tiny_wan_folder(build_tiny_wan_pipeline(variant, seed=seed),
                                 models_dir / DEMO_CHECKPOINTS[variant])
        # Quantized experts need widths that are multiples of GGUF's 32-wide blocks: a T2V-A14B
        # of its own (32 wide), whose folder is both their base and the unquantized original.
        wide = build_tiny_wan_pipeline(T2V_A14B, seed=4, head_dim=16)
        save_tiny_wan_folder(wide, models_dir / DEMO_GGUF_BASE)
        for quantization, (high, low) in DEMO_GGUF_PAIRS.items():
            save_tiny_wan_transformer_gguf(wide.transformer, models_dir / f"{high}.gguf",
                                           quantization)
            save_tiny_wan_transformer_gguf(wide.transformer_2, models_dir / f"{low}.gguf",
                                           quantization)
            (models_dir / f"{high}.toml").write_text(
                f"# The high-noise expert; its low-noise partner and the base folder (UMT5, VAE,\n"
                f"# tokenizer, configs) of the same release.\nconfig = \"{DEMO_GGUF_BASE}\"\n"
                f"transformer_2 = \"{low}.gguf\"\n", encoding="utf-8")
        # The demo's inputs folder (paths.inputs = "inputs" beside models/).
        write_tiny_input_image(models_dir.parent / "inputs" / DEMO_IMAGE, size=(64, 48), seed=0)
        high_q8 = DEMO_GGUF_PAIRS["Q8_0"][0]
        return DemoAssets(jobs={
            "wan22-t2v.toml": demo_job(T2V_A14B, "a red boat on a lake at night", seed=3000),
            "wan22-i2v.toml": demo_job(I2V_A14B, "slow camera pan over the lake", seed=3100,
                                       image=DEMO_IMAGE),
            "wan22-ti2v.toml": demo_job(TI2V_5B, "a lantern over the sea", seed=3200),
            "wan22-t2v-gguf.toml": demo_job(T2V_A14B, "a red boat on a lake at night",
                                            seed=3000, checkpoint=high_q8),
        })


DEMO_CHECKPOINTS = {T2V_A14B: "tiny-wan22-t2v-a14b", I2V_A14B: "tiny-wan22-i2v-a14b",
                    TI2V_5B: "tiny-wan22-ti2v-5b"}
DEMO_IMAGE = "wan22-first-frame.png"
# A 32-wide tiny T2V-A14B (a folder), and its two experts as GGUF pairs, named as the
# community's files are (the checkpoint is the high-noise file; its sidecar names the low one).
DEMO_GGUF_BASE = "tiny-wan22-t2v-a14b-32"
DEMO_GGUF_PAIRS = {q: (f"tiny-wan22-t2v-a14b-high_noise-{q}", f"tiny-wan22-t2v-a14b-low_noise-{q}")
                   for q in ("Q8_0", "Q4_0")}


def demo_job(variant: str, prompt: str, seed: int, *, image: str | None = None,
             count: int = 2, frames: int = 5, steps: int = 4, extra: str = "",
             checkpoint: str | None = None) -> str:
    """A small job for a tiny Wan 2.2 checkpoint (the variant's demo folder unless
    `checkpoint` names another): 64x64 (the smallest size a job may ask for), 5 frames at
    8 fps, 4 steps (with the official shifts the last of 4 steps is below the A14B boundary,
    so both experts run)."""
    name = checkpoint or DEMO_CHECKPOINTS[variant]
    lines = [f'checkpoint = "{name}"', f'prompt = "{prompt}"',
             f"seed = {seed}", f"count = {count}", f"steps = {steps}", "width = 64",
             "height = 64", f"frames = {frames}", "fps = 8"]
    if image is not None:
        lines.append(f'image = "{image}"')
    return "\n".join(lines) + "\n" + extra


# --- helpers --------------------------------------------------------------------------------


def component_dtypes(dtype: torch.dtype) -> torch.dtype | dict[str, torch.dtype]:
    """Per-component dtypes for `from_pretrained`. Wan is trained in bfloat16: UMT5 overflows
    in float16 (inf/NaN, black videos), so float16 becomes bfloat16; the VAE stays float32, as
    the Wan releases run it."""
    if dtype == torch.float32:
        return dtype
    main = torch.bfloat16 if dtype == torch.float16 else dtype
    return {"vae": torch.float32, "default": main}


def _pipeline_for(pipe: Any, with_image: bool) -> Any:
    """The pipeline that renders this batch: the loaded one, or for a TI2V-5B job with an
    image an image-to-video view of the same components (built once, LoRAs included, since
    the adapters live in the shared transformer)."""
    from diffusers import WanImageToVideoPipeline

    is_i2v = isinstance(pipe, WanImageToVideoPipeline)
    if is_i2v and not with_image:
        raise RenderError("this is an image-to-video checkpoint (Wan 2.2 I2V-A14B): the job "
                          'needs a first frame; add image = "start.png" (a file in the inputs '
                          "folder), or use a T2V-A14B or TI2V-5B checkpoint")
    if not with_image or is_i2v:
        return pipe
    if not pipe.config.expand_timesteps:
        raise RenderError("this is a text-to-video checkpoint (Wan 2.2 T2V-A14B) and takes no "
                          "image; remove image, or use an I2V-A14B or TI2V-5B checkpoint")
    facts = pipeline_facts(pipe).extras
    view = facts.get(IMAGE_VIEW)
    if view is None:
        view = WanImageToVideoPipeline(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
            scheduler=pipe.scheduler, transformer=pipe.transformer, transformer_2=None,
            boundary_ratio=None, expand_timesteps=True)
        view.set_progress_bar_config(disable=True)
        facts[IMAGE_VIEW] = view
    return view


def _load_input_image(spec: RenderSpec) -> Image.Image | None:
    """The job's first frame, from the absolute path intake resolved, checked against the
    hash taken at intake: a file replaced since then would render something other than what
    the job and its metadata say."""
    if spec.extra.get("image") is None:
        return None
    path_text = spec.extra.get("image_path")
    if not path_text:
        raise RenderError("the job names an image but intake passed no image_path; drop the job "
                          "file again")
    path = Path(str(path_text))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RenderError(f"input image {path} cannot be read ({exc.strerror}); put it back "
                          "into the inputs folder and drop the job again") from exc
    expected = spec.extra.get("image_sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise RenderError(f"input image {path.name} changed after the job was accepted; drop "
                          "the job file again to render with the new image")
    with Image.open(path) as image:
        return image.convert("RGB")


def _wan_lora_layout(modules: frozenset[str]) -> str | None:
    """The layout of a Wan LoRA from its module names, or None when it is not one."""
    if any(_MUSUBI.match(m) for m in modules):
        return "musubi-tuner"
    if any(m.startswith(("diffusion_model.", "model.diffusion_model.")) and _ORIGINAL.match(m)
           for m in modules):
        return "original (ComfyUI / lightx2v)"
    diffusers = [match for m in modules if (match := _DIFFUSERS.match(m))]
    if diffusers:
        return "PEFT" if diffusers[0].group(1) == "base_model.model" else "diffusers"
    if any(_ORIGINAL.match(m) for m in modules):
        return "original, no prefix"
    return None


def _lora_size(header: SafetensorsHeader) -> tuple[str | None, str]:
    """Model size from the width of self-attention q (a square matrix of the model width),
    else from size words in the metadata; (None, "") when neither says."""
    for key, info in header.tensors.items():
        if not info.shape or len(info.shape) != 2:
            continue
        if key.endswith(_DOWN) and _SELF_ATTN_Q.search(key[: -len(_suffix(key, _DOWN))]):
            width = info.shape[1]
        elif key.endswith(_UP) and _SELF_ATTN_Q.search(key[: -len(_suffix(key, _UP))]):
            width = info.shape[0]
        else:
            continue
        if width in SIZE_BY_WIDTH:
            return SIZE_BY_WIDTH[width], f"width {width}"
        break  # a width no real model has (a test file): let the metadata say
    for meta_key in _SIZE_METADATA_KEYS:
        value = header.metadata.get(meta_key, "")
        for size, pattern in _SIZE_WORDS:
            if pattern.search(value):
                return size, f"{meta_key} = {value!r}"
    return None, ""


def _suffix(key: str, suffixes: tuple[str, ...]) -> str:
    return next(s for s in suffixes if key.endswith(s))


def expert_of(file_name: str, metadata: dict[str, str]) -> tuple[str | None, str]:
    """(expert, where it was read) from a LoRA's file name, then from the training output name
    or title in its metadata; (None, "") when nothing says or both words appear."""
    stem = Path(file_name).name.removesuffix(".safetensors")
    candidates = [("file name", stem)] + [(f"metadata {k}", metadata[k])
                                          for k in _EXPERT_METADATA_KEYS if metadata.get(k)]
    for where, text in candidates:
        found = [expert for expert, pattern in _EXPERT_WORDS.items() if pattern.search(text)]
        if len(found) == 1:
            return found[0], where
    return None, ""


def lora_pair_name(stem: str) -> tuple[str, str] | None:
    """The pairing rule for HIGH/LOW LoRA files: two files in one folder whose stems are equal
    once the one expert word (high / low, optionally with "noise", any case, with the
    separator before it) is removed are one LoRA, named by what remains. Returns (that name,
    expert) or None when the stem has no single expert word."""
    matches = list(_PAIR_WORD.finditer(stem))
    if len(matches) != 1:
        return None
    match = matches[0]
    rest = (stem[: match.start()] + stem[match.end():]).strip("_-. ")
    return (rest, match.group(1).lower()) if rest else None


def lora_source_for_diffusers(path: Path) -> str | dict[str, torch.Tensor]:
    """What to hand `load_lora_weights`: the file path where diffusers reads the layout itself
    (diffusers, original `diffusion_model.*`, complete musubi files), or a state dict renamed
    into one of those where it does not:

    * raw PEFT `base_model.model.*` -> `transformer.*` (diffusers would load nothing);
    * `model.diffusion_model.*` or prefix-less original names -> `diffusion_model.*`;
    * musubi files that leave out some of the ten block linears, or some blocks: diffusers'
      musubi converter requires all of them, so they go through its original-layout converter
      under their original names instead (`lora_unet_blocks_0_self_attn_q` ->
      `diffusion_model.blocks.0.self_attn.q`), which takes any subset.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        modules = {key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in keys}
        rename = _renaming(modules)
        if rename is None:
            return str(path)
        return {rename(key): handle.get_tensor(key) for key in keys}


def _renaming(modules: set[str]) -> Any:
    if any(m.startswith("base_model.model.") for m in modules):
        return lambda key: "transformer." + key.removeprefix("base_model.model.")
    if any(m.startswith("model.diffusion_model.") for m in modules):
        return lambda key: key.removeprefix("model.")
    if any(m.startswith("blocks.") for m in modules):
        return lambda key: "diffusion_model." + key
    musubi = [m for m in modules if m.startswith("lora_unet_")]
    if musubi and not _complete_musubi(musubi):
        return _musubi_to_original
    return None


_MUSUBI_LAYERS = ("self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o", "cross_attn_q",
                  "cross_attn_k", "cross_attn_v", "cross_attn_o", "ffn_0", "ffn_2")
_MUSUBI_NAME = re.compile(r"^lora_unet_blocks_(\d+)_(self_attn|cross_attn|ffn)_(\w+?)"
                          r"(\.(?:lora_down\.weight|lora_up\.weight|alpha))$")


def _complete_musubi(modules: list[str]) -> bool:
    """diffusers' musubi converter takes blocks 0..n-1 with all ten linears each (plus, for
    Wan 2.1 I2V files, k_img and v_img): anything else makes it raise."""
    blocks = {int(m.split("_")[3]) for m in modules if _MUSUBI.match(m)}
    if not blocks or blocks != set(range(len(blocks))):
        return False
    expected = {f"lora_unet_blocks_{b}_{layer}" for b in blocks for layer in _MUSUBI_LAYERS}
    image = {m for m in modules if m.endswith(("_k_img", "_v_img"))}
    return set(modules) - image == expected


def _musubi_to_original(key: str) -> str:
    match = _MUSUBI_NAME.match(key)
    if match is None:
        return key  # not a block linear: diffusers' converter names what it cannot place
    block, group, layer, suffix = match.groups()
    return f"diffusion_model.blocks.{block}.{group}.{layer}{suffix}"


# --- GGUF experts ---------------------------------------------------------------------------


def _gguf_requirements(checkpoint: LoadedCheckpoint) -> str | None:
    """What a Wan GGUF checkpoint still needs (a base folder of the same release, the second
    expert of an A14B pair), or None when it can load. Reads headers and configs only."""
    sidecar = f"{checkpoint.name}.toml (or [checkpoints.{checkpoint.name}] in config.toml)"
    base = checkpoint.config_path
    if base is None:
        return (f"{checkpoint.name!r} is a Wan 2.2 GGUF transformer alone; the tokenizer, "
                "scheduler and configs come from a local diffusers folder of the same release "
                "(lorafarm never downloads one): write a sidecar " + sidecar + " with "
                'config = "path/to/Wan2.2-T2V-A14B-Diffusers" and, for an A14B release, '
                'transformer_2 = "<the low-noise expert>.gguf". The folder\'s UMT5 and VAE '
                "weights are not needed where those are files of their own (ComfyUI's "
                "umt5_xxl and wan_2.1_vae: text_encoder and vae in the sidecar, or found in "
                "the ComfyUI trees of paths.comfyui)")
    index = read_json_object(base / "model_index.json") or {}
    if index.get("_class_name") not in WAN_PIPELINES:
        return (f"the base folder {base} of {checkpoint.name!r} is not a diffusers Wan folder "
                f"(model_index.json: {index.get('_class_name') or 'missing'}); point config in "
                f"{sidecar} at e.g. Wan2.2-T2V-A14B-Diffusers")
    problem = missing_config_parts(base, checkpoint.name, ("tokenizer", "scheduler"),
                                   what="base folder")
    if problem:
        return problem
    second = index.get("transformer_2")
    two_experts = isinstance(second, list) and bool(second) and second[0] is not None
    files = {"transformer": checkpoint.path}
    if two_experts:
        if checkpoint.transformer_2 is None:
            return (f"{base.name} is a two-expert release (A14B) and {checkpoint.name!r} is one "
                    f"expert: name the low-noise expert's GGUF file in {sidecar} with "
                    'transformer_2 = "<file>.gguf" (this file being the high-noise one)')
        files["transformer_2"] = checkpoint.transformer_2
        if (expert_of(checkpoint.path.name, {})[0] == "low"
                or expert_of(checkpoint.transformer_2.name, {})[0] == "high"):
            return (f"the file names say the experts are swapped: {checkpoint.path.name} is the "
                    f"checkpoint and {checkpoint.transformer_2.name} its transformer_2, but the "
                    "checkpoint must be the HIGH-noise expert and transformer_2 the LOW-noise "
                    "one (the high-noise expert draws the first steps); put the sidecar beside "
                    "the high-noise file")
    elif checkpoint.transformer_2 is not None:
        return (f"{base.name} is a one-transformer release (TI2V-5B): transformer_2 in "
                f"{sidecar} has no place; remove it")
    for component, path in files.items():
        config = read_json_object(base / component / "config.json") or {}
        if not config:
            return f"the base folder {base} has no {component}/config.json"
        try:
            header = read_gguf_header(path)
        except GgufError as exc:
            return str(exc)
        shapes = {key.removeprefix("model.diffusion_model.").removeprefix("diffusion_model."):
                  info.shape for key, info in header.tensors.items()}
        q, patch = shapes.get("blocks.0.self_attn.q.weight"), shapes.get("patch_embedding.weight")
        width = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
        if q is None or patch is None or (q[0], patch[1]) != (width, config.get("in_channels")):
            found = f"width {q[0]}, {patch[1]} input channels" if q and patch else "no Wan keys"
            return (f"{path.name} ({found}) does not fit the {component} of the base folder "
                    f"{base.name} (width {width}, {config.get('in_channels')} input channels): "
                    "use the base folder of the same release and size")
    return component_problem(checkpoint, base, WAN_COMPONENTS)


def _load_gguf_experts(checkpoint: LoadedCheckpoint, dtype: torch.dtype) -> dict[str, Any]:
    """The GGUF expert(s) as diffusers WanTransformer3DModels (GGUFLinear layers), for
    `from_pretrained(base, transformer=..., transformer_2=...)`. diffusers' single-file
    converter renames the original keys (a pure renaming, so quantized tensors pass as they
    are). They compute in the dtype the transformers would have (bfloat16 for float16)."""
    from diffusers import WanTransformer3DModel

    from families.shared.quantized import load_gguf_model, load_gguf_state_dict

    assert checkpoint.config_path is not None
    compute = component_dtypes(dtype)
    compute_dtype = compute if isinstance(compute, torch.dtype) else compute["default"]
    files = {"transformer": checkpoint.path}
    if checkpoint.transformer_2 is not None:
        files["transformer_2"] = checkpoint.transformer_2
    return {component: load_gguf_model(WanTransformer3DModel, load_gguf_state_dict(path),
                                       checkpoint.config_path, component, compute_dtype, path)
            for component, path in files.items()}


@hookimpl
def register_families(register: Any) -> None:
    register(Wan22Family())
