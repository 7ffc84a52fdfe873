"""Job files: parse TOML or JSON, check every key and value, and say exactly what is wrong.

This module knows the job-file contract (the keys, their types and ranges). What needs the
rest of the daemon (does the checkpoint exist, does the sampler fit its family) is checked in
`daemon.resolver.resolver`, which raises the same JobFileError so the user gets one kind of report.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from daemon.config import Limits

MAX_SEED = 2**63 - 1


class JobFileError(ValueError):
    """A job file that cannot be accepted: what is wrong, where (key, line), how to fix it."""

    def __init__(self, what: str, *, key: str | None = None, line: int | None = None,
                 fix: str | None = None) -> None:
        self.what, self.key, self.line, self.fix = what, key, line, fix
        super().__init__(self.report())

    def report(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.key is not None:
            where.append(f"key `{self.key}`")
        text = f"{', '.join(where)}: {self.what}" if where else self.what
        if self.fix:
            text += f"\nHow to fix: {self.fix}"
        return text


@dataclass(frozen=True)
class JobLora:
    """One `[[loras]]` entry of a job."""

    name: str
    strength: float = 1.0  # the diffusion model (UNet / transformer)
    text_encoder_strength: float | None = None  # None: same as `strength`
    expert: str | None = None  # Wan 2.2: "high", "low" or "both"; None: from the library
    # False: the job gave no strength (the LoRA's A1111 "preferred weight" applies, if set)
    strength_given: bool = True


@dataclass(frozen=True)
class JobSpec:
    """A job file's content after checking; None means "use the family default"."""

    checkpoint: str
    prompt: str
    negative_prompt: str | None
    seed: int | None
    count: int
    steps: int | None
    cfg: float | None
    guidance: float | None  # embedded guidance of distilled models (Flux.1 dev)
    true_cfg: float | None  # real CFG on a guidance-distilled model (needs a negative prompt)
    frames: int | None
    fps: int | None
    image: str | None  # image-to-video input, relative to an inputs folder
    guidance_2: float | None
    flow_shift: float | None
    sampler: str | None
    width: int | None
    height: int | None
    priority: int
    conventions: bool
    loras: tuple[JobLora, ...] = ()
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # axis -> values (X/Y/Z plot)
    checkpoint_hash: str | None = None
    lora_hashes: dict[str, str] = field(default_factory=dict)
    trigger_words: bool = False  # append each LoRA's trigger words to the prompt
    allow_cross_lineage: bool = False  # e.g. a Pony LoRA on an Illustrious checkpoint
    clip_skip: int | None = None  # A1111 "Clip skip"; families that have it (SD 1.5)
    prompts_file: str | None = None  # a kohya sample-prompt file in inputs/: the prompt axis
    combinatorial: bool = False  # wildcards: every combination instead of one per seed
    sweep_lora_strength: float = 1.0  # [sweep] lora_strength: the swept LoRA's strength
    # [hires] as written; intake checks it (daemon.hires.check_hires) right after check_job
    hires: dict[str, Any] | None = None
    denoising_strength: float | None = None  # image-to-image: how much of `image` is redrawn
    # What a re-render could not honour of its source (infotext fields): job warnings.
    rerender_warnings: tuple[str, ...] = ()
    # Re-renders: textual-inversion embeddings by hash first (A1111's "TI hashes").
    embedding_hashes: dict[str, str] = field(default_factory=dict)
    mask: str | None = None  # inpainting: white = redraw, black = keep (inputs folder)

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["loras"] = [dict(lora.__dict__) for lora in self.loras]
        data["sweep"] = {axis: list(values) for axis, values in self.sweep}
        return json.dumps(data, sort_keys=True)


@dataclass(frozen=True)
class _Key:
    kind: type | tuple[type, ...]
    required: bool = False
    low: float | None = None
    high_limit: str | None = None  # attribute of Limits holding the upper bound
    high: float | None = None
    example: str = ""


