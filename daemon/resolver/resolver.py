"""The job resolver: a checked job file becomes render specs, or a JobFileError saying what is
wrong, where, and how to fix it.

This is the pure half of intake. It reads the checkpoint registry, the LoRA and embedding
libraries, the plugins' parsers and families, and the input files a job names (images,
prompt files, wildcards); it writes nothing and never looks at jobs/ or the job tables, so a
job can be checked, in a test or a tool, without a daemon. `Intake` (daemon/intake/) owns
what has side effects: taking files from jobs/, claim folders, and the database rows.

A job goes through:

    parse            suffix -> the plugin's job parser -> check_job (keys, types, ranges)
    resolve          sweep axes and prompt files -> one variant per combination; for each:
      _checkpoint      the checkpoint by name (did-you-mean) and its family; its preset
      _wildcard_variants  wildcards drawn per seed (or every combination)
      _expand          family defaults, sampler, size, CFG/guidance and negative prompt rules
        _clip_skip, _resolve_loras (+ _check_lora_fits), _video_settings,
        _refine_settings (img2img, mask, [hires]), _resolve_embeddings
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
import secrets
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from daemon.config import Config
from daemon.contract.family import Family, FamilyDefaults
from daemon.contract.faults import PLUGIN_ERRORS
from daemon.contract.hires import (
    DEFAULT_IMG2IMG_DENOISING,
    check_hires,
    hires_target,
    resolve_upscaler,
)
from daemon.contract.jobfile import JobFileError, JobSpec, check_job, decode_job_bytes, line_of_key
from daemon.contract.loader import PROBE_FAULT, Plugins
from daemon.contract.samplers import SamplerError, choose_sampler, samplers_for_kind
from daemon.contract.spec import LoraUse, RenderSpec
from daemon.formats.safetensors_header import sha256_file
from daemon.library.embeddings import OK as EMBEDDING_OK
from daemon.library.embeddings import EmbeddingInfo, EmbeddingLibrary
from daemon.library.loras import LoraInfo, LoraLibrary, LoraLookupError, preferred_weight
from daemon.library.registry import CheckpointInfo, Registry
from daemon.presets import apply_preset
from daemon.resolver.parse_faults import check_fault, parser_fault, wrong_suffix
from daemon.resolver.prompt_files import find_input_file, read_prompt_file
from daemon.resolver.prompt_tags import PromptTagError, extract_lora_tags
from daemon.resolver.sweep import epoch_of, expand_axes, sweep_variants
from daemon.resolver.wildcards import Wildcards, has_dynamic_syntax

_BARE_LORA_TAG = re.compile(r"<lora:([^:<>]+)>", re.IGNORECASE)  # a tag without a weight


class Resolution(NamedTuple):
    """A checked job: the job as written, its renders in order, and warnings for the user.
    A tuple, so that `spec, renders, warnings = resolver.parse(...)` unpacks it."""

    spec: JobSpec
    renders: list[RenderSpec]
    warnings: list[str]


class JobResolver:
    """Checks jobs against what this host knows and expands them into render specs.

    Built from the config, the checkpoint registry, the LoRA and embedding libraries and the
    plugins, and nothing else: no store of its own, no jobs/ folder. The registry and the
    LoRA library are read as they stand (whoever owns them scans them); the embedding folder
    is rescanned for every job, so an embedding dropped with the job is found."""

    def __init__(self, config: Config, registry: Registry, library: LoraLibrary,
                 embeddings: EmbeddingLibrary, plugins: Plugins) -> None:
        self.config = config
        self.registry = registry
        self.library = library
        self.embeddings = embeddings
        self.plugins = plugins

    def parse(self, file_name: str, raw: bytes) -> Resolution:
        """Turn a job file's bytes into checked render specs; raises JobFileError."""
        suffix = Path(file_name).suffix.lower()
        parser = self.plugins.job_parsers.get(suffix)
        if parser is None:
            known = ", ".join(sorted(self.plugins.job_parsers)) or "none"
            raise JobFileError(f"`{suffix or file_name}` is not a job file type lorafarm reads",
                               fix=f"save the job as one of: {known}")
        binary = suffix in self.plugins.binary_parsers
        try:
            text = "" if binary else decode_job_bytes(raw)  # binary: no lines, errors name keys
        except JobFileError as exc:
            raise wrong_suffix(exc, file_name, raw, self.plugins.job_parsers) from exc
        try:
            data = parser(raw if binary else text)
        except JobFileError as exc:
            raise wrong_suffix(exc, file_name, raw, self.plugins.job_parsers) from exc
        except PLUGIN_ERRORS as exc:
            fault = parser_fault(suffix, parser, self.plugins.plugin_of_parser(suffix), exc)
            raise wrong_suffix(fault, file_name, raw, self.plugins.job_parsers) from exc
        if not isinstance(data, dict):
            raise JobFileError(
                f"the {suffix} job parser (plugin "
                f"{self.plugins.plugin_of_parser(suffix)!r}) returned "
                f"{type(data).__name__}, not a table of job keys",
                fix="this is a bug in that plugin; save the job as TOML meanwhile")
        try:
            spec = check_job(data, text, self.config.limits)
            if spec.hires is not None:
                spec = replace(spec, hires=check_hires(spec.hires, text, self.config.limits))
            return self.resolve(spec, text)
        except JobFileError:
            raise
        except PLUGIN_ERRORS as exc:
            raise check_fault(exc, self.plugins) from exc

    def resolve(self, job: JobSpec, text: str = "") -> Resolution:
        """Check the job against the registry and its family; expand it into renders."""
        spec = job  # `job` stays as written: it is what the history records
        if spec.checkpoint_hash:
            # A re-render names the model by hash first: the file may have another name here.
            by_hash = self.registry.find_by_hash(spec.checkpoint_hash)
            if by_hash is not None:
                spec = replace(spec, checkpoint=by_hash.name)
        warnings: list[str] = []
        prompt_lines = None
        if spec.prompts_file is not None:
            path = find_input_file(spec.prompts_file, self.config.paths.input_roots,
                                   "prompts_file", text)
            prompt_lines = read_prompt_file(path, self.config.limits, warnings)
        checkpoints: dict[str, tuple[CheckpointInfo, Family, dict[str, object]]] = {}
        axis_names: list[str] = []
        if not spec.sweep and prompt_lines is None:
            variants: list[tuple[JobSpec, dict[str, object]]] = [(spec, {})]
        else:
            lora_names = sorted({info.name for info in self.library.all(anywhere=True)
                                 if info.state == "ok"})
            axes = expand_axes(spec, text, lora_names, prompt_lines)
            axis_names = [axis.name for axis in axes]
            variants = sweep_variants(spec, text, axes, self.config.limits.max_count)
        wildcards = Wildcards(self.config.paths.wildcards)
        self.embeddings.scan()  # an embedding dropped with the job is found
        renders: list[RenderSpec] = []
        for variant, labels in variants:
            if variant.checkpoint not in checkpoints:
                found, its_family = self._checkpoint(variant.checkpoint, text)
                checkpoints[variant.checkpoint] = (found, its_family,
                                                   self.registry.preset(found))
            info, family, preset = checkpoints[variant.checkpoint]
            variant = apply_preset(variant, preset)
            vae = info.components.get("vae")
            if vae is not None:
                # A1111's infotext names the VAE and its hash (sha256, 10 hex).
                vae_record: dict[str, object] = {"vae": vae.name,
                                                 "vae_hash": file_hash(vae)[:10]}
            else:
                vae_record = {}
            for expanded, record in self._wildcard_variants(variant, wildcards, text):
                variant_renders, notes = self._expand(expanded, family, text, info)
                if labels:
                    record = {**record, "sweep": labels, "sweep_axes": axis_names}
                    swept = next((lora for lora in expanded.loras[len(spec.loras):]), None)
                    epoch = epoch_of(swept.name) if swept is not None else None
                    if epoch is not None:
                        record["epoch"] = epoch
                renders += [replace(r, extra={**r.extra, **vae_record, **record})
                            for r in variant_renders]
                warnings += [n for n in notes if n not in warnings]
        return Resolution(job, renders, warnings)

    def _checkpoint(self, name: str, text: str) -> tuple[CheckpointInfo, Family]:
        """The usable checkpoint a job (or one value of its checkpoint axis) names, and its
        family; raises JobFileError saying what is wrong and how to fix it."""
        info = self.registry.find(name)
        line = line_of_key(text, "checkpoint")
        if info is None or info.state == "missing":
            known = self.registry.known_names()
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close else
                    f"known checkpoints: {', '.join(known) or 'none yet'}")
            raise JobFileError(f"unknown checkpoint {name!r}", key="checkpoint",
                               line=line, fix=f"{hint} Put the model under "
                               f"{self.config.paths.models} (a diffusers folder or a "
                               ".safetensors file); `lorafarm models` lists what is known")
        if info.state != "ok" or info.family is None:
            fix = "fix or replace the model file (see `lorafarm models`)"
            if PROBE_FAULT in (info.reason or ""):  # a plugin's bug, not the model's
                fix = (f"update or remove the plugin named above (`lorafarm plugins`), or set "
                       f'[checkpoints."{name}"] family = "..." in config.toml')
            raise JobFileError(f"checkpoint {name!r} cannot be used: {info.reason}",
                               key="checkpoint", line=line, fix=fix)
        family = self.plugins.families.get(info.family)
        if family is None:
            raise JobFileError(f"checkpoint {name!r} is a {info.family} model but the "
                               f"{info.family} family plugin is not installed", key="checkpoint",
                               line=line, fix="install the family plugin or pick another model")
        problem = family.missing_requirements(info.loaded())
        if problem:
            raise JobFileError(problem, key="checkpoint", line=line,
                               fix="set it in config.toml, then drop the job file again")
        return info, family

    def _wildcard_variants(self, spec: JobSpec, wildcards: Wildcards,
                           text: str) -> list[tuple[JobSpec, dict[str, object]]]:
        """The job once per drawn (or, with `combinatorial`, every) expansion of the
        wildcards in its prompts, with the template to record; the job itself when there
        are none. A random draw is seeded from each render's seed."""
        if not (has_dynamic_syntax(spec.prompt) or has_dynamic_syntax(spec.negative_prompt)):
            return [(spec, {})]
        for key, template in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt)):
            if template:
                wildcards.check(template, key, line_of_key(text, key))
        record: dict[str, object] = {"prompt_template": spec.prompt}
        if spec.negative_prompt is not None and has_dynamic_syntax(spec.negative_prompt):
            record["negative_prompt_template"] = spec.negative_prompt
        limit = self.config.limits.max_count
        if spec.combinatorial:
            prompts = wildcards.combinations(spec.prompt, limit, "prompt",
                                             line_of_key(text, "prompt"))
            if len(prompts) > limit:
                raise JobFileError(f"the prompt's wildcards make more than {limit} combinations",
                                   key="combinatorial", line=line_of_key(text, "combinatorial"),
                                   fix="use fewer choices, or remove combinatorial to draw one "
                                       "prompt per seed (limits.max_count in config.toml)")
            seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
            return [(replace(spec, prompt=prompt, seed=seed, negative_prompt=_draw(
                wildcards, spec.negative_prompt, seed)), record) for prompt in prompts]
        seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
        return [(replace(spec, seed=seed + i, count=1,
                         prompt=wildcards.random(spec.prompt, seed + i, "prompt",
                                                 line_of_key(text, "prompt")),
                         negative_prompt=_draw(wildcards, spec.negative_prompt, seed + i)),
                 record) for i in range(spec.count)]

    def _expand(self, spec: JobSpec, family: Family, text: str,
                checkpoint: CheckpointInfo) -> tuple[list[RenderSpec], list[str]]:
        d = family.defaults_for(checkpoint.variant)
        warnings: list[str] = []
        try:
            choice = choose_sampler(spec.sampler or d.sampler,
                                    None if spec.sampler else d.schedule, family.sampler_kind)
        except SamplerError as exc:
            fitting = ", ".join(samplers_for_kind(family.sampler_kind))
            raise JobFileError(f"{exc} ({family.display_name})", key="sampler",
                               line=line_of_key(text, "sampler"),
                               fix=f"use one of the samplers that fit: {fitting}") from exc
        sampler, schedule = choice.sampler, choice.schedule
        width = spec.width or d.width
        height = spec.height or d.height
        if spec.image is not None and spec.width is None and spec.height is None:
            with Image.open(self.input_image(spec.image, text)) as image:
                fitted = family.size_for_image(checkpoint.variant, *image.size)
            if fitted is not None:
                width, height = fitted
        for key, value in (("width", width), ("height", height)):
            if value % d.size_multiple:
                lower = value - value % d.size_multiple
                raise JobFileError(
                    f"`{key}` = {value} is not a multiple of {d.size_multiple}, which "
                    f"{family.display_name} needs", key=key, line=line_of_key(text, key),
                    fix=f"use {lower} or {lower + d.size_multiple}")
        if d.cfg_fixed is not None and spec.cfg is not None and spec.cfg != d.cfg_fixed:
            alternatives = ["remove cfg"]
            if d.guidance is not None:
                alternatives.append(f"set `guidance` (default {d.guidance:g}) for its distilled "
                                    "guidance")
            if family.supports_true_cfg:
                alternatives.append("set `true_cfg` with a negative prompt for real CFG")
            alternatives.append("or use a base (non-distilled) checkpoint")
            raise JobFileError(
                f"this {family.display_name} checkpoint is distilled to run without CFG "
                f"(cfg {d.cfg_fixed:g}); `cfg` = {spec.cfg:g} would not be applied",
                key="cfg", line=line_of_key(text, "cfg"), fix="; ".join(alternatives))
        if spec.true_cfg is not None and not family.supports_true_cfg:
            raise JobFileError(f"{family.display_name} has no true CFG mode", key="true_cfg",
                               line=line_of_key(text, "true_cfg"),
                               fix="remove true_cfg (use cfg where the family has it)")
        if spec.guidance is not None and d.guidance is None:
            raise JobFileError(f"{family.display_name} has no embedded guidance", key="guidance",
                               line=line_of_key(text, "guidance"),
                               fix="remove guidance; use cfg for classifier-free guidance")
        if (spec.negative_prompt and not family.supports_negative_prompt
                and spec.true_cfg is None):
            fix = ("remove negative_prompt, or set true_cfg = 4.0 for real CFG (twice the "
                   "compute per step)" if family.supports_true_cfg else
                   "remove negative_prompt from the job")
            raise JobFileError(f"{family.display_name} takes no negative prompt",
                               key="negative_prompt",
                               line=line_of_key(text, "negative_prompt"), fix=fix)
        clip_skip = self._clip_skip(spec, family, d, text)
        prompt_text, loras = self._resolve_loras(spec, family, checkpoint, text, warnings)
        prompt, negative, convention_notes = family.apply_conventions(
            prompt_text, spec.negative_prompt, spec.conventions)
        warnings.extend(convention_notes)
        seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
        extra: dict[str, object] = {}
        if d.guidance is not None:
            extra["guidance"] = spec.guidance if spec.guidance is not None else d.guidance
        if spec.true_cfg is not None:
            extra["true_cfg"] = spec.true_cfg
        if checkpoint.quantization:
            # The checkpoint's form ("GGUF Q4_0") changes the pixels: it goes into the history,
            # the batch key and (via Family.infotext_fields) every output's infotext.
            extra["quantization"] = checkpoint.quantization
        extra.update(self._video_settings(spec, family, d, checkpoint.variant, text))
        extra.update(self._refine_settings(spec, family, d, width, height, text, warnings))
        embeddings = self._resolve_embeddings(spec, family, prompt, negative, text)
        if embeddings:
            extra["embeddings"] = embeddings
        warnings.extend(w for w in spec.rerender_warnings if w not in warnings)
        renders = [
            RenderSpec(
                family=family.name, checkpoint=spec.checkpoint, prompt=prompt,
                negative_prompt=negative, seed=seed + i, steps=spec.steps or d.steps,
                cfg=spec.cfg if spec.cfg is not None else d.cfg, sampler=sampler,
                schedule=schedule, width=width, height=height, user_prompt=spec.prompt,
                checkpoint_hash=checkpoint.model_hash, clip_skip=clip_skip, loras=loras,
                extra=dict(extra),
            )
            for i in range(spec.count)
        ]
        return renders, warnings

    @staticmethod
    def _clip_skip(spec: JobSpec, family: Family, d: FamilyDefaults, text: str) -> int | None:
        """The job's `clip_skip` where the family applies it (Family.clip_skip_levels); a
        family without the setting takes only its own default (e.g. Pony's recorded 2)."""
        if spec.clip_skip is None or spec.clip_skip == d.clip_skip:
            return d.clip_skip
        levels = family.clip_skip_levels
        if spec.clip_skip not in levels:
            fix = (f"use clip_skip = {' or '.join(map(str, levels))}" if levels else
                   "remove clip_skip")
            said = (f"takes clip skip {', '.join(map(str, levels))} only" if levels else
                    "has no clip skip setting")
            raise JobFileError(f"`clip_skip` = {spec.clip_skip}: {family.display_name} {said}",
                               key="clip_skip", line=line_of_key(text, "clip_skip"), fix=fix)
        return spec.clip_skip

    def _video_settings(self, spec: JobSpec, family: Family, d: FamilyDefaults,
                        variant: str | None, text: str) -> dict[str, object]:
        """frames, fps, image, guidance_2 and flow_shift: checked against the family and the
        checkpoint's variant defaults `d`."""
        settings: dict[str, object] = {}
        if family.produces != "video":
            for key in ("frames", "fps"):
                if getattr(spec, key) is not None:
                    raise JobFileError(f"`{key}` is for video families; {family.display_name} "
                                       "renders images", key=key, line=line_of_key(text, key),
                                       fix=f"remove {key}")
        else:
            frames = spec.frames if spec.frames is not None else d.frames or 1
            step = d.frame_step
            if (frames - 1) % step:
                lower = frames - (frames - 1) % step
                options = [n for n in (lower, lower + step) if n >= 1]
                raise JobFileError(
                    f"`frames` = {frames}: {family.display_name} needs {step}k+1 frames",
                    key="frames", line=line_of_key(text, "frames"),
                    fix=f"use {' or '.join(str(n) for n in options)}")
            settings["frames"] = frames
            settings["fps"] = spec.fps if spec.fps is not None else d.fps or 16
        for key, default in (("guidance_2", d.guidance_2), ("flow_shift", d.flow_shift)):
            value = getattr(spec, key)
            if value is not None and default is None:
                raise JobFileError(f"{family.display_name} has no `{key}` setting", key=key,
                                   line=line_of_key(text, key), fix=f"remove {key}")
            if default is not None:
                settings[key] = value if value is not None else default
        wants_image = family.image_input(variant)
        if spec.image is None and wants_image == "required":
            raise JobFileError(f"this {family.display_name} checkpoint animates an input image: "
                               "the job needs `image`", key="image",
                               fix='add image = "start.png" (a file in the inputs folder)')
        if spec.image is not None:
            if wants_image == "none":
                raise JobFileError(f"this {family.display_name} checkpoint takes no input image",
                                   key="image", line=line_of_key(text, "image"),
                                   fix="remove image, or use an image-to-video checkpoint")
            path = self.input_image(spec.image, text)
            settings["image"] = spec.image
            # The absolute path is for the worker; `image` and its hash are for the record.
            settings["image_path"] = str(path)
            settings["image_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        return settings

    def _resolve_embeddings(self, spec: JobSpec, family: Family, prompt: str, negative: str,
                            text: str) -> list[dict[str, str]]:
        """The textual-inversion embeddings the prompts name (A1111: an embedding's name as a
        word of either prompt), plus a re-render's `embedding_hashes` found by hash, then by
        name; each checked against the checkpoint's architecture."""
        chosen: dict[str, EmbeddingInfo] = {}
        missing = []
        for name, digest in spec.embedding_hashes.items():
            found = self.embeddings.find_by_hash(digest) or next(
                (info for info in self.embeddings.all()
                 if info.name.lower() == name.lower() and info.state == EMBEDDING_OK), None)
            if found is None:
                missing.append(f"{name} (hash {digest})")
            else:
                chosen[name] = found
        if missing:
            folders = ", ".join(str(p) for p in self.config.paths.embedding_folders)
            raise JobFileError(f"embedding(s) not found by hash or by name: "
                               f"{', '.join(missing)}", key="embedding_hashes",
                               line=line_of_key(text, "embedding_hashes"),
                               fix=f"put the .safetensors file(s) into {folders}")
        taken = {name.lower() for name in chosen}
        hires = spec.hires or {}
        for info in self.embeddings.named_in(prompt, negative, hires.get("prompt", ""),
                                             hires.get("negative_prompt", "")):
            if info.name.lower() not in taken:
                chosen[info.name] = info
        used = []
        for name, info in sorted(chosen.items()):
            where = "negative_prompt" if name.lower() not in prompt.lower() else "prompt"
            if info.state != EMBEDDING_OK:
                raise JobFileError(f"the {where} names embedding {name!r} ({info.path}), which "
                                   f"is {info.state}: {info.reason}", key=where,
                                   line=line_of_key(text, where),
                                   fix="replace the file with an SDXL .safetensors embedding, "
                                       "or remove the word from the prompt")
            if info.architecture != family.architecture:
                owner = self.plugins.families.get(info.family or "")
                made_for = owner.display_name if owner else info.family
                raise JobFileError(f"the {where} names embedding {name!r}, which is for "
                                   f"{made_for} ({info.architecture} text encoders), but "
                                   f"checkpoint {spec.checkpoint!r} is {family.display_name}",
                                   key=where, line=line_of_key(text, where),
                                   fix=(f"use a {family.display_name} embedding, or remove "
                                        "the word from the prompt")
                                   if type(family).probe_embedding is not Family.probe_embedding
                                   else f"{family.display_name} takes no textual-inversion "
                                        "embeddings: remove the word from the prompt, or "
                                        "rename the embedding file if the word is meant")
            used.append({"name": name, "file": info.name, "autov2": info.autov2 or "",
                         "path": str(info.path)})
        return used

    def _refine_settings(self, spec: JobSpec, family: Family, d: FamilyDefaults, width: int,
                         height: int, text: str, warnings: list[str]) -> dict[str, object]:
        """`[hires]` and image-to-image's `denoising_strength`, checked against the family
        (see daemon/contract/hires.py)."""
        settings: dict[str, object] = {}
        img2img = spec.image is not None and family.produces == "image"
        if spec.denoising_strength is not None and not img2img:
            raise JobFileError("`denoising_strength` is for image-to-image: the job gives no "
                               "`image`", key="denoising_strength",
                               line=line_of_key(text, "denoising_strength"),
                               fix='add image = "input.png" (in the inputs folder), or put '
                                   "denoising_strength into [hires] for the hires pass")
        if img2img:
            if not family.supports_img2img:
                raise JobFileError(f"{family.display_name} has no image-to-image here",
                                   key="image", line=line_of_key(text, "image"),
                                   fix="remove image, or use an SDXL-lineage checkpoint")
            settings["denoising_strength"] = (spec.denoising_strength
                                              if spec.denoising_strength is not None
                                              else DEFAULT_IMG2IMG_DENOISING)
        if spec.mask is not None:
            line = line_of_key(text, "mask")
            if not img2img:
                raise JobFileError("`mask` is for inpainting: the job gives no `image`",
                                   key="mask", line=line,
                                   fix='add image = "input.png" beside the mask')
            if not family.supports_inpainting:
                raise JobFileError(f"{family.display_name} has no inpainting here", key="mask",
                                   line=line, fix="remove mask")
            path = self.input_image(spec.mask, text, key="mask")
            settings["mask"] = spec.mask
            settings["mask_path"] = str(path)
            settings["mask_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        if spec.hires is None:
            return settings
        line = line_of_key(text, "hires") or line_of_key(text, "scale")
        if not family.supports_hires:
            raise JobFileError(f"{family.display_name} has no hires fix", key="hires", line=line,
                               fix="remove [hires], or render at the size you want")
        if img2img:
            raise JobFileError("[hires] is for text-to-image; this job gives an `image`",
                               key="hires", line=line,
                               fix="remove [hires], or set the img2img width/height larger")
        if spec.hires.get("sampler"):
            try:
                choose_sampler(spec.hires["sampler"], None, family.sampler_kind)
            except SamplerError as exc:
                raise JobFileError(f"hires.sampler: {exc}", key="hires.sampler", line=line,
                                   fix="use one of: "
                                   + ", ".join(samplers_for_kind(family.sampler_kind))) from exc
        hires, upscaler_model = resolve_upscaler(spec.hires, self.config.postprocess, text,
                                                 warnings)
        target_w, target_h = hires_target(width, height, spec.hires, d.size_multiple)
        limits = self.config.limits
        if not (64 <= target_w <= limits.max_width and 64 <= target_h <= limits.max_height):
            raise JobFileError(f"the hires size {target_w}x{target_h} is out of range (64 to "
                               f"{limits.max_width}x{limits.max_height}, limits in config.toml)",
                               key="hires", line=line, fix="use a smaller scale or size")
        if "scale" in spec.hires and (target_w, target_h) != (
                int(width * spec.hires["scale"]), int(height * spec.hires["scale"])):
            warnings.append(f"hires: {width}x{height} x {spec.hires['scale']:g} renders at "
                            f"{target_w}x{target_h} ({family.display_name} needs multiples "
                            f"of {d.size_multiple})")
        settings["hires"] = dict(hires)
        if upscaler_model is not None:
            settings["hires_upscaler_model"] = str(upscaler_model)
        return settings

    def input_image(self, name: str, text: str, key: str = "image") -> Path:
        """The image a job names (`key`: image, or an inpainting mask), which must lie inside
        a configured inputs folder (no absolute paths, no `..`, no symlink leading out) and
        open as an image."""
        real = find_input_file(name, self.config.paths.input_roots, key, text,
                               example=f'{key} = "start.png"', kind="image")
        try:
            with Image.open(real) as image:
                image.verify()
        except PLUGIN_ERRORS as exc:
            raise JobFileError(f"`{key}` = {name!r} cannot be read as an image ({exc})",
                               key=key, line=line_of_key(text, key),
                               fix="save it again as PNG, JPEG or WEBP") from exc
        return real

    def _resolve_loras(self, spec: JobSpec, family: Family, checkpoint: CheckpointInfo,
                       text: str, warnings: list[str]) -> tuple[str, tuple[LoraUse, ...]]:
        """The job's LoRAs from `[[loras]]` and `<lora:...>` prompt tags, each checked against
        the library, the checkpoint's architecture and its lineage. Returns the prompt without
        tags (plus trigger words when asked) and the LoRAs to apply."""
        try:
            prompt, tagged = extract_lora_tags(spec.prompt)
        except PromptTagError as exc:
            raise JobFileError(str(exc), key="prompt", line=line_of_key(text, "prompt"),
                               fix="write tags as <lora:NAME:WEIGHT>") from exc
        wanted = [(lora.name, lora.strength, lora.text_encoder_strength, "loras")
                  for lora in spec.loras]
        # Named without a strength: the LoRA's own preferred weight (A1111 NAME.json) applies.
        unweighted = {lora.name for lora in spec.loras if not lora.strength_given}
        unweighted |= {match.group(1).strip() for match in _BARE_LORA_TAG.finditer(spec.prompt)}
        experts = {lora.name: lora.expert for lora in spec.loras if lora.expert}
        wanted += [(tag.name, tag.strength, tag.text_encoder_strength, "prompt")
                   for tag in tagged]
        names = [name for name, *_ in wanted]
        for name in names:
            if names.count(name) > 1:
                raise JobFileError(f"LoRA {name!r} is named twice", key="loras",
                                   line=line_of_key(text, "loras"),
                                   fix="name each LoRA once, in [[loras]] or as a prompt tag")
        uses: list[LoraUse] = []
        triggers: list[str] = []
        for name, strength, te_strength, where in wanted:
            key = "loras" if where == "loras" else "prompt"
            line = line_of_key(text, key) or line_of_key(text, "name")
            try:
                by_hash = self.library.find_by_hash(spec.lora_hashes.get(name, ""))
                infos = [by_hash] if by_hash else self.library.resolve_all(name)
            except LoraLookupError as exc:
                raise JobFileError(str(exc), key=key, line=line,
                                   fix="put the .safetensors file under "
                                       f"{self.config.paths.loras}, or fix the name") from exc
            for info in infos:
                self._check_lora_fits(info, family, checkpoint, spec, key, line, warnings)
                preferred = preferred_weight(info.path) if name in unweighted else None
                if preferred is not None:
                    strength, te_strength = preferred, None
                # A HIGH/LOW pair is two files, each for its own expert.
                expert = experts.get(name) if len(infos) == 1 else info.expert
                uses.append(LoraUse(name=info.name, strength=strength,
                                    text_encoder_strength=te_strength, autov2=info.autov2,
                                    autov3=info.autov3, expert=expert or info.expert))
                if spec.trigger_words:
                    triggers += [t for t in info.triggers
                                 if t not in prompt and t not in triggers]
        if triggers:
            prompt = f"{prompt}, {', '.join(triggers)}"
        return prompt, tuple(uses)

    def _check_lora_fits(self, info: LoraInfo, family: Family, checkpoint: CheckpointInfo,
                         spec: JobSpec, key: str, line: int | None,
                         warnings: list[str]) -> None:
        """Refuse a LoRA of another architecture, size or lineage; warn when unsure."""
        if info.architecture != family.architecture:
            raise JobFileError(
                f"LoRA {info.name!r} is for {info.family} ({info.architecture} architecture) "
                f"but checkpoint {checkpoint.name!r} is {family.display_name} "
                f"({family.architecture}); a LoRA only works on the architecture it was "
                "trained for", key=key, line=line,
                fix=f"use a {family.display_name} LoRA, or a {info.family} checkpoint")
        misfit = family.lora_fits(info.variant, checkpoint.variant)
        if misfit:
            raise JobFileError(f"LoRA {info.name!r} does not fit checkpoint {checkpoint.name!r}: "
                               f"{misfit}", key=key, line=line,
                               fix="use a LoRA trained for this model size/variant")
        lora_lineage, model_lineage = info.lineage, checkpoint.lineage
        if lora_lineage and model_lineage and lora_lineage != model_lineage:
            message = (f"LoRA {info.name!r} is {lora_lineage} lineage ({info.lineage_source}) but "
                       f"checkpoint {checkpoint.name!r} is {model_lineage}; {lora_lineage} "
                       f"LoRAs do not carry over to {model_lineage} models")
            if not spec.allow_cross_lineage:
                raise JobFileError(
                    message, key=key, line=line,
                    fix="use a LoRA of the checkpoint's lineage, set allow_cross_lineage = "
                        "true to try anyway, or correct the lineage in a sidecar "
                        f"{info.name}.toml (lineage = \"...\") if the guess is wrong")
            warnings.append(message + " (allowed by allow_cross_lineage)")
        elif not lora_lineage or not model_lineage:
            unknown = [what for what, value in (("LoRA " + repr(info.name), lora_lineage),
                                                ("checkpoint " + repr(checkpoint.name),
                                                 model_lineage)) if not value]
            warnings.append(f"lineage unknown for {' and '.join(unknown)}; cannot check "
                            "that they match (set lineage in a sidecar NAME.toml)")


@functools.lru_cache(maxsize=64)
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_hash(path: Path) -> str:
    """sha256 of a file, computed once per version of it (a VAE is hashed at intake)."""
    stat = path.stat()
    return _file_hash(path, stat.st_size, stat.st_mtime_ns)


def _draw(wildcards: Wildcards, template: str | None, seed: int) -> str | None:
    if template is None or not has_dynamic_syntax(template):
        return template
    return wildcards.random(template, seed, "negative_prompt")


