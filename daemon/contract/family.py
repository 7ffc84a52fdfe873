"""What a model family plugin provides, and the plain data it exchanges with the core.

A Family is one object per model family (SDXL, Pony, Flux.1 dev, ...), registered through
the `register_families` hook. The core never imports a family module directly: it asks every
registered family to recognise a checkpoint, then hands renders of that checkpoint to the
family that recognised it. Plugins import all of this from `daemon.plugin_api`;
docs/writing-a-family.md is the guide.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config import OFFLOAD_MODES
from daemon.contract.pipeline_facts import pipeline_facts
from daemon.contract.prompt_weights import parse_prompt
from daemon.formats.gguf_header import GgufHeader
from daemon.formats.lora_probe import LoraFacts
from daemon.formats.safetensors_header import SafetensorsHeader

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from daemon.contract.spec import LoraUse, RenderSpec

log = logging.getLogger(__name__)


class RenderError(RuntimeError):
    """A render cannot succeed as asked (bad LoRA, impossible settings); not worth a retry."""


class BatchAborted(RuntimeError):
    """Raised from the step callback when the daemon is told to abort the running batch."""


class Progress:
    """Handed to `Family.render_batch`: pass `progress.callback` as the pipeline's
    `callback_on_step_end`. It reports each finished step (for the live display, the status
    page and the render lease's heartbeat) and stops the pipeline when the batch is aborted.
    """

    def __init__(self, total_steps: int, on_step: Callable[[int, int], None],
                 should_abort: Callable[[], bool]) -> None:
        self.total_steps = total_steps
        self.on_step = on_step
        self.should_abort = should_abort

    def callback(self, _pipe: Any, step: int, _timestep: Any,
                 callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.should_abort():
            raise BatchAborted("aborted by a second stop signal")
        self.on_step(step + 1, self.total_steps)
        return callback_kwargs

    def stage(self, done: int, total: int) -> Progress:
        """The progress of one pipeline call among several for one batch (a hires fix's
        second pass): its steps count on from `done`, out of `total` for the whole batch."""
        return Progress(total, lambda step, _total: self.on_step(done + step, total),
                        self.should_abort)



def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object (a diffusers config or model_index.json), or None when
    it is missing, unreadable or not an object; callers say what that means for them."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

@dataclass(frozen=True)
class FamilyDefaults:
    """What a job gets for every key it leaves out: the settings the model's makers (or, for
    community models, the settings most of its users) render with. docs/writing-a-family.md
    says where to find them."""

    width: int
    height: int
    steps: int
    cfg: float
    sampler: str  # A1111 name
    schedule: str | None
    negative_prompt: str = ""
    clip_skip: int | None = None  # A1111's "Clip skip"; see Family.clip_skip_levels
    size_multiple: int = 8  # width and height must be multiples of this
    guidance: float | None = None  # embedded (distilled) guidance, e.g. Flux.1 dev 3.5
    # Video families: frame count and rate; a clip must have frame_step * k + 1 frames.
    frames: int | None = None
    fps: int | None = None
    frame_step: int = 4
    flow_shift: float | None = None  # None: the checkpoint's scheduler setting
    guidance_2: float | None = None  # a second expert's guidance (Wan 2.2 low-noise)
    # A distilled model that runs without CFG: a job may not ask for another cfg value.
    cfg_fixed: float | None = None


@dataclass(frozen=True)
class RenderedVideo:
    """A video family's output for one render: RGB frames and their rate."""

    frames: list[Image.Image]
    fps: int