KEYS: dict[str, _Key] = {
    "checkpoint": _Key(str, required=True, example='checkpoint = "my-model"'),
    # Required unless a prompt axis ([sweep] prompt, prompts_file) gives the prompts.
    "prompt": _Key(str, example='prompt = "a lighthouse at dusk"'),
    "negative_prompt": _Key(str, example='negative_prompt = "blurry"'),
    "seed": _Key(int, low=0, high=MAX_SEED, example="seed = 1234"),
    "count": _Key(int, low=1, high_limit="max_count", example="count = 4"),
    "steps": _Key(int, low=1, high_limit="max_steps", example="steps = 25"),
    "cfg": _Key((int, float), low=0.0, high=30.0, example="cfg = 6.5"),
    "guidance": _Key((int, float), low=0.0, high=30.0, example="guidance = 3.5"),
    "true_cfg": _Key((int, float), low=1.0, high=30.0, example="true_cfg = 4.0"),
    "sampler": _Key(str, example='sampler = "DPM++ 2M Karras"'),
    "width": _Key(int, low=64, high_limit="max_width", example="width = 832"),
    "height": _Key(int, low=64, high_limit="max_height", example="height = 1216"),
    "priority": _Key(int, low=-1000, high=1000, example="priority = 0"),
    "conventions": _Key(bool, example="conventions = false"),
    "frames": _Key(int, low=1, high_limit="max_frames", example="frames = 81"),
    "fps": _Key(int, low=1, high=120, example="fps = 16"),
    "image": _Key(str, example='image = "start-frame.png"'),
    "guidance_2": _Key((int, float), low=0.0, high=30.0, example="guidance_2 = 3.0"),
    "flow_shift": _Key((int, float), low=0.0, high=100.0, example="flow_shift = 5.0"),
    "loras": _Key(list, example='[[loras]]\nname = "my-style"\nstrength = 0.8'),
    "sweep": _Key(dict, example='[sweep]\ncfg = [4.0, 6.0]\nprompt_sr = ["red", "blue"]'),
    # Re-renders: the model and LoRAs by hash first (A1111 / Civitai AutoV2 or AutoV3).
    "checkpoint_hash": _Key(str, example='checkpoint_hash = "67ab2fd8ec"'),
    "lora_hashes": _Key(dict, example='lora_hashes = { ink = "0a1b2c3d4e5f" }'),
    "trigger_words": _Key(bool, example="trigger_words = true"),
    "allow_cross_lineage": _Key(bool, example="allow_cross_lineage = true"),
    "clip_skip": _Key(int, low=1, high=12, example="clip_skip = 2"),
    "prompts_file": _Key(str, example='prompts_file = "sample_prompts.txt"'),
    "combinatorial": _Key(bool, example="combinatorial = true"),
    "hires": _Key(dict, example="[hires]\nscale = 2.0\nsteps = 10\ndenoising_strength = 0.5"),
    "denoising_strength": _Key((int, float), low=0.0, high=1.0,
                               example="denoising_strength = 0.6"),
    # Written by the re-render plugin: infotext fields it could not turn into job keys.
    "rerender_warnings": _Key(list, example='rerender_warnings = ["..."]'),
    "mask": _Key(str, example='mask = "sketch-mask.png"'),
    "embedding_hashes": _Key(dict, example='embedding_hashes = { negativeXL_D = "fff5d51ab6" }'),
}
LORA_KEYS = ("name", "strength", "text_encoder_strength", "expert")
EXPERTS = ("high", "low", "both")
MAX_STRENGTH = 10.0


def parse_toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(str(exc))
        raise JobFileError(f"not valid TOML: {exc}", line=line,
                           fix="check quotes, `=` signs and brackets on that line; strings need "
                               'double quotes, e.g. prompt = "a cat"') from exc


def parse_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobFileError(f"not valid JSON: {exc.msg}", line=exc.lineno,
                           fix="check commas and quotes near that line") from exc
    if not isinstance(data, dict):
        raise JobFileError("the JSON must be an object ({...}) of job keys",
                           fix='write e.g. {"checkpoint": "my-model", "prompt": "a cat"}')
    return data


