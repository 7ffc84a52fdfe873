"""The SDXL family: Stable Diffusion XL checkpoints, as diffusers folders or single files.

Pony and Illustrious are the same architecture with their own prompt conventions and LoRA
lineage; they build on `SDXLFamily` rather than copying it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from daemon.plugin_api import (
    CheckpointProbe,
    CheckpointSource,
    DemoAssets,
    EmbeddingProbe,
    Family,
    FamilyDefaults,
    LoadedCheckpoint,
    LoraFacts,
    LoraProbe,
    LoraUse,
    ParsedPrompt,
    Progress,
    RenderSpec,
    SafetensorsHeader,
    hookimpl,
    make_scheduler,
    parse_prompt,
    pipeline_facts,
    remember_scheduler_config,
    to_compel_conjunction,
)
from families.sdxl.lineage import guess_lineage
from families.shared.components import fit_problem, load_component

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
# Keys only an SDXL original-layout file has: the OpenCLIP-G second text encoder of the
# SGM "conditioner" and the UNet's extra (size/crop) conditioning embedding.
SDXL_SINGLE_FILE_TELLS = ("conditioner.embedders.1.model.", "model.diffusion_model.label_emb.")
# SD 1.x/2.x UNets have one transformer block per attention; SDXL's deeper levels have 2-10.
_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks[._](\d+)")
_CROSS_ATTN_K = re.compile(r"attn2[._]to_k")
SD1_SD2_CONTEXT_WIDTHS = (768, 1024)  # attn2.to_k input width of SD 1.x / SD 2.x LoRAs


class SDXLFamily(Family):
    name = "sdxl"
    architecture = "sdxl"
    display_name = "SDXL"
    sampler_kind = "eps"
    defaults = FamilyDefaults(width=1024, height=1024, steps=25, cfg=6.0, sampler="DPM++ 2M",
                              schedule="Karras")
    # A1111 weights and BREAK are encoded through compel (encode_weighted_sdxl); the base
    # apply_conventions warns about what compel cannot read (unbalanced brackets, editing).
    prompt_weighting = "a1111"
    # A VAE of its own (`vae = "sdxl_vae_fp16_fix.safetensors"` for the checkpoint): the
    # fp16-fix VAE users swap in against black images in half precision.
    component_files = ("vae",)
    supports_hires = True
    supports_img2img = True
    supports_inpainting = True

    # -- recognition -----------------------------------------------------------------------

    def probe_checkpoint(self, source: CheckpointSource) -> CheckpointProbe | None:
        if source.kind == "folder":
            pipeline_class = (source.model_index or {}).get("_class_name")
            if pipeline_class not in SDXL_PIPELINES:
                return None
            why = f"model_index.json: {pipeline_class}"
        elif source.header is not None and all(
                any(k.startswith(tell) for k in source.header.tensors)
                for tell in SDXL_SINGLE_FILE_TELLS):
            why = "SDXL original layout (OpenCLIP-G conditioner, label_emb)"
        else:
            return None
        lineage, lineage_source = guess_lineage(source.metadata, source.path.name)
        score = self.match_score_for_lineage(lineage)
        if score is None:
            return None
        return CheckpointProbe(family=self.name, score=score, lineage=lineage,
                               reason=f"{why}; lineage: {lineage_source}")

    def probe_lora(self, header: SafetensorsHeader, facts: LoraFacts) -> LoraProbe | None:
        """An SDXL-architecture LoRA: kohya's two text-encoder prefixes (te1 + te2), the
        diffusers `text_encoder_2.` component, or UNet attention with more than one
        transformer block per level (SD 1.x/2.x have one). Widths of SD 1.x/2.x exclude."""
        keys = facts.module_keys
        two_text_encoders = (any(k.startswith("lora_te2_") for k in keys)
                             or any(k.startswith("text_encoder_2.") for k in keys))
        unet_keys = [k for k in keys if k.startswith(("lora_unet_", "unet.", "diffusion_model.",
                                                      "base_model.model."))]
        deep = any(int(m.group(1)) >= 1 for k in unet_keys
                   if (m := _TRANSFORMER_BLOCK.search(k)))
        sdxl_unet_names = any(("input_blocks" in k or "down_blocks" in k or "mid_block" in k
                               or "middle_block" in k) for k in unet_keys)
        for key, info in header.tensors.items():
            if (_CROSS_ATTN_K.search(key) and key.endswith((".lora_down.weight", ".lora_A.weight"))
                    and info.shape and info.shape[-1] in SD1_SD2_CONTEXT_WIDTHS):
                return None  # an SD 1.x / 2.x LoRA
        if not (two_text_encoders or (sdxl_unet_names and deep)):
            return None
        lineage, source = guess_lineage(header.metadata, header.path.name)
        score = self.match_score_for_lineage(lineage)
        if score is None:
            return None
        why = ("two text encoders (te1 + te2)" if two_text_encoders else
               "UNet attention with several transformer blocks per level")
        return LoraProbe(family=self.name, architecture=self.architecture, score=score,
                         reason=f"SDXL: {why}", lineage=lineage, lineage_source=source)

    def match_score_for_lineage(self, lineage: str | None) -> float | None:
        """How sure this family is about an SDXL-architecture file of `lineage` (None: it is
        not this family's). Plain SDXL answers for every SDXL file at 0.5; the lineage
        families (Pony, Illustrious) answer 0.9 for their own lineage only."""
        return 0.5

    def lora_strengths(self, lora: LoraUse) -> dict[str, float]:
        te = lora.strength if lora.text_encoder_strength is None else lora.text_encoder_strength
        return {"unet": lora.strength, "text_encoder": te, "text_encoder_2": te}

    def missing_requirements(self, checkpoint: LoadedCheckpoint) -> str | None:
        if checkpoint.kind == "single_file" and checkpoint.config_path is None:
            return (f"single-file checkpoint {checkpoint.name!r} needs a local diffusers config "
                    "folder (lorafarm never downloads one): set "
                    f'[checkpoints.{checkpoint.name}] config = "path/to/sdxl-config" in '
                    "config.toml, pointing at a diffusers SDXL folder (weights not needed)")
        if checkpoint.config_path is not None and not (
                checkpoint.config_path / "model_index.json").is_file():
            return (f"the config folder {checkpoint.config_path} for {checkpoint.name!r} has no "
                    "model_index.json; point it at a diffusers SDXL folder")
        return vae_problem(checkpoint)

    def size_for_image(self, variant: str | None, image_width: int,
                       image_height: int) -> tuple[int, int] | None:
        """Image-to-image without width/height renders at the input's size (down to a
        multiple of 8)."""
        multiple = self.defaults.size_multiple
        return image_width - image_width % multiple, image_height - image_height % multiple

    # -- loading and rendering -------------------------------------------------------------

    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> Any:
        self.require_loadable(checkpoint)
        parts: dict[str, Any] = {}
        vae = checkpoint.components.get("vae")
        if vae is not None:
            base = checkpoint.path if checkpoint.kind == "folder" else checkpoint.config_path
            assert base is not None  # missing_requirements made sure
            parts["vae"] = load_component(vae, base, "vae", dtype)
        if checkpoint.kind == "folder":
            # use_safetensors: a folder's .bin weights are pickles and are never loaded.
            pipe = StableDiffusionXLPipeline.from_pretrained(
                checkpoint.path, dtype=dtype, local_files_only=True, use_safetensors=True,
                **parts)
        else:
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(checkpoint.path), config=str(checkpoint.config_path), dtype=dtype,
                local_files_only=True, **parts)
        pipe.set_progress_bar_config(disable=True)
        # Samplers are swapped per batch; each is built from the checkpoint's own training
        # settings, kept here untouched.
        remember_scheduler_config(pipe)
        # Loaded on the CPU already; `.to("cpu")` would only warn about fp32 modules.
        return pipe if device.type == "cpu" else pipe.to(device)

    def infotext_fields(self, spec: RenderSpec) -> list[tuple[str, object]]:
        """A1111's `VAE` and `VAE hash` when the checkpoint renders with a VAE of its own."""
        return [*super().infotext_fields(spec), ("VAE hash", spec.extra.get("vae_hash")),
                ("VAE", spec.extra.get("vae"))]

    def probe_embedding(self, header: SafetensorsHeader) -> EmbeddingProbe | None:
        from families.sdxl.embeddings import probe_sdxl_embedding

        return probe_sdxl_embedding(header)

    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: torch.device,
                     progress: Progress | None = None) -> list[Image.Image]:
        from families.sdxl.embeddings import embeddings_loaded, spelled_as_loaded

        # Textual-inversion embeddings the prompts name (intake found them; every render of
        # a batch names the same ones): loaded for this batch only.
        embeddings = specs[0].extra.get("embeddings") or []
        if embeddings:
            specs = [replace(spec, prompt=spelled_as_loaded(spec.prompt, embeddings),
                             negative_prompt=spelled_as_loaded(spec.negative_prompt, embeddings),
                             extra=_hires_spelled(spec.extra, embeddings))
                     for spec in specs]
        with embeddings_loaded(pipe, embeddings):
            return self._render_prompts(pipe, specs, progress)

    def _render_prompts(self, pipe: Any, specs: list[RenderSpec],
                        progress: Progress | None) -> list[Image.Image]:
        # A render whose prompts carry A1111 weights (or BREAK) is encoded through compel; one
        # without keeps diffusers' own text encoding. A mixed batch is rendered as two
        # pipeline calls, so that no image depends on which batch it shared.
        parsed = [(parse_prompt(spec.prompt), parse_prompt(spec.negative_prompt))
                  for spec in specs]
        weighted = [p.has_weights or n.has_weights for p, n in parsed]
        images: dict[int, Image.Image] = {}
        for use_compel in (False, True):
            indices = [i for i, w in enumerate(weighted) if w == use_compel]
            if not indices:
                continue
            group = [specs[i] for i in indices]
            if use_compel:
                conditioning: dict[str, Any] = encode_weighted_sdxl(
                    pipe, [parsed[i][0] for i in indices], [parsed[i][1] for i in indices])
            else:
                # Escapes resolved (`\\(` is a literal bracket to A1111); a prompt without
                # any A1111 syntax is passed exactly as written, as before.
                conditioning = {
                    "prompt": [_plain(parsed[i][0]) for i in indices],
                    "negative_prompt": [_plain(parsed[i][1]) for i in indices],
                }
            for i, image in zip(indices, self._render_group(pipe, group, conditioning,
                                                            progress), strict=True):
                images[i] = image
        return [images[i] for i in range(len(specs))]

    def _render_group(self, pipe: Any, specs: list[RenderSpec], conditioning: dict[str, Any],
                      progress: Progress | None) -> list[Image.Image]:
        """One pipeline call's worth of renders: text-to-image, image-to-image (an input
        image with denoising below 1; at 1 the image is ignored, as it is redrawn whole), or
        text-to-image plus a hires pass (families/sdxl/refine.py)."""
        from families.sdxl import refine as sdxl_refine

        first = specs[0]
        denoising = first.extra.get("denoising_strength")
        if "mask_path" in first.extra:
            return sdxl_refine.render_inpaint(self, pipe, specs, conditioning, progress)
        if "image_path" in first.extra and denoising is not None and denoising < 1:
            return sdxl_refine.render_img2img(self, pipe, specs, conditioning, progress)
        hires = first.extra.get("hires")
        if hires:
            hires_conditioning = conditioning
            if hires.get("prompt") is not None or hires.get("negative_prompt") is not None:
                hires_conditioning = encode_weighted_sdxl(
                    pipe, [parse_prompt(hires.get("prompt", spec.prompt)) for spec in specs],
                    [parse_prompt(hires.get("negative_prompt", spec.negative_prompt))
                     for spec in specs])
            return sdxl_refine.render_hires(self, pipe, specs, conditioning,
                                            hires_conditioning, progress)
        return self._call_pipeline(pipe, specs, conditioning, progress)

    def _call_pipeline(self, pipe: Any, specs: list[RenderSpec], conditioning: dict[str, Any],
                       progress: Progress | None) -> list[Image.Image]:
        first = specs[0]
        # A fresh sampler per call: multistep samplers keep state between steps.
        pipe.scheduler = make_scheduler(remember_scheduler_config(pipe), first.sampler,
                                        first.schedule, kind=self.sampler_kind)
        # CPU generators: the same seed gives the same noise on any device, and one generator
        # per render keeps each image independent of its batch.
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
        result = pipe(
            **conditioning,
            num_inference_steps=first.steps,
            guidance_scale=first.cfg,
            width=first.width,
            height=first.height,
            generator=generators,
            output_type="pil",
            callback_on_step_end=progress.callback if progress else None,
        )
        return list(result.images)

    # -- demo ------------------------------------------------------------------------------

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets:
        from families.sdxl.tiny import (
            build_tiny_sdxl_pipeline,
            save_tiny_sdxl_config_folder,
            save_tiny_sdxl_folder,
            save_tiny_sdxl_single_file,
        )

        pipe = build_tiny_sdxl_pipeline(seed=0)
        save_tiny_sdxl_folder(pipe, models_dir / "tiny-sdxl")
        # A diffusers folder carries no metadata: a sidecar says which lineage it is.
        (models_dir / "tiny-sdxl.toml").write_text('lineage = "sdxl"\n', encoding="utf-8")
        config_folder = configs_dir / "tiny-sdxl"
        save_tiny_sdxl_config_folder(pipe, config_folder)
        single = build_tiny_sdxl_pipeline(seed=1)
        save_tiny_sdxl_single_file(single, models_dir / "tiny-sdxl-single.safetensors",
                                   metadata={"modelspec.architecture":
                                             "stable-diffusion-xl-v1-base",
                                             "modelspec.title": "sd_xl_base_1.0 (tiny)"})
        job = ('checkpoint = "{name}"\n'
               'prompt = "a watercolor lighthouse on a cliff at dusk"\n'
               'negative_prompt = "blurry, low quality"\n'
               "seed = {seed}\ncount = 2\nsteps = 4\ncfg = 5.0\n"
               'sampler = "DPM++ 2M Karras"\nwidth = 64\nheight = 64\n')
        return DemoAssets(
            checkpoint_overrides={"tiny-sdxl-single": {"config": "configs/tiny-sdxl"}},
            jobs={"sdxl-folder.toml": job.format(name="tiny-sdxl", seed=1000),
                  "sdxl-single-file.toml": job.format(name="tiny-sdxl-single", seed=2000)},
        )


