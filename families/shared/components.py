"""Pipeline parts kept as files of their own, as ComfyUI users have them, assembled into a
diffusers pipeline.

A ComfyUI install splits Flux.1, FLUX.2 [klein] and Wan across folders: the diffusion model in
models/diffusion_models (`flux1-dev.safetensors`, `flux-2-klein-4b.safetensors`), the text
encoders in models/text_encoders (`clip_l.safetensors`, `t5xxl_fp16.safetensors`,
`qwen_3_4b.safetensors`, `umt5_xxl_fp16.safetensors`) and the VAE in models/vae
(`ae.safetensors`, `flux2-vae.safetensors`, `wan_2.1_vae.safetensors`). lorafarm builds the same
pipeline from those files plus a diffusers *config folder* that then needs no weights at all:
model_index.json, each component's config.json, the tokenizers and the scheduler.

Which file a component loads from (`choose_components`):

1. the file named for the checkpoint: config.toml `[checkpoints.NAME] text_encoder = "..."`
   (or `text_encoder_2`, `vae`), or the same key in the sidecar NAME.toml; the registry has
   already found it on disk (a bare file name in the UI trees' folders);
2. else the config folder's own weights, when it has them (`text_encoder/*.safetensors`);
3. else the one file in the UI trees' folder of that kind (models/text_encoders and
   models/clip, or models/vae) that fits; several that fit are refused with the key to set.

A file *fits* a component when its tensors, in the layout the loader turns them into, are
exactly the tensors of the model the config folder describes, by name and shape. That one
check tells CLIP-L from CLIP-G (width), T5 from UMT5 (UMT5 has a relative attention bias in
every block), the Flux VAE from the SDXL one (16 latent channels, not 4) and the Wan 2.1 VAE
from the Wan 2.2 one, with no size tables: the same test holds for real models and for the
tiny test models. Headers only: no weight is read to decide.

Loading (`load_components`): text encoders hold transformers' own key names, as ComfyUI saves
them, with or without a prefix (`text_model.` on CLIP, as transformers < 5.6 named it, or a
full checkpoint's `text_encoders.clip_l.transformer.`); the prefix is matched against the
model's names, and the model is built with transformers from the config folder's config.json
(CLIPTextModel, T5EncoderModel, UMT5EncoderModel, Klein's Qwen3ForCausalLM) and the file's
tensors, refusing missing or unexpected tensors. A weight the config ties to another (Qwen3-4B's
`lm_head.weight` is its `model.embed_tokens.weight`; T5's `encoder.embed_tokens.weight`) may be
left out of the file, as the released files leave it out; so may a causal LM's output head
even where it is untied (Qwen3-8B), since pipelines read hidden states, not logits: the
embeddings then stand in for it. VAEs go
through diffusers' own single-file loader, which converts the original layouts
(`ae.safetensors` is the LDM layout); diffusers 0.42 converts the Wan 2.1 VAE but not the Wan
2.2 one (TI2V-5B). It has no single-file loader at all for the Flux 2 VAE
(AutoencoderKLFlux2): such a VAE is taken from a file only in diffusers' own layout (its state
dict's names), loaded as it is; an original-layout file (ComfyUI's `flux2-vae.safetensors`) is
refused, and its weights stay in the config folder (vae/).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.plugin_api import (
    LoadedCheckpoint,
    RenderError,
    SafetensorsError,
    pipeline_facts,
    read_header,
)

log = logging.getLogger(__name__)

# Tensors a text encoder file may carry that the model rebuilds or does not have: CLIP's
# position ids (a buffer, saved by older transformers), the CLIP projection and logit scale
# (the text model alone has no projection), and the tokenizer ComfyUI sometimes stores inside
# a T5 file.
_IGNORED_SUFFIXES = ("position_ids", "logit_scale", "text_projection.weight", "spiece_model")
# ComfyUI's "scaled" FP8 files store a scale per weight beside the float8 tensor.
_SCALED_FP8_TELLS = ("scaled_fp8", ".scale_weight", ".scale_input")


class ComponentError(ValueError):
    """A component cannot be taken from any file; the message says what, where and how."""


@dataclass(frozen=True)
class Component:
    """One part of a family's pipeline that users may have as a file of its own."""

    name: str  # the diffusers component: "text_encoder", "text_encoder_2", "vae"
    title: str  # what users call it: "CLIP-L text encoder", "Flux VAE (ae.safetensors)"
    kind: str  # the UI folder kind holding such files: "text_encoders" or "vae"


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def choose_components(checkpoint: LoadedCheckpoint, base: Path,
                      components: Sequence[Component]) -> dict[str, Path]:
    """The files `components` load from instead of the config folder `base`'s weights; a
    component missing from the answer loads from the folder. Reads headers and configs only.

    Raises ComponentError: a named file that does not fit, a component with neither weights
    nor exactly one fitting file, a key naming a component this pipeline does not have.
    """
    known = {c.name for c in components}
    where = _where(checkpoint.name)
    for key in checkpoint.components:
        if key not in known:
            raise ComponentError(
                f"{key} = {checkpoint.components[key].name!r} ({where}): this pipeline has no "
                f"{key}; its parts that may be files of their own are "
                f"{', '.join(sorted(known))}. Remove the key")
    chosen: dict[str, Path] = {}
    for component in components:
        named = checkpoint.components.get(component.name)
        from_folder = named is None and has_weights(base / component.name)
        if not from_folder and not (base / component.name / "config.json").is_file():
            weights = "" if named else (f"no {component.name} weights "
                                        f"({component.name}/*.safetensors) and ")
            raise ComponentError(
                f"the config folder {base} has {weights}no {component.name}/config.json, "
                f"which {checkpoint.name!r} needs to build its {component.title} from a file "
                "of its own; use a complete diffusers config folder (configs, tokenizers and "
                "scheduler; weights only for parts that are not files of their own)")
        if named is not None:
            problem = fit_problem(named, base, component.name)
            if problem is not None:
                raise ComponentError(
                    f"{component.name} = {named.name!r} ({where}) is not the "
                    f"{component.title} {base.name} describes: {named.name} {problem}. Name a "
                    f"file that fits, or remove the key to use {base.name}'s own weights")
            chosen[component.name] = named
        elif not from_folder:
            chosen[component.name] = _pair(checkpoint, base, component)
    return chosen