def decode_job_bytes(raw: bytes) -> str:
    if b"\x00" in raw:
        raise JobFileError("the file is binary, not a text job file",
                           fix="job files are UTF-8 TOML or JSON text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobFileError(f"the file is not UTF-8 text (bad byte at offset {exc.start})",
                           fix="save the file as UTF-8") from exc


def check_job(data: dict[str, Any], text: str, limits: Limits) -> JobSpec:
    """Check keys, types and ranges; returns the JobSpec or raises JobFileError."""
    for key in data:
        if key not in KEYS:
            close = difflib.get_close_matches(key, list(KEYS), n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else \
                f"known keys: {', '.join(KEYS)}"
            raise JobFileError(f"unknown key `{key}`", key=key, line=line_of_key(text, key),
                               fix=f"{hint} (remove or rename the key)")
    values: dict[str, Any] = {}
    for key, rule in KEYS.items():
        if key not in data:
            if rule.required:
                raise JobFileError(f"required key `{key}` is missing", key=key,
                                   fix=f"add a line like: {rule.example}")
            values[key] = None
            continue
        values[key] = _check_value(key, data[key], rule, limits, text)
    sweep_table = dict(values["sweep"] or {})
    lora_strength = check_lora_strength(sweep_table.pop("lora_strength", None), text)
    prompt_axis = "prompt" in sweep_table or values["prompts_file"] is not None
    if values["prompt"] is None and not prompt_axis:
        raise JobFileError("required key `prompt` is missing", key="prompt",
                           fix=f"add a line like: {KEYS['prompt'].example} (or give the prompts "
                               "as [sweep] prompt = [...] or prompts_file = \"NAME.txt\")")
    if "prompt" in sweep_table and values["prompts_file"] is not None:
        raise JobFileError("`prompts_file` and `sweep.prompt` both give the prompts",
                           key="prompts_file", line=line_of_key(text, "prompts_file"),
                           fix="keep one of them")
    if values["prompt"] is None:
        values["prompt"] = ""  # each render takes its prompt from the prompt axis
    elif not values["prompt"].strip():
        raise JobFileError("the prompt is empty", key="prompt",
                           line=line_of_key(text, "prompt"), fix=KEYS["prompt"].example)
    if not values["checkpoint"].strip():
        raise JobFileError("the checkpoint name is empty", key="checkpoint",
                           line=line_of_key(text, "checkpoint"),
                           fix="name a checkpoint under models/ (`lorafarm models` lists them)")
    return JobSpec(
        checkpoint=values["checkpoint"].strip(),
        prompt=values["prompt"],
        negative_prompt=values["negative_prompt"],
        seed=values["seed"],
        count=values["count"] if values["count"] is not None else 1,
        steps=values["steps"],
        cfg=float(values["cfg"]) if values["cfg"] is not None else None,
        guidance=float(values["guidance"]) if values["guidance"] is not None else None,
        true_cfg=float(values["true_cfg"]) if values["true_cfg"] is not None else None,
        frames=values["frames"],
        fps=values["fps"],
        image=values["image"],
        guidance_2=float(values["guidance_2"]) if values["guidance_2"] is not None else None,
        flow_shift=float(values["flow_shift"]) if values["flow_shift"] is not None else None,
        sampler=values["sampler"],
        width=values["width"],
        height=values["height"],
        priority=values["priority"] if values["priority"] is not None else 0,
        conventions=values["conventions"] if values["conventions"] is not None else True,
        loras=_check_loras(values["loras"] or [], text),
        sweep=_check_sweep(sweep_table, text, limits),
        checkpoint_hash=values["checkpoint_hash"],
        lora_hashes={str(k): str(v) for k, v in (values["lora_hashes"] or {}).items()},
        trigger_words=bool(values["trigger_words"]),
        allow_cross_lineage=bool(values["allow_cross_lineage"]),
        clip_skip=values["clip_skip"],
        prompts_file=values["prompts_file"],
        combinatorial=bool(values["combinatorial"]),
        sweep_lora_strength=lora_strength,
        hires=values["hires"],
        denoising_strength=(float(values["denoising_strength"])
                            if values["denoising_strength"] is not None else None),
        rerender_warnings=tuple(str(w) for w in values["rerender_warnings"] or ()),
        mask=values["mask"],
        embedding_hashes={str(k): str(v)
                          for k, v in (values["embedding_hashes"] or {}).items()},
    )


def check_lora_strength(value: Any, text: str) -> float:
    """`[sweep] lora_strength`: the strength of the LoRA the `lora` axis sweeps (default 1)."""
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            -MAX_STRENGTH <= value <= MAX_STRENGTH):
        raise JobFileError(f"`sweep.lora_strength` = {value!r} must be a number from "
                           f"{-MAX_STRENGTH:g} to {MAX_STRENGTH:g}", key="sweep.lora_strength",
                           line=line_of_key(text, "lora_strength"), fix="lora_strength = 0.8")
    return float(value)


