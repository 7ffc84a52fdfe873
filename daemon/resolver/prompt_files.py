"""kohya sample-prompt files: the prompts a trainer rendered during training, given to a job
as `prompts_file = "NAME.txt"` (a file in the inputs folder), become its prompt axis.

One prompt a line, options after ` --`: `--n` negative prompt, `--w` / `--h` size, `--d`
seed, `--l` CFG, `--s` steps. `#` comments and blank lines are skipped. Options kohya knows
but lorafarm does not take from the file (`--g` Flux guidance, `--ss` sampler) are noted as
warnings; anything else, or a value that is not a number, refuses the job with the line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from daemon.config import Limits
from daemon.contract.jobfile import MAX_SEED, JobFileError, line_of_key
from daemon.resolver.sweep import PromptLine

MAX_PROMPT_FILE_BYTES = 1024 * 1024
# kohya options lorafarm does not read from the file: the job's own settings apply.
IGNORED_OPTIONS = {"g": "Flux guidance (set `guidance` in the job)",
                   "ss": "sampler (set `sampler` in the job)"}
_OPTION = re.compile(r"\s--(?=[A-Za-z])")
EXAMPLE = "a lighthouse at dusk --n blurry --w 1024 --h 1024 --d 42 --l 7 --s 28"


def find_input_file(name: str, roots: Sequence[Path], key: str, text: str, *,
                    example: str = 'prompts_file = "sample_prompts.txt"',
                    kind: str = "file") -> Path:
    """A file a job names (`key`: image, mask, prompts_file), which must lie inside an inputs
    folder: no absolute path, no `..`, no symbolic link leading out."""
    line = line_of_key(text, key)
    shown = ", ".join(str(r) for r in roots)
    relative = Path(name)
    if (relative.is_absolute() or ".." in relative.parts or not name.strip()
            or "\x00" in name):
        raise JobFileError(f"`{key}` = {name!r} must be a path inside the inputs folder "
                           f"({shown}), without `..` or a leading /", key=key, line=line,
                           fix=f"copy the {kind} into the inputs folder and give its name, "
                               f"e.g. {example}")
    for root in roots:
        candidate = root / relative
        if not candidate.exists():
            continue
        real = candidate.resolve()
        if not real.is_relative_to(root.resolve()):
            raise JobFileError(f"`{key}` = {name!r} is a link that leads out of the inputs "
                               f"folder ({real})", key=key, line=line,
                               fix=f"copy the {kind} itself into the inputs folder")
        if not real.is_file():
            raise JobFileError(f"`{key}` = {name!r} is not a file", key=key, line=line,
                               fix=f"name a {kind} in the inputs folder")
        return real
    raise JobFileError(f"`{key}` = {name!r} is not in the inputs folder ({shown})", key=key,
                       line=line, fix=f"put the {kind} into the inputs folder; files dropped "
                                      "into jobs/ are taken as jobs, not inputs")


def read_prompt_file(path: Path, limits: Limits,
                     warnings: list[str] | None = None) -> list[PromptLine]:
    """The prompt lines of a kohya sample-prompt file; raises JobFileError naming the line."""
    name = path.name
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise JobFileError(f"prompts file {name} is larger than 1 MB", key="prompts_file",
                           fix="a sample-prompt file holds one prompt a line")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobFileError(f"prompts file {name} is not UTF-8 text", key="prompts_file",
                           fix="save it as UTF-8") from exc
    lines = []
    for number, raw in enumerate(content.splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        lines.append(_parse_line(text, name, number, limits, warnings))
    if not lines:
        raise JobFileError(f"prompts file {name} holds no prompt (only blank lines and "
                           "# comments)", key="prompts_file", fix=f"write one prompt a line, "
                                                                  f"e.g. {EXAMPLE}")
    return lines


def _parse_line(text: str, name: str, number: int, limits: Limits,
                warnings: list[str] | None) -> PromptLine:
    def refuse(what: str, fix: str = f"write e.g. {EXAMPLE}") -> JobFileError:
        return JobFileError(f"prompts file {name}, line {number}: {what}", key="prompts_file",
                            fix=fix)

    prompt, *options = _OPTION.split(" " + text)
    prompt = prompt.strip()
    if not prompt:
        raise refuse("the line has options but no prompt before them")
    values: dict[str, object] = {}
    for option in options:
        flag, _, value = option.partition(" ")
        flag, value = flag.lower(), value.strip()
        if flag in IGNORED_OPTIONS:
            if warnings is not None:
                warnings.append(f"prompts file {name}, line {number}: --{flag} "
                                f"{IGNORED_OPTIONS[flag]} is not read from the file")
            continue
        if flag == "n":
            values["negative_prompt"] = value  # may be empty: no negative prompt
            continue
        rule = _NUMBERS.get(flag)
        if rule is None:
            raise refuse(f"unknown option --{flag}", fix="options are --n (negative), --w, --h "
                                                         "(size), --d (seed), --l (CFG), "
                                                         "--s (steps)")
        key, kind, low, high = rule
        high_value = getattr(limits, high) if isinstance(high, str) else high
        try:
            number_value = kind(value)
        except ValueError:
            raise refuse(f"--{flag} {value!r}: {key} must be a number") from None
        if not low <= number_value <= high_value:
            raise refuse(f"--{flag} {value}: {key} must be from {low} to {high_value}")
        values[key] = number_value
    return PromptLine(prompt=prompt, line=number, **values)  # type: ignore[arg-type]


# option -> (PromptLine field, type, lowest, highest or the Limits attribute holding it)
_NUMBERS: dict[str, tuple[str, type, float, float | str]] = {
    "w": ("width", int, 64, "max_width"),
    "h": ("height", int, 64, "max_height"),
    "d": ("seed", int, 0, MAX_SEED),
    "l": ("cfg", float, 0.0, 30.0),
    "s": ("steps", int, 1, "max_steps"),
}