def component_problem(checkpoint: LoadedCheckpoint, base: Path,
                      components: Sequence[Component]) -> str | None:
    """What keeps `components` from loading, from `base` or files of their own; None when
    nothing does (a family's missing_requirements)."""
    try:
        choose_components(checkpoint, base, components)
    except ComponentError as exc:
        return str(exc)
    return None


def missing_config_parts(base: Path, checkpoint_name: str, parts: Sequence[str],
                         what: str = "config folder") -> str | None:
    """The first of `parts` (tokenizer, scheduler, ... folders) that the diffusers config
    folder `base` lacks, said as a reason; None when it has them all."""
    for part in parts:
        if not (base / part).is_dir():
            return (f"the {what} {base} has no {part}/ folder, which {checkpoint_name!r} "
                    f"needs (a {what} holds model_index.json, the component configs, "
                    "tokenizers and scheduler; weights only for the parts that are not files "
                    "of their own)")
    return None


def config_base(checkpoint: LoadedCheckpoint) -> Path:
    """The diffusers folder a checkpoint's pipeline is built from: its own, or for a
    transformer file the config folder named for it (missing_requirements made sure)."""
    base = checkpoint.path if checkpoint.kind == "folder" else checkpoint.config_path
    assert base is not None, f"{checkpoint.name} has no config folder"
    return base


def assemble(checkpoint: LoadedCheckpoint, components: Sequence[Component],
             dtype: torch.dtype) -> tuple[Path, dict[str, Path], dict[str, Any]]:
    """(config folder, the files the components come from, the loaded parts to hand to
    from_pretrained) for a family whose parts may be files of their own."""
    base = config_base(checkpoint)
    files = choose_components(checkpoint, base, components)
    return base, files, load_components(base, files, dtype, checkpoint.name)


def record_components(pipe: Any, files: dict[str, Path]) -> None:
    """Keep, beside the pipeline, which files `assemble` built it from (the model hash stays
    the main weights file's); `lorafarm models` and the load log show them too."""
    pipeline_facts(pipe).components = {name: str(path) for name, path in files.items()}