def vae_problem(checkpoint: LoadedCheckpoint) -> str | None:
    """Why the VAE file named for an SDXL-lineage checkpoint cannot be its VAE (a Flux or
    SD3 VAE has 16 latent channels, not 4); None when it fits or none is named."""
    vae = checkpoint.components.get("vae")
    base = checkpoint.path if checkpoint.kind == "folder" else checkpoint.config_path
    if vae is None or base is None:
        return None
    problem = fit_problem(vae, base, "vae")
    if problem is None:
        return None
    return (f"vae = {vae.name!r} ([checkpoints.{checkpoint.name}] in config.toml or the sidecar "
            f"{checkpoint.name}.toml) is not an SDXL VAE: {vae.name} {problem}. Name an SDXL "
            "VAE (e.g. sdxl_vae_fp16_fix.safetensors), or remove the key")


def _hires_spelled(extra: dict[str, Any], embeddings: list[dict[str, str]]) -> dict[str, Any]:
    """`extra` with the hires pass's own prompts spelled as the embeddings were loaded."""
    from families.sdxl.embeddings import spelled_as_loaded

    hires = extra.get("hires")
    if not hires:
        return extra
    respelled = {key: spelled_as_loaded(hires[key], embeddings)
                 for key in ("prompt", "negative_prompt") if key in hires}
    return {**extra, "hires": {**hires, **respelled}}