@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint candidate under models/, as far as it can be known without loading it."""

    name: str
    path: Path
    # "folder" (diffusers, model_index.json) | "single_file" (.safetensors) | "gguf" (.gguf)
    kind: str
    header: SafetensorsHeader | None = None  # single files
    model_index: dict[str, Any] | None = None  # folders
    gguf: GgufHeader | None = None  # GGUF files: only families that load GGUF look at it
    # From the sidecar / config.toml, for probes that need the base folder (e.g. which Wan
    # release a GGUF expert belongs to) and the second expert of a GGUF pair.
    config_path: Path | None = None
    transformer_2: Path | None = None

    @classmethod
    def for_folder(cls, name: str, path: Path) -> CheckpointSource:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        return cls(name=name, path=path, kind="folder", model_index=index)

    @property
    def metadata(self) -> dict[str, str]:
        if self.gguf is not None:
            return self.gguf.metadata
        return self.header.metadata if self.header else {}

    def tensor_table(self) -> SafetensorsHeader | None:
        """The file's tensor names, shapes and dtypes, for a safetensors file or a GGUF file
        alike (GGUF dtypes are GGML type names such as "Q8_0"); None for folders. A family
        that cannot load GGUF must not claim a GGUF file: it checks `kind` first."""
        if self.gguf is not None:
            return self.gguf.as_safetensors_header()
        return self.header


@dataclass(frozen=True)
class CheckpointProbe:
    """A family's answer to "is this checkpoint yours?"."""

    family: str
    score: float  # 0..1; the registry takes the best score, and reports ties
    reason: str  # what in the header made the family say so
    lineage: str | None = None
    variant: str | None = None


@dataclass(frozen=True)
class LoraProbe:
    """A family's answer to "is this LoRA for your models?"."""

    family: str
    architecture: str
    score: float  # 0..1; the best score wins, ties are reported
    reason: str
    lineage: str | None = None  # within an architecture (sdxl, pony, illustrious); None unknown
    lineage_source: str | None = None  # what decided the lineage, for the user
    variant: str | None = None
    expert: str | None = None  # Wan 2.2: the noise expert it was trained for (high/low/both)


@dataclass(frozen=True)
class EmbeddingProbe:
    """A family's answer to "is this textual-inversion embedding for your models?"."""

    reason: str  # what in the file made the family say so
    vectors: int  # how many tokens the embedding stands for


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What the worker hands a family to load a pipeline from.

    Where weights and configs come from depends on `kind`; the properties say it plainly:
    a diffusers folder (`folder`) holds both; a single file (`weights_file`, a .safetensors
    or .gguf) holds weights only, and its configs come from `config_folder`, a local
    diffusers folder the user names in config.toml (`config = "..."`), or None when unset.
    `path` and `config_path` are the raw fields behind them.
    """

    name: str
    path: Path  # the folder (kind "folder") or the file (kind "single_file" / "gguf")
    kind: str  # "folder" | "single_file" | "gguf"
    config_path: Path | None  # single files only: the config folder set in config.toml
    lineage: str | None = None
    variant: str | None = None
    quantization: str | None = None  # "GGUF Q8_0", "FP8 e4m3fn"; None: stored as released
    transformer_2: Path | None = None  # a GGUF pair's second (low-noise) expert file
    # Component files named for this checkpoint (config.toml / sidecar `text_encoder`,
    # `text_encoder_2`, `vae`), already found on disk; they replace the config folder's
    # weights for those components (see families/shared/components.py).
    components: dict[str, Path] = field(default_factory=dict)
    # The UI trees' folders of such files, by kind ("text_encoders", "vae"): where a family
    # may pair a component the config folder lacks weights for (Paths.component_folders).
    component_folders: dict[str, tuple[Path, ...]] = field(default_factory=dict)

    @property
    def folder(self) -> Path | None:
        """The diffusers folder (model_index.json, configs and weights) of a folder
        checkpoint, for `from_pretrained`; None for single files."""
        return self.path if self.kind == "folder" else None

    @property
    def weights_file(self) -> Path | None:
        """The one file holding a single-file checkpoint's weights (A1111 / ComfyUI layout,
        or GGUF), for `from_single_file`; None for folders."""
        return None if self.kind == "folder" else self.path

    @property
    def config_folder(self) -> Path | None:
        """Where the pipeline's configs, tokenizers and scheduler settings come from: the
        folder itself for a folder checkpoint; for a single file, the local diffusers folder
        set in config.toml (`from_single_file(config=...)`), or None when none is set (a
        family says so in `missing_requirements`; lorafarm never downloads one)."""
        return self.path if self.kind == "folder" else self.config_path


@dataclass
class DemoAssets:
    """What a family's demo builder wrote: config.toml overrides and sample jobs."""

    checkpoint_overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)  # file name -> job file text