def component_sources(checkpoint: LoadedCheckpoint,
                      components: Sequence[Component]) -> dict[str, Path]:
    """The files `components` would load from (named, or paired from the UI trees), for
    sizing the checkpoint before it loads; only the named ones when the choice cannot be
    made (the load then says why)."""
    if checkpoint.kind != "folder" and checkpoint.config_path is None:
        return dict(checkpoint.components)
    try:
        return choose_components(checkpoint, config_base(checkpoint), components)
    except (ComponentError, OSError):
        return dict(checkpoint.components)


def _where(name: str) -> str:
    return f"[checkpoints.{name}] in config.toml, or the sidecar {name}.toml"


def _pair(checkpoint: LoadedCheckpoint, base: Path, component: Component) -> Path:
    """The one file in the UI trees' folders that fits `component`; raises ComponentError."""
    folders = checkpoint.component_folders.get(component.kind, ())
    candidates = sorted({path for folder in folders if folder.is_dir()
                         for path in folder.iterdir()
                         if path.suffix == ".safetensors" and path.is_file()
                         and not path.name.startswith(".")})
    fitting = [path for path in candidates if fit_problem(path, base, component.name) is None]
    key = f"[checkpoints.{checkpoint.name}] {component.name}"
    if len(fitting) == 1:
        return fitting[0]
    if fitting:
        listed = ", ".join(str(path) for path in fitting)
        raise ComponentError(
            f"{base} has no {component.name} weights, and {len(fitting)} files fit its "
            f"{component.title}: {listed}. Choose one: {key} = \"{fitting[0].name}\" in "
            f"config.toml (or {component.name} = \"...\" in the sidecar {checkpoint.name}.toml)")
    if folders:
        looked = (f"no file in {', '.join(str(f) for f in folders)} fits the "
                  f"{component.title} it describes"
                  + (f" (looked at {_few(p.name for p in candidates)})" if candidates else ""))
    else:
        looked = ("no ComfyUI tree is configured (paths.comfyui) to find a "
                  f"{component.title} file in")
    raise ComponentError(
        f"the config folder {base} for {checkpoint.name!r} has no {component.name} weights "
        f"({component.name}/*.safetensors) and {looked}. Name the file: {key} = "
        f"\"path/to/file.safetensors\" in config.toml (or {component.name} = \"...\" in the "
        f"sidecar {checkpoint.name}.toml), or use a config folder that has the weights")


def _few(names: Iterable[str], limit: int = 5) -> str:
    listed = list(names)
    more = f" and {len(listed) - limit} more" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


# --- does a file fit? -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Expected:
    """The tensors of a component as its config folder describes it."""

    model_class: type
    library: str  # "transformers" | "diffusers"
    config: Any  # a transformers PretrainedConfig, or diffusers' config dict
    shapes: dict[str, tuple[int, ...]]
    optional: frozenset[str]  # tied copies (T5's encoder.embed_tokens) a file may leave out


