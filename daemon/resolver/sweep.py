"""A job's sweep, expanded into one job variant per combination of its axes.

`[sweep]` axes come in two kinds: settings (seed, cfg, steps, sampler, prompt_sr, a LoRA's
strength as "lora:NAME") and things swept whole: LoRA files (`lora`, where an entry may be a
glob over a trainer's epoch files and "none" is the baseline without it), checkpoints, whole
prompts (from the job or a kohya sample-prompt file) and negative prompts. Every variant is
checked by intake like a job of its own, so each expanded LoRA file is checked against each
checkpoint before anything is queued.

Each render records its axis labels (RenderSpec.extra["sweep"]), readable in a grid: a LoRA
with its epoch, a checkpoint's name, a prompt's first words.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from daemon.contract.jobfile import LORA_AXIS, JobFileError, JobLora, JobSpec, line_of_key

NO_LORA = "none"  # a `lora` axis entry: the baseline without the swept LoRA
GLOB_CHARACTERS = "*?["
PROMPT_LABEL_WORDS = 6
# Applied first, so that prompt_sr and a seed axis act on the prompt line they meet.
WHOLE_AXES = ("prompt", "negative_prompt", "checkpoint", "lora")
_EPOCH = re.compile(r"^(?P<base>.*?)[-_.](?P<epoch>\d+)$")


@dataclass(frozen=True)
class PromptLine:
    """One value of the prompt axis: a prompt with the settings its line sets (kohya sample
    prompt files set size, seed, CFG and steps per line; None: the job's)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float | None = None
    steps: int | None = None
    line: int | None = None  # where it came from in a prompt file


@dataclass(frozen=True)
class Axis:
    """One expanded sweep axis: its values, each with the label a grid shows."""

    name: str
    values: tuple[tuple[Any, object], ...]  # (value, label)


def epoch_of(name: str) -> int | None:
    """The epoch number of a trainer's intermediate file (`mystyle-000004` -> 4); None for
    the final file, which kohya saves without a suffix."""
    match = _EPOCH.match(name)
    return int(match.group("epoch")) if match else None


def natural_key(name: str) -> tuple[str, float, str]:
    """Epoch order: mystyle-000004 < mystyle-000010 < mystyle (the final file, no suffix)."""
    match = _EPOCH.match(name)
    if match:
        return match.group("base").lower(), float(match.group("epoch")), name
    return name.lower(), float("inf"), name


def lora_label(name: str | None) -> str:
    if name is None:
        return "none"
    epoch = epoch_of(name)
    return f"{name} (epoch {epoch})" if epoch is not None else name


def prompt_label(prompt: str) -> str:
    """The first words of a prompt, for a grid's row or column."""
    words = prompt.split()
    text = " ".join(words[:PROMPT_LABEL_WORDS])
    return text + (" ..." if len(words) > PROMPT_LABEL_WORDS else "")


def expand_lora_entries(entries: Sequence[str], names: Sequence[str],
                        text: str) -> list[str | None]:
    """The `lora` axis: names as given, globs expanded over the library's `names` in epoch
    order, "none" as None (the baseline). Raises JobFileError for a glob matching nothing."""
    line = line_of_key(text, "lora")
    result: list[str | None] = []
    for entry in entries:
        entry = entry.strip()
        if entry.lower() == NO_LORA:
            found: list[str | None] = [None]
        elif any(c in entry for c in GLOB_CHARACTERS):
            matched = sorted({n for n in names if fnmatch.fnmatchcase(n, entry)},
                             key=natural_key)
            if not matched:
                close = difflib.get_close_matches(entry.rstrip("*?"), list(names), n=3,
                                                  cutoff=0.4)
                hint = (f"close names: {', '.join(close)}" if close
                        else "`lorafarm loras` lists the library")
                raise JobFileError(f"sweep.lora entry {entry!r} matches no LoRA in the library",
                                   key="sweep.lora", line=line,
                                   fix=f"{hint}; a pattern like \"mystyle-*\" matches every "
                                       "epoch file of mystyle")
            found = list(matched)
        else:
            found = [entry]
        result += [name for name in found if name not in result]
    return result


def expand_axes(spec: JobSpec, text: str, lora_names: Sequence[str],
                prompt_lines: Sequence[PromptLine] | None) -> list[Axis]:
    """The job's axes with their values expanded and labelled; a prompts file's lines are
    the prompt axis."""
    axes: list[Axis] = []
    for name, values in spec.sweep:
        if name == "lora":
            loras = expand_lora_entries(values, lora_names, text)
            named = [lora.name for lora in spec.loras]
            for lora in loras:
                if lora in named:
                    raise JobFileError(f"LoRA {lora!r} is swept by sweep.lora and also listed "
                                       "in [[loras]]", key="sweep.lora",
                                       line=line_of_key(text, "lora"),
                                       fix="remove it from [[loras]]: the sweep applies it at "
                                           "sweep.lora_strength")
            axes.append(Axis(name, tuple((lora, lora_label(lora)) for lora in loras)))
        elif name == "prompt":
            axes.append(Axis(name, tuple((PromptLine(prompt), prompt_label(prompt))
                                         for prompt in values)))
        elif name == "negative_prompt":
            axes.append(Axis(name, tuple((value, prompt_label(value) or "(empty)")
                                         for value in values)))
        else:
            axes.append(Axis(name, tuple((value, value) for value in values)))
    if prompt_lines is not None:
        # Last: the LoRAs or checkpoints compared go across the grid, the prompts down.
        axes.append(Axis("prompt", tuple((line, prompt_label(line.prompt))
                                         for line in prompt_lines)))
    return axes


def sweep_variants(spec: JobSpec, text: str, axes: Sequence[Axis],
                   max_count: int) -> list[tuple[JobSpec, dict[str, object]]]:
    """The job once per combination of its axes, with the axis labels of each."""
    total = 1
    for axis in axes:
        total *= len(axis.values)
    if total > max_count:
        sizes = " x ".join(f"{len(axis.values)} {axis.name}" for axis in axes)
        raise JobFileError(f"the sweep makes {total} combinations ({sizes}); at most "
                           f"{max_count} (limits.max_count in config.toml)", key="sweep",
                           fix="use fewer values per axis, or raise limits.max_count")
    order = sorted(range(len(axes)), key=lambda i: (axes[i].name not in WHOLE_AXES, i))
    base_seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
    variants = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        labels = {axis.name: label for axis, (_, label) in zip(axes, combo, strict=True)}
        variant = replace(spec, seed=base_seed)
        for index in order:
            variant = _apply(variant, axes[index].name, combo[index][0], spec, text)
        variants.append((variant, labels))
    return variants


def _apply(variant: JobSpec, axis: str, value: Any, spec: JobSpec, text: str) -> JobSpec:
    if axis == "prompt":
        line: PromptLine = value
        changes: dict[str, Any] = {"prompt": line.prompt}
        for key in ("negative_prompt", "width", "height", "seed", "cfg", "steps"):
            if getattr(line, key) is not None:
                changes[key] = getattr(line, key)
        return replace(variant, **changes)
    if axis == "negative_prompt":
        return replace(variant, negative_prompt=value)
    if axis == "checkpoint":
        # A checkpoint found by another name than the job's own: the hash named that one.
        return replace(variant, checkpoint=value, checkpoint_hash=None)
    if axis == "lora":
        if value is None:
            return variant
        return replace(variant, loras=(*variant.loras, JobLora(
            name=value, strength=spec.sweep_lora_strength)))
    if axis == "prompt_sr":
        search = dict(spec.sweep)["prompt_sr"][0]
        if search not in variant.prompt:
            raise JobFileError(f"sweep.prompt_sr searches for {search!r}, which is not "
                               "in the prompt", key="sweep.prompt_sr",
                               line=line_of_key(text, "prompt_sr"),
                               fix="make the first value a word of the prompt")
        return replace(variant, prompt=variant.prompt.replace(search, str(value)))
    if axis.startswith(LORA_AXIS):
        name = axis[len(LORA_AXIS):]
        if name not in [lora.name for lora in spec.loras]:
            raise JobFileError(f"sweep axis `{axis}` names a LoRA the job does not list "
                               "in [[loras]]", key=f"sweep.{axis}",
                               fix=f'add [[loras]] name = "{name}"')
        return replace(variant, loras=tuple(
            replace(lora, strength=float(value)) if lora.name == name else lora
            for lora in variant.loras))
    return replace(variant, **{axis: float(value) if axis == "cfg" else value})