def _plain(parsed: ParsedPrompt) -> str:
    return "".join(parsed.plain_chunks)


def _pad_tokens(embeds: torch.Tensor, empty_chunk: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (1, tokens, width) to `length` tokens with whole encoded empty chunks, as compel
    and A1111 pad; lengths are always multiples of the 77-token chunk."""
    repeats = (length - embeds.shape[1]) // empty_chunk.shape[1]
    return torch.cat([embeds, *[empty_chunk] * repeats], dim=1) if repeats else embeds


def encode_weighted_sdxl(pipe: Any, prompts: list[ParsedPrompt],
                         negatives: list[ParsedPrompt]) -> dict[str, torch.Tensor]:
    """SDXL conditioning for weighted prompts through compel: the pipeline keywords
    `prompt_embeds`, `pooled_prompt_embeds` and their `negative_*`, one row per prompt.

    Both text encoders take the weights (penultimate layer, not normalised, as diffusers'
    SDXL encoding and `CompelForSDXL`); each BREAK chunk is encoded on its own and the chunks
    are concatenated, and rows are padded with encoded empty chunks to the batch's longest,
    since the UNet takes one sequence length per batch. The pooled embedding comes from the
    first chunk's plain text: A1111 does not weight it either, and compel would otherwise
    pool over its own syntax characters.
    """
    from compel import Compel, DiffusersTextualInversionManager, ReturnedEmbeddingsType

    from families.sdxl.embeddings import LOADED_EMBEDDINGS

    device = pipe._execution_device
    # Built per batch, not cached: the text encoders change when a LoRA set with text-encoder
    # weights is applied, and compel caches its encoding of the empty chunk.
    encoders = [
        Compel(tokenizer=tokenizer, text_encoder=text_encoder, truncate_long_prompts=False,
               returned_embeddings_type=ReturnedEmbeddingsType
               .PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED, device=str(device),
               # A multi-vector embedding's name stands for all its tokens (name, name_1, ..);
               # only while embeddings are loaded: the manager re-tokenizes every prompt.
               textual_inversion_manager=(DiffusersTextualInversionManager(pipe)
                                          if pipeline_facts(pipe).extras.get(LOADED_EMBEDDINGS)
                                          else None))
        for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder),
                                        (pipe.tokenizer_2, pipe.text_encoder_2))
    ]
    empties = [c.conditioning_provider.empty_z.to(device) for c in encoders]
    pooler = encoders[1].conditioning_provider

    def encode(parsed: ParsedPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        conjunction = to_compel_conjunction(parsed)
        halves = [c.build_conditioning_tensor_for_conjunction(conjunction)[0].to(device)
                  for c in encoders]
        # The two tokenizers share one vocabulary, so chunk counts agree; pad in case not.
        longest = max(half.shape[1] for half in halves)
        halves = [_pad_tokens(half, e, longest) for half, e in zip(halves, empties, strict=True)]
        pooled = pooler.get_pooled_embeddings([parsed.plain_chunks[0]], device=str(device))
        return torch.cat(halves, dim=-1), pooled.to(device)

    with torch.no_grad():
        positive = [encode(p) for p in prompts]
        negative = [encode(n) for n in negatives]
    rows = [embeds for embeds, _ in positive + negative]
    longest = max(row.shape[1] for row in rows)
    padded = [_pad_tokens(row, torch.cat(empties, dim=-1), longest) for row in rows]
    count = len(prompts)
    return {
        "prompt_embeds": torch.cat(padded[:count]),
        "pooled_prompt_embeds": torch.cat([pooled for _, pooled in positive]),
        "negative_prompt_embeds": torch.cat(padded[count:]),
        "negative_pooled_prompt_embeds": torch.cat([pooled for _, pooled in negative]),
    }


@hookimpl
def register_families(register: Any) -> None:
    register(SDXLFamily())