def fit_problem(path: Path, base: Path, component: str) -> str | None:
    """None when the file at `path` holds exactly the tensors of `component` in the config
    folder `base`; else what is wrong, as a phrase ("holds 0 of 36 ...")."""
    try:
        stat = path.stat()
        config_stat = (base / component / "config.json").stat()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return _fit_problem(str(path), stat.st_size, stat.st_mtime_ns, str(base), component,
                        config_stat.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _fit_problem(path_text: str, size: int, mtime_ns: int, base_text: str, component: str,
                 config_mtime_ns: int) -> str | None:
    """fit_problem, cached per file and config version (auto-pairing asks at every intake)."""
    path, base = Path(path_text), Path(base_text)
    if path.suffix.lower() == ".gguf":
        return ("is a GGUF file; lorafarm loads text encoders and VAEs from .safetensors "
                "files (fp16, bf16, fp32 or plain fp8)")
    try:
        header = read_header(path)
    except SafetensorsError as exc:
        return f"is not a readable safetensors file ({exc})"
    if any(tell in key for key in header.tensors for tell in _SCALED_FP8_TELLS):
        return ("is a ComfyUI scaled-FP8 file (a scale beside each float8 weight), which "
                "lorafarm does not load; use the fp16 / bf16 file or a plain FP8 one")
    try:
        expected = _expected(base_text, component, config_mtime_ns)
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as exc:
        return f"cannot be checked: {base}/{component} is not a loadable component ({exc})"
    shapes = {key: info.shape for key, info in header.tensors.items()}
    note = ""
    if expected.library == "transformers":
        renamed, unexpected = align_keys(shapes, expected.shapes)
        actual = {renamed[key]: shape for key, shape in shapes.items() if key in renamed}
    elif single_file_mapping(expected.model_class) is None:
        # Nothing to convert with: only the model's own names can fit, as they are.
        actual = dict(shapes)
        unexpected = [key for key in actual if key not in expected.shapes]
        if unexpected:
            name = expected.model_class.__name__
            note = (f"; diffusers {_diffusers_version()} has no single-file loader for {name}, "
                    f"so lorafarm takes it from a file only in diffusers' own layout ({name}'s "
                    "state dict names), not in an original layout such as ComfyUI's: keep "
                    f"that {component}'s weights in the config folder ({component}/)")
    else:
        try:
            actual = _converted_shapes(expected, shapes)
        except Exception as exc:  # diffusers' converters raise anything on a foreign layout
            return (f"is not in a layout diffusers converts to {expected.model_class.__name__} "
                    f"({type(exc).__name__}: {exc})")
        unexpected = [key for key in actual if key not in expected.shapes]
    problem = _compare(actual, unexpected, expected, base / component)
    return problem + note if problem else None


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def single_file_mapping(model_class: type) -> str | None:
    """The diffusers class whose single-file loader (and original-layout converter) serves
    `model_class`, as diffusers' from_single_file looks it up; None where it has none."""
    import diffusers
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    for name in SINGLE_FILE_LOADABLE_CLASSES:
        loadable = getattr(diffusers, name, None)
        if isinstance(loadable, type) and issubclass(model_class, loadable):
            return name
    return None


def tied_weight_names(model: Any) -> frozenset[str]:
    """The weights `model`'s config ties to another one (Qwen3-4B's `lm_head.weight` to its
    embeddings, T5's `encoder.embed_tokens.weight` to `shared.weight`): transformers fills them
    from the weight they are tied to, so a file may leave them out. A class may declare a tie
    its config turns off (Qwen3-8B's untied LM head): that weight is a weight of its own."""
    tied = getattr(model, "all_tied_weights_keys", None)  # the ties in force (transformers 5)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None) or ()
    return frozenset(tied)


def unused_head_names(model: Any) -> frozenset[str]:
    """A causal LM's output head (Klein's Qwen3): a pipeline reads a text encoder's hidden
    states, never its logits, so a file may leave the head out even where the config does
    not tie it (Qwen3-8B); the loader then fills it with the input embeddings."""
    output = getattr(model, "get_output_embeddings", None)
    head = output() if callable(output) else None
    if head is None:
        return frozenset()
    embeddings = model.get_input_embeddings()
    # By module, not by parameter: a tied head's weight *is* the embeddings', which a file
    # must still hold.
    return frozenset(f"{name}.weight" for name, module in model.named_modules()
                     if module is head and module is not embeddings)


def _compare(actual: Mapping[str, tuple[int, ...]], unexpected: Sequence[str],
             expected: _Expected, folder: Path) -> str | None:
    missing = [key for key in expected.shapes
               if key not in actual and key not in expected.optional]
    different = [key for key in expected.shapes
                 if key in actual and tuple(actual[key]) != tuple(expected.shapes[key])]
    if not (missing or unexpected or different):
        return None
    found = len([key for key in expected.shapes if key in actual])
    what = (f"holds {found} of the {len(expected.shapes)} tensors of the "
            f"{expected.model_class.__name__} in {folder}/config.json")
    details = []
    if different:
        key = different[0]
        details.append(f"{len(different)} of another shape, e.g. {key} "
                       f"{tuple(actual[key])} where the config gives "
                       f"{tuple(expected.shapes[key])}")
    if missing:
        details.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        details.append(f"{len(unexpected)} it does not know, e.g. {sorted(unexpected)[0]}")
    note = ""
    if expected.model_class.__name__ == "AutoencoderKLWan" and expected.config.get("is_residual"):
        note = ("; diffusers converts the Wan 2.1 VAE's original layout only, not the Wan 2.2 "
                "VAE's: keep that VAE's weights in the config folder (vae/)")
    return f"{what} ({'; '.join(details)}){note}"


@functools.lru_cache(maxsize=32)
def _expected(base_text: str, component: str, config_mtime_ns: int) -> _Expected:
    """The component's tensors, from a model built on the meta device (no memory, no init
    cost even for T5-XXL). Cached per config version."""
    base = Path(base_text)
    library, model_class = component_class(base, component)
    folder = base / component
    if library == "transformers":
        config = model_class.config_class.from_pretrained(str(folder))
        with torch.device("meta"):
            model = model_class(config)
        optional = tied_weight_names(model) | unused_head_names(model)
    else:
        config = dict(model_class.load_config(str(folder)))
        with torch.device("meta"):
            model = model_class.from_config(config)
        optional = frozenset()
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    return _Expected(model_class, library, config, shapes, optional)


def component_class(base: Path, component: str) -> tuple[str, type]:
    """(library, class) of a component, as the config folder's model_index.json names it."""
    try:
        index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{base}/model_index.json cannot be read ({exc})") from exc
    entry = index.get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
        raise ValueError(f"{base}/model_index.json names no {component}")
    library, class_name = entry
    if library not in ("transformers", "diffusers"):
        raise ValueError(f"{component} is a {library}.{class_name}, which lorafarm does not "
                         "load from a file of its own")
    return library, getattr(importlib.import_module(library), class_name)


def align_keys(file_shapes: Mapping[str, Any],
               model_keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """How a text encoder file's keys map onto the model's: ({file key: model key}, keys
    that have no place). Files differ from the model by a prefix at most, on either side
    (`text_model.`, a full checkpoint's `text_encoders.clip_l.transformer.`); the prefix pair
    that lines up the most keys wins. Known extras (_IGNORED_SUFFIXES) are dropped."""
    model = set(model_keys)
    votes: dict[tuple[str, str], int] = {}
    for key in file_shapes:
        parts = key.split(".")
        for cut in range(len(parts)):  # the file has a prefix the model lacks
            if ".".join(parts[cut:]) in model:
                pair = (".".join(parts[:cut]) + "." if cut else "", "")
                votes[pair] = votes.get(pair, 0) + 1
                break
    files = set(file_shapes)
    for key in model:
        parts = key.split(".")
        for cut in range(1, len(parts)):  # the model has a prefix the file lacks
            if ".".join(parts[cut:]) in files:
                pair = ("", ".".join(parts[:cut]) + ".")
                votes[pair] = votes.get(pair, 0) + 1
                break
    file_prefix, model_prefix = max(votes, key=lambda p: votes[p]) if votes else ("", "")
    renamed: dict[str, str] = {}
    unexpected: list[str] = []
    for key in file_shapes:
        target = model_prefix + key[len(file_prefix):] if key.startswith(file_prefix) else None
        if target is not None and target in model:
            renamed[key] = target
        elif not key.endswith(_IGNORED_SUFFIXES):
            unexpected.append(key)
    return renamed, unexpected


def _converted_shapes(expected: _Expected,
                      shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A VAE file's tensor shapes after diffusers' own single-file conversion, run on
    meta tensors (no data): exactly the renaming and reshaping from_single_file will do."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    if set(checkpoint) == set(expected.shapes):
        return dict(shapes)  # already in diffusers' layout: from_single_file converts nothing
    mapping_class = single_file_mapping(expected.model_class)
    if mapping_class is None:
        raise ValueError(f"diffusers has no single-file loader for "
                         f"{expected.model_class.__name__}")
    mapping = SINGLE_FILE_LOADABLE_CLASSES[mapping_class]
    converted = mapping["checkpoint_mapping_fn"](checkpoint=checkpoint, config=expected.config)
    return {key: tuple(tensor.shape) for key, tensor in converted.items()}


# --- loading --------------------------------------------------------------------------------


def load_components(base: Path, files: Mapping[str, Path],
                    dtype: torch.dtype | Mapping[str, torch.dtype],
                    name: str = "") -> dict[str, Any]:
    """The components in `files`, loaded, as keyword arguments for `Pipeline.from_pretrained
    (base, ...)`. `dtype` is one dtype or, as diffusers takes it, {component: dtype,
    "default": dtype}."""
    loaded: dict[str, Any] = {}
    for component, path in files.items():
        if isinstance(dtype, torch.dtype):
            component_dtype = dtype
        else:
            component_dtype = dtype.get(component, dtype.get("default", torch.float32))
        log.info("%s: %s from %s", name or base.name, component, path)
        loaded[component] = load_component(path, base, component, component_dtype)
    return loaded


def load_component(path: Path, base: Path, component: str, dtype: torch.dtype) -> Any:
    """One component from its own file, built on the config folder's config for it."""
    problem = fit_problem(path, base, component)
    if problem is not None:
        raise RenderError(f"{path.name} cannot be the {component} of {base.name}: it {problem}")
    library, model_class = component_class(base, component)
    if library == "transformers":
        return _load_text_encoder(path, base / component, model_class, dtype)
    if single_file_mapping(model_class) is None:
        model = _load_diffusers_layout(path, base / component, model_class, dtype)
    else:
        model = model_class.from_single_file(str(path), config=str(base), subfolder=component,
                                             dtype=dtype, local_files_only=True)
    # diffusers leaves a weight the file lacks on the meta device without an error.
    empty = [key for key, tensor in (*model.named_parameters(), *model.named_buffers())
             if tensor.device.type == "meta"]
    if empty:
        raise RenderError(f"{path.name} lacks {len(empty)} {component} weights (e.g. {empty[0]}) "
                          f"for the config in {base}/{component}")
    return model.eval().requires_grad_(False)


def _load_diffusers_layout(path: Path, folder: Path, model_class: Any,
                           dtype: torch.dtype) -> Any:
    """A diffusers model from a file holding exactly its state dict (fit_problem checked the
    names and shapes): built on the meta device from the folder's config, the file's tensors
    then taking the place of the empty ones."""
    from safetensors.torch import load_file

    if getattr(model_class, "_keep_in_fp32_modules", None):
        raise RenderError(f"{model_class.__name__} keeps modules in float32, which lorafarm "
                          f"does not do for a file of its own ({path.name}); keep its weights "
                          f"in the config folder ({folder})")
    with torch.device("meta"):
        model = model_class.from_config(model_class.load_config(str(folder)))
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor
             for key, tensor in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _load_text_encoder(path: Path, folder: Path, model_class: Any, dtype: torch.dtype) -> Any:
    """A transformers text encoder from a file with transformers' key names (up to a
    prefix), through transformers' own loader (meta init, tied weights, buffers)."""
    from safetensors import safe_open

    config = model_class.config_class.from_pretrained(str(folder))
    with torch.device("meta"):
        model_keys = list(model_class(config).state_dict())
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        renamed, _ = align_keys(dict.fromkeys(keys), model_keys)
        state = {renamed[key]: handle.get_tensor(key) for key in keys if key in renamed}
    # float8 / float16 files are cast here: transformers keeps a state dict's own dtype.
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor
             for key, tensor in state.items()}
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                              output_loading_info=True)
    missing = set(info.get("missing_keys", ())) - tied_weight_names(model)
    head = missing & unused_head_names(model)
    if head:
        # Only its logits would need it, and nothing reads them: the embeddings stand in, so
        # that the model is whole and the same on every load.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        log.info("%s has no %s; the input embeddings stand in (a pipeline reads the hidden "
                 "states only)", path.name, ", ".join(sorted(head)))
    missing = sorted(missing - head)
    wrong = sorted(set(info.get("unexpected_keys", ())) | {
        str(entry[0] if isinstance(entry, tuple) else entry)
        for entry in info.get("mismatched_keys", ())})
    if missing or wrong:
        raise RenderError(f"{path.name} does not fill the {model_class.__name__} of {folder}: "
                          f"missing {missing[:3]}, unusable {wrong[:3]}")
    return model.eval().requires_grad_(False)