class Family(ABC):
    """Base class for family plugins. Subclasses set the class attributes and implement the
    three abstract methods; the rest has defaults that suit most diffusers image pipelines.

    The core calls a family at four moments, never loading weights before the last:

    1. inventory (start-up, a new file under models/ or loras/): `probe_checkpoint` with a
       `CheckpointSource` (header or model_index.json only) and `probe_lora` with a LoRA's
       header and `LoraFacts`; the best score claims the file;
    2. intake (a job file arrives): `missing_requirements`, `defaults_for`, `lora_fits`,
       `apply_conventions`, `image_input`; a problem becomes an error naming the job's key;
    3. scheduling: `batch_cost` and `weights_cost` size the batches;
    4. the worker: `load_pipeline` once per checkpoint (then `apply_offload`), `load_lora`
       and `lora_strengths` per LoRA set, `render_batch` per batch of specs sharing a batch
       key, `infotext_fields` per output file.

    `build_demo` is optional: it lets `lorafarm demo` and tests build tiny checkpoints.
    """

    name: str  # unique plugin name, also what users write in config.toml overrides
    architecture: str  # families with equal architecture share LoRA shapes (e.g. "sdxl")
    display_name: str
    sampler_kind: str = "eps"  # "eps" (SD-style samplers) or "flow" (flow matching)
    defaults: FamilyDefaults
    supports_negative_prompt: bool = True
    # Families with distilled guidance can still run real CFG with a negative prompt when
    # the job sets `true_cfg` (diffusers' true_cfg_scale).
    supports_true_cfg: bool = False
    produces: str = "image"  # "image" or "video"
    takes_image: bool = False  # accepts the job key `image` (image-to-video)
    # A `[hires]` table (render, upscale, second denoising pass; see daemon/contract/hires.py): the
    # family's render_batch reads RenderSpec.extra["hires"].
    supports_hires: bool = False
    # Image-to-image: `image` + `denoising_strength` on an image family; render_batch reads
    # extra["image_path"] and extra["denoising_strength"].
    supports_img2img: bool = False
    # Inpainting: a `mask` beside the image; render_batch reads extra["mask_path"].
    supports_inpainting: bool = False
    # Loads quantized `.gguf` transformers (probe_checkpoint may claim kind "gguf" sources).
    reads_gguf: bool = False
    # Pipeline components it can take from files of their own (config.toml / sidecar keys
    # `text_encoder`, `text_encoder_2`, `vae`; see families/shared/components.py).
    component_files: tuple[str, ...] = ()
    # What the family does with A1111 weighting `(word:1.3)` and BREAK in prompts:
    # "a1111": it encodes them (a CLIP encoder family calls `encode_clip_prompts` in
    #   `render_batch`); `apply_conventions` warns about syntax compel cannot read;
    # "stripped": it hands its encoder `strip_explicit_weights` text and warns itself;
    # "unsupported" (the default): the text reaches the encoder as written, and
    #   `apply_conventions` warns each job that uses them.
    prompt_weighting: str = "unsupported"
    # A1111 "Clip skip" values a job may set with `clip_skip` (the family applies them);
    # empty: the family has no such setting, and a job may only repeat its default.
    clip_skip_levels: tuple[int, ...] = ()

    def defaults_for(self, variant: str | None) -> FamilyDefaults:
        """Defaults for one variant of the family's checkpoints (e.g. Klein distilled vs base);
        the family-wide defaults unless a family overrides this."""
        return self.defaults

    @abstractmethod
    def probe_checkpoint(self, source: CheckpointSource) -> CheckpointProbe | None:
        """Recognise a checkpoint from its header or model_index.json, loading no weights.

        Receives a `CheckpointSource`: a folder's `model_index`, a single file's `header`
        (tensor names, shapes, dtypes, metadata) or a GGUF file's `gguf`. Returns a
        `CheckpointProbe` (this family's name, a score 0..1, the reason the user sees in
        `lorafarm models`, optionally a lineage and variant), or None when it is not this
        family's. Must not raise for a file it does not know."""

    def probe_lora(self, header: SafetensorsHeader, facts: LoraFacts) -> LoraProbe | None:
        """Recognise a LoRA meant for this family's models from its header (no weights are
        loaded). Receives the file's `SafetensorsHeader` and `LoraFacts` (key layout,
        module names, rank, trigger words). Returns a `LoraProbe` whose `architecture` is
        this family's (LoRAs of one architecture may patch any checkpoint of it), or None.
        Intake refuses a LoRA whose architecture differs from the checkpoint's, so a probe
        must also say no to look-alikes (e.g. SD 1.x versus SDXL widths). The default
        recognises nothing."""
        return None

    def probe_embedding(self, header: SafetensorsHeader) -> EmbeddingProbe | None:
        """Recognise a textual-inversion embedding for this family's text encoders from its
        header (daemon/library/embeddings.py). The default recognises none: the family takes no
        embeddings, and a job naming one is refused."""
        return None

    def image_input(self, variant: str | None) -> str:
        """Whether a job for this variant gives an input image: "required", "optional" or
        "none" (checked at intake)."""
        return "optional" if self.takes_image or self.supports_img2img else "none"

    def size_for_image(self, variant: str | None, image_width: int,
                       image_height: int) -> tuple[int, int] | None:
        """The render size for a job that gives an image but no width/height (e.g. the
        default area at the image's aspect); None: the family defaults."""
        return None

    def lora_fits(self, lora_variant: str | None, checkpoint_variant: str | None) -> str | None:
        """Why a LoRA of this family's architecture still cannot patch this checkpoint (e.g.
        a Wan 14B LoRA on the 5B model), as a message; None when it fits."""
        return None

    def load_lora(self, pipe: Any, path: Path, adapter_name: str, lora: LoraUse) -> None:
        """Load one LoRA file into the pipeline as a named adapter. Families whose pipelines
        need another entry point (a second expert, a model-level loader) override this."""
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)

    def lora_strengths(self, lora: LoraUse) -> dict[str, float]:
        """Per-component adapter weights for `pipe.set_adapters` (e.g. UNet and text
        encoders), from the job's `strength` and `text_encoder_strength`. The keys are the
        pipeline's component names. The default applies `strength` to the denoiser only."""
        return {"transformer": lora.strength}

    def missing_requirements(self, checkpoint: LoadedCheckpoint) -> str | None:
        """What this checkpoint still needs before it can load (e.g. a config folder for a
        single file), as a message for the user; None when it is ready. Checked at intake."""
        return None

    def bfloat16_for_float16(self, dtype: torch.dtype) -> torch.dtype:
        """bfloat16 where float16 was asked for, for families whose models overflow float16
        (black or NaN images): the same memory, float32's range."""
        import torch

        if dtype != torch.float16:
            return dtype
        log.info("%s runs in bfloat16 instead of float16", self.display_name)
        return torch.bfloat16

    def require_loadable(self, checkpoint: LoadedCheckpoint) -> None:
        """Raise RenderError with `missing_requirements`' message, if any: the first step of
        `load_pipeline`, since files may have changed since intake checked them."""
        problem = self.missing_requirements(checkpoint)
        if problem:
            raise RenderError(problem)

    def apply_conventions(self, prompt: str, negative_prompt: str | None,
                          enabled: bool) -> tuple[str, str, list[str]]:
        """Return (prompt to encode, negative prompt, warnings), at intake. Receives the
        job's prompt (LoRA tags already taken out), its negative prompt (None: not given)
        and whether the job allows prompt conventions (`conventions = false` turns them
        off; e.g. Pony's score tags). The default applies the family's default negative
        prompt when the job gave none, and warns about A1111 weighting as
        `prompt_weighting` says."""
        negative = self.defaults.negative_prompt if negative_prompt is None else negative_prompt
        notes: list[str] = []
        for which, text in (("prompt", prompt), ("negative_prompt", negative)):
            parsed = parse_prompt(text)
            if self.prompt_weighting == "a1111":
                notes.extend(f"{which}: {warning}" for warning in parsed.warnings)
            elif self.prompt_weighting == "unsupported" and parsed.has_weights:
                notes.append(
                    f"{which}: {self.display_name} does not read A1111 weighting or BREAK; "
                    "they reach its text encoder as written, brackets and numbers included")
        return prompt, negative, notes

    @abstractmethod
    def load_pipeline(self, checkpoint: LoadedCheckpoint, device: torch.device,
                      dtype: torch.dtype) -> Any:
        """Load the checkpoint's pipeline through diffusers' real loading path, offline
        (`local_files_only=True`; never a download), and return it on `device` in `dtype`.

        Receives a `LoadedCheckpoint`: `folder` for `from_pretrained`, or `weights_file`
        with `config_folder` for `from_single_file(config=...)`. Start with
        `self.require_loadable(checkpoint)`. The returned object is what `load_lora`,
        `render_batch` and `apply_offload` receive; diffusers' `load_lora_weights`,
        `set_adapters` and `get_list_adapters` must work on it for LoRAs to apply."""

    @abstractmethod
    def render_batch(self, pipe: Any, specs: list[RenderSpec], device: torch.device,
                     progress: Progress | None = None,
                     ) -> list[Image.Image] | list[RenderedVideo]:
        """Render every spec and return one PIL image (or `RenderedVideo`) per spec, in order.

        The specs share a batch key (steps, sampler, size, LoRAs, ...) and differ in prompt
        and seed; render them in one pipeline call, with one generator per spec, so that an
        image does not depend on the batch it was in. `sampling_arguments` (plugin API)
        gives the call its steps, the job's sampler, the generators and the step callback
        (`progress.callback`, which also aborts the batch on a stop signal). Raise
        `RenderError` for a render that cannot succeed as asked."""

    def batch_cost(self, spec: RenderSpec) -> int:
        """Estimated accelerator memory (bytes) one render of `spec` adds to a batch; the
        scheduler divides the configured memory budget by it. The default scales with the
        latent size (and frames), calibrated on SDXL at fp16: ~0.9 GB per 1024x1024 image.

        A quantized checkpoint (spec.extra["quantization"]) costs the same here: GGUF and FP8
        weights are dequantized one layer at a time into the compute dtype, so activations
        are those of the unquantized model. What quantization changes is the weights' own
        memory: see `weights_cost`."""
        frames = int(spec.extra.get("frames", 1))
        width, height = spec.width, spec.height
        if spec.extra.get("hires"):
            # The hires fix's second pass runs at its target size: that is the peak.
            from daemon.contract.hires import hires_target

            width, height = hires_target(width, height, spec.extra["hires"],
                                         self.defaults.size_multiple)
        return int(0.9 * 2**30 * (width * height / 1024**2) * max(1, frames // 4 + 1))

    def component_sources(self, checkpoint: LoadedCheckpoint) -> dict[str, Path]:
        """The files the pipeline's parts load from instead of the config folder's weights
        (see `component_files`): the named ones here; a family that pairs parts from the UI
        trees by itself adds those. Headers only: `weights_cost` counts them."""
        return dict(checkpoint.components)

    def weights_cost(self, checkpoint: LoadedCheckpoint, dtype: torch.dtype,
                     offload: str = "none") -> int:
        """Accelerator bytes the loaded checkpoint's weights hold while it renders: what is
        left of a device's memory for batches is the device's memory minus this. From file
        headers alone (no weights read): a GGUF or FP8 denoiser counts at its stored size,
        since it stays quantized in memory, everything else at `dtype`. With offload, only
        the part on the accelerator at a time counts (model: the largest component; group /
        sequential: about one block, taken as 0)."""
        from daemon.formats.quantization import resident_weight_bytes

        return resident_weight_bytes(checkpoint, dtype, offload,
                                     components=self.component_sources(checkpoint))

    def apply_offload(self, pipe: Any, mode: str, device: torch.device) -> list[str]:
        """Put the loaded pipeline into the configured memory tier (worker.offload) and return
        what was turned on. Called once per load, on a pipeline `load_pipeline` built on the
        CPU (the worker loads there when a mode other than "none" is set), so the full model
        never has to fit on the device.

        * none: everything stays on the device (nothing to do);
        * model: diffusers' model CPU offload, one component on the device at a time;
        * group: diffusers' group offload, one transformer block (group) at a time, streamed
          ahead of its use on a side CUDA stream; the VAE stays on the device;
        * sequential: diffusers' sequential CPU offload, one layer at a time (slowest).

        Only CUDA has these; on the CPU they mean nothing and the call only logs.
        """
        if mode not in OFFLOAD_MODES:
            raise RenderError(f"worker.offload = {mode!r}; use one of {', '.join(OFFLOAD_MODES)}")
        if mode == "none":
            return []
        if device.type != "cuda":
            log.info("worker.offload = %s has no effect on %s: the pipeline stays in main memory",
                     mode, device)
            return []
        import torch

        if mode == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif mode == "group":
            pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                      offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=True, exclude_modules=["vae"])
        else:
            pipe.enable_sequential_cpu_offload(device=device)
        pipeline_facts(pipe).offload = mode
        return [f"{mode}_offload"]

    def enable_memory_savers(self, pipe: Any, device: torch.device) -> list[str]:
        """Turn on what trades speed for memory (after an out-of-memory error at batch 1);
        returns what was turned on. Default: VAE tiling and slicing, and CPU offload of idle
        components on CUDA unless an offload mode is on already (`apply_offload`)."""
        turned_on = []
        vae = getattr(pipe, "vae", None)
        for name in ("enable_tiling", "enable_slicing"):
            if vae is not None and hasattr(vae, name):
                getattr(vae, name)()
                turned_on.append(f"vae.{name}")
        facts = pipeline_facts(pipe)
        if (device.type == "cuda" and hasattr(pipe, "enable_model_cpu_offload")
                and facts.offload == "none"):
            pipe.enable_model_cpu_offload(device=device)
            facts.offload = "model"
            turned_on.append("model_cpu_offload")
        return turned_on

    def infotext_fields(self, spec: RenderSpec) -> list[tuple[str, object]]:
        """Extra A1111 infotext fields this family writes (e.g. Forge's Distilled CFG Scale).
        The default records the checkpoint's quantization ("Quantization: GGUF Q8_0"), so a
        picture tells which form of the model drew it; families that add fields keep it."""
        return quantization_fields(spec)

    def build_demo(self, models_dir: Path, configs_dir: Path) -> DemoAssets | None:
        """Write this family's tiny random-weight checkpoints the way users have them (under
        `models_dir`; config folders for single files under `configs_dir`), and return the
        config.toml checkpoint overrides (paths relative to the demo folder) and sample job
        files that render them. Optional: the default returns None, and `lorafarm demo`
        skips the family."""
        return None


def quantization_fields(spec: RenderSpec) -> list[tuple[str, object]]:
    """The infotext field naming a quantized checkpoint's form; none for unquantized ones."""
    quantization = spec.extra.get("quantization")
    return [("Quantization", quantization)] if quantization else []