def _check_loras(entries: list[Any], text: str) -> tuple[JobLora, ...]:
    line = line_of_key(text, "loras") or _line_of_pattern(text, r"^\s*\[\[loras\]\]")
    result = []
    for number, entry in enumerate(entries, start=1):
        where = f"loras entry {number}"
        if not isinstance(entry, dict):
            raise JobFileError(f"{where} must be a table with a name", key="loras", line=line,
                               fix=KEYS["loras"].example)
        for key in entry:
            if key not in LORA_KEYS:
                close = difflib.get_close_matches(key, LORA_KEYS, n=1)
                hint = (f"did you mean `{close[0]}`?" if close
                        else f"allowed: {', '.join(LORA_KEYS)}")
                raise JobFileError(f"{where}: unknown key `{key}`", key=f"loras.{key}",
                                   line=line_of_key(text, key) or line, fix=hint)
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise JobFileError(f"{where} has no `name`", key="loras.name", line=line,
                               fix='add name = "FILE STEM" (`lorafarm loras` lists them)')
        strengths: dict[str, float | None] = {}
        for key in ("strength", "text_encoder_strength"):
            value = entry.get(key)
            if value is None:
                strengths[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    -MAX_STRENGTH <= value <= MAX_STRENGTH):
                raise JobFileError(f"{where} ({name}): `{key}` = {value!r} must be a number from "
                                   f"{-MAX_STRENGTH:g} to {MAX_STRENGTH:g}", key=f"loras.{key}",
                                   line=line_of_key(text, key) or line, fix=f"{key} = 0.8")
            strengths[key] = float(value)
        strength = strengths["strength"]
        expert = entry.get("expert")
        if expert is not None and expert not in EXPERTS:
            raise JobFileError(f"{where} ({name}): `expert` = {expert!r} is not one of "
                               f"{', '.join(EXPERTS)}", key="loras.expert",
                               line=line_of_key(text, "expert") or line,
                               fix='expert = "high", "low" or "both" (Wan 2.2 noise experts)')
        result.append(JobLora(name=name.strip(),
                              strength=1.0 if strength is None else strength,
                              text_encoder_strength=strengths["text_encoder_strength"],
                              expert=expert, strength_given=strength is not None))
    return tuple(result)


SWEEP_AXES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "seed": (int, "seed = [1, 2, 3]"),
    "cfg": ((int, float), "cfg = [4.0, 6.0, 8.0]"),
    "steps": (int, "steps = [20, 30]"),
    "sampler": (str, 'sampler = ["Euler a", "DPM++ 2M Karras"]'),
    "prompt_sr": (str, 'prompt_sr = ["red", "blue", "green"]  # A1111 Prompt S/R'),
    # Files and whole prompts (daemon/resolver/sweep.py expands them at intake).
    "lora": (str, 'lora = ["mystyle-*", "none"]  # every epoch file, and a baseline'),
    "checkpoint": (str, 'checkpoint = ["base-model", "lightning-model"]'),
    "prompt": (str, 'prompt = ["a lighthouse at dusk", "a cat on a sofa"]'),
    "negative_prompt": (str, 'negative_prompt = ["blurry", "lowres, watermark"]'),
}
LORA_AXIS = "lora:"  # "lora:NAME" = [0.0, 0.5, 1.0]: that LoRA's strength


