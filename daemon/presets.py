"""Per-checkpoint presets: defaults a checkpoint brings for the jobs that use it.

A Lightning or Turbo checkpoint wants other steps, CFG and sampler than its family's
defaults; `[checkpoints.NAME]` in config.toml or the checkpoint's sidecar NAME.toml says so:

    [checkpoints.my-lightning]
    steps = 6
    cfg = 1.5
    sampler = "Euler a"

A job's own value wins over the preset, the preset over the family default.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # config.py reads presets, and jobfile.py imports config.py
    from daemon.contract.jobfile import JobSpec

# key -> (accepted types, lowest, highest, example)
PRESET_KEYS: dict[str, tuple[tuple[type, ...], float | None, float | None, str]] = {
    "steps": ((int,), 1, 1000, "steps = 6"),
    "cfg": ((int, float), 0.0, 30.0, "cfg = 1.5"),
    "sampler": ((str,), None, None, 'sampler = "Euler a"'),
    "negative_prompt": ((str,), None, None, 'negative_prompt = "lowres, blurry"'),
    "width": ((int,), 64, 8192, "width = 832"),
    "height": ((int,), 64, 8192, "height = 1216"),
}


def check_preset(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The preset keys of a checkpoint table, checked; raises ValueError naming `where`."""
    preset: dict[str, Any] = {}
    for key, (kinds, low, high, example) in PRESET_KEYS.items():
        if key not in values or values[key] is None:
            continue
        value = values[key]
        wrong = isinstance(value, bool) or not isinstance(value, kinds)
        if not wrong and low is not None and high is not None:
            wrong = not low <= value <= high
        if wrong:
            bounds = f" from {low:g} to {high:g}" if low is not None and high is not None else ""
            raise ValueError(f"{where}: {key} = {value!r} must be "
                             f"{'text' if kinds == (str,) else 'a number'}{bounds}, "
                             f"e.g. {example}")
        preset[key] = float(value) if key == "cfg" else value
    return preset


def apply_preset(spec: JobSpec, preset: dict[str, Any]) -> JobSpec:
    """The job with the checkpoint's preset filling what the job leaves unset."""
    changes = {key: value for key, value in preset.items() if getattr(spec, key) is None}
    return replace(spec, **changes) if changes else spec