def _check_sweep(table: dict[str, Any], text: str, limits: Limits) -> tuple[
        tuple[str, tuple[Any, ...]], ...]:
    """A1111's X/Y/Z plot as a `[sweep]` table: each axis a list of values; the job renders
    the cartesian product. Prompt S/R replaces its first value in the prompt with each."""
    line = _line_of_pattern(text, r"^\s*\[sweep\]")
    axes = []
    total = 1
    for axis, values in table.items():
        where = f"sweep.{axis}"
        if axis.startswith(LORA_AXIS) and axis[len(LORA_AXIS):]:
            kinds: type | tuple[type, ...] = (int, float)
            example = f'"{axis}" = [0.0, 0.5, 1.0]'
        elif axis in SWEEP_AXES:
            kinds, example = SWEEP_AXES[axis]
        else:
            close = difflib.get_close_matches(axis, list(SWEEP_AXES), n=1)
            hint = f"did you mean `{close[0]}`?" if close else (
                f"axes: {', '.join(SWEEP_AXES)}, or \"lora:NAME\" for a LoRA's strength")
            raise JobFileError(f"unknown sweep axis `{axis}`", key=where, line=line, fix=hint)
        if (not isinstance(values, list) or not values or any(
                isinstance(v, bool) or not isinstance(v, kinds) for v in values)):
            raise JobFileError(f"`{where}` must be a non-empty list of "
                               f"{_type_word(kinds if isinstance(kinds, type) else kinds[-1])}s",
                               key=where, line=line, fix=example)
        if axis == "prompt_sr" and len(values) < 2:
            raise JobFileError("`sweep.prompt_sr` needs the word to search for and at least one "
                               "replacement", key=where, line=line, fix=example)
        axes.append((axis, tuple(values)))
        total *= len(values)
    if total > limits.max_count:
        raise JobFileError(f"the sweep makes {total} combinations; at most {limits.max_count} "
                           "(limits.max_count in config.toml)", key="sweep", line=line,
                           fix="use fewer values per axis")
    return tuple(axes)


def _line_of_pattern(text: str, pattern: str) -> int | None:
    compiled = re.compile(pattern)
    for number, line in enumerate(text.splitlines(), start=1):
        if compiled.search(line):
            return number
    return None


def _check_value(key: str, value: Any, rule: _Key, limits: Limits, text: str) -> Any:
    line = line_of_key(text, key)
    kinds = rule.kind if isinstance(rule.kind, tuple) else (rule.kind,)
    # bool is an int in Python; a job that says `steps = true` is wrong, not 1.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        wanted = " or ".join(_type_word(k) for k in kinds)
        raise JobFileError(f"`{key}` must be {wanted}, got {_describe(value)}", key=key,
                           line=line, fix=f"write e.g. {rule.example}")
    high = getattr(limits, rule.high_limit) if rule.high_limit else rule.high
    if isinstance(value, int | float) and not isinstance(value, bool):
        if (rule.low is not None and value < rule.low) or (high is not None and value > high):
            source = f" (limits.{rule.high_limit} in config.toml)" if rule.high_limit else ""
            raise JobFileError(
                f"`{key}` = {value} is out of range; allowed {_num(rule.low)} to "
                f"{_num(high)}{source}", key=key, line=line,
                fix=f"use a value from {_num(rule.low)} to {_num(high)}")
    return value


def line_of_key(text: str, key: str) -> int | None:
    """The 1-based line where `key` is set, in TOML (key = ...) or JSON ("key": ...)."""
    name = re.escape(key)
    pattern = re.compile(rf'^\s*{name}\s*=|"{name}"\s*:')
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line):
            return number
    return None


def _toml_error_line(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


def _type_word(kind: type) -> str:
    return {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
            list: "a list", dict: "a table"}.get(kind, kind.__name__)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {json.dumps(value, default=str)[:60]}"


def _num(value: float | None) -> str:
    if value is None:
        return "any"
    return str(int(value)) if float(value).is_integer() else str(value)
