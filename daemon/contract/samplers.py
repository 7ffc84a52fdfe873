"""A1111 sampler names -> diffusers schedulers.

Users bring sampler names from AUTOMATIC1111, Forge and Civitai ("DPM++ 2M Karras", or since
A1111 1.9 the split form "DPM++ 2M" + Schedule type "Karras"). This module turns such a name
into one canonical (sampler, schedule) pair at intake, so that a name that does not fit a
model family is a clear error when the job arrives, not a crash at render time, and later
builds the matching diffusers scheduler from the pipeline's own scheduler config.

The scheduler is always rebuilt from the pipeline's config because that config describes the
trained model (betas, prediction type, timestep spacing, flow shift...); only what describes
the previous *sampling method* is dropped and replaced by the chosen sampler's options.

Schedule ``None`` means A1111's "Automatic": the sampler's own default, which in A1111 >= 1.9
is Karras for DPM++ 2M, DPM++ SDE, DPM2 and DPM2 a and Exponential for DPM++ 2M SDE (their
`samplers_k_diffusion` options). An infotext without "Schedule type" is read by A1111 the same
way, so a render and its re-render in A1111 agree.

Import cost: parsing names needs no diffusers import; checking fit and building schedulers
imports diffusers (and torch) on first use.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

KINDS = ("eps", "flow")
SCHEDULES = ("Karras", "Exponential", "Beta", "SGM Uniform", "Simple")

# Scheduler __init__ options that select a schedule of sigmas; exactly one may be on.
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# Schedule type -> scheduler options, for noise-prediction (eps / v) models. SGM Uniform and
# Simple both space timesteps evenly from the very last training step, which diffusers calls
# "trailing" spacing.
_EPS_SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Simple": {"timestep_spacing": "trailing"},
}

# Flow-matching models have no timestep spacing to choose. Forge and ComfyUI's "Simple" on a
# flow model picks evenly spaced steps of the shifted sigma table, which is what the diffusers
# flow schedulers already do by default, so it maps to no option at all. Karras, Exponential
# and Beta reshape the shifted sigmas where the class supports it.
_FLOW_SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "Simple": {},
}

# Optional packages some schedulers need; diffusers swaps in a placeholder class without them.
_SCHEDULE_NEEDS = {"Beta": "scipy"}

# Keys of a scheduler config that describe the previous sampling method rather than the
# trained model; they are dropped so that they do not leak into the new sampler.
_SAMPLER_METHOD_KEYS = frozenset(
    {
        *_SIGMA_FLAGS,
        "use_lu_lambdas",
        "use_flow_sigmas",
        "algorithm_type",
        "solver_order",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "final_sigmas_type",
        "variance_type",
        "lambda_min_clipped",
        "predict_x0",
        "disable_corrector",
        "solver_p",
        "interpolation_type",
        "stochastic_sampling",
        "noise_sampler_seed",
    }
)


class SamplerError(ValueError):
    """A sampler or schedule name that is unknown, or that does not fit the model or install."""


@dataclass(frozen=True)
class SamplerChoice:
    """A checked sampler choice: canonical A1111 names plus the model kind it was checked for."""

    sampler: str  # canonical A1111 name, e.g. "DPM++ 2M"
    schedule: str | None  # canonical schedule type, e.g. "Karras"; None = Automatic
    kind: str  # "eps" (SD/SDXL-style noise prediction) or "flow" (flow matching)


@dataclass(frozen=True)
class _Recipe:
    """How to build one sampler as a diffusers scheduler."""

    class_name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    needs: str | None = None  # optional package without which diffusers has only a placeholder
    # Schedule types that work, where the __init__ signature would claim more than works.
    schedules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _SamplerDef:
    name: str
    # First recipe whose optional package is installed wins.
    eps: tuple[_Recipe, ...]
    flow: _Recipe | None = None
    automatic: str | None = None  # what A1111 >= 1.9 uses for Schedule type "Automatic"
    aliases: tuple[str, ...] = ()  # A1111's own aliases (API and old infotexts)


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

_SAMPLERS: tuple[_SamplerDef, ...] = (
    _SamplerDef(
        "Euler",
        eps=(_Recipe("EulerDiscreteScheduler"),),
        flow=_Recipe("FlowMatchEulerDiscreteScheduler"),
        aliases=("k_euler",),
    ),
    _SamplerDef(
        "Euler a",
        eps=(_Recipe("EulerAncestralDiscreteScheduler"),),
        aliases=("k_euler_a", "k_euler_ancestral"),
    ),
    _SamplerDef(
        "DPM++ 2M",
        eps=(_Recipe("DPMSolverMultistepScheduler", _DPMPP_2M),),
        automatic="Karras",
        aliases=("k_dpmpp_2m",),
    ),
    _SamplerDef(
        "DPM++ 2M SDE",
        eps=(_Recipe("DPMSolverMultistepScheduler", _DPMPP_2M_SDE),),
        automatic="Exponential",
        aliases=("k_dpmpp_2m_sde",),
    ),
    _SamplerDef(
        "DPM++ SDE",
        # The faithful port needs torchsde (Brownian-tree noise). Without it, the single-step
        # second-order SDE solver is the closest diffusers has: same step structure, plain
        # Gaussian noise instead of a Brownian tree.
        eps=(
            _Recipe("DPMSolverSDEScheduler", needs="torchsde"),
            # lower_order_final: diffusers forces it on with a warning when the last sigma is 0.
            _Recipe("DPMSolverSinglestepScheduler", {**_DPMPP_2M_SDE, "lower_order_final": True}),
        ),
        automatic="Karras",
        aliases=("k_dpmpp_sde",),
    ),
    _SamplerDef(
        "DPM2",
        eps=(_Recipe("KDPM2DiscreteScheduler"),),
        automatic="Karras",
        aliases=("k_dpm_2",),
    ),
    _SamplerDef(
        "DPM2 a",
        eps=(_Recipe("KDPM2AncestralDiscreteScheduler"),),
        automatic="Karras",
        aliases=("k_dpm_2_a",),
    ),
    _SamplerDef("Heun", eps=(_Recipe("HeunDiscreteScheduler"),), aliases=("k_heun",)),
    _SamplerDef("LMS", eps=(_Recipe("LMSDiscreteScheduler", needs="scipy"),), aliases=("k_lms",)),
    _SamplerDef(
        "UniPC",
        eps=(_Recipe("UniPCMultistepScheduler"),),
        # Wan's sampler. With flow sigmas, UniPC's Karras/Exponential/Beta options are computed
        # from the (unused) noise-prediction betas and ignore flow_shift, so only the default
        # schedule ("Simple") is offered even though __init__ accepts the flags.
        flow=_Recipe(
            "UniPCMultistepScheduler",
            {"prediction_type": "flow_prediction", "use_flow_sigmas": True},
            schedules=("Simple",),
        ),
    ),
    _SamplerDef("DDIM", eps=(_Recipe("DDIMScheduler"),)),
    _SamplerDef(
        "LCM",
        # LCMScheduler accepts timestep_spacing but derives its steps from
        # original_inference_steps, always starting at the last training step, which is what
        # SGM Uniform / Simple ask for (ComfyUI's usual LCM pairing). Karras & co. it lacks.
        eps=(_Recipe("LCMScheduler", schedules=("SGM Uniform", "Simple")),),
        aliases=("k_lcm",),
    ),
)

_BY_NAME = {definition.name: definition for definition in _SAMPLERS}


def _key(text: str) -> str:
    """Comparison key: case, spaces, underscores and hyphens do not matter.

    So "dpm++ 2m", "DPM++  2M" and "sgm_uniform" / "SGM Uniform" / "SGMUniform" all match.
    """
    return re.sub(r"[\s_\-]+", "", text).lower()


_SAMPLER_KEYS: dict[str, str] = {}
for _definition in _SAMPLERS:
    for _spelling in (_definition.name, *_definition.aliases):
        _SAMPLER_KEYS[_key(_spelling)] = _definition.name
# Longest first, so that "DPM2 a Karras" is read as "DPM2 a" + "Karras", not "DPM2" + "a...".
_SAMPLER_PREFIXES = sorted(_SAMPLER_KEYS, key=len, reverse=True)

_AUTOMATIC = "Automatic"
_SCHEDULE_KEYS: dict[str, str] = {_key(name): name for name in (*SCHEDULES, _AUTOMATIC)}


def samplers_for_kind(kind: str) -> list[str]:
    """Canonical sampler names that fit a model kind ("eps" or "flow"), for error messages."""
    _check_kind(kind)
    return [d.name for d in _SAMPLERS if kind == "eps" or d.flow is not None]


def automatic_schedule(sampler: str) -> str | None:
    """The schedule A1111 >= 1.9 uses for `sampler` when Schedule type is "Automatic"."""
    canonical, _ = parse_sampler(sampler)
    return _BY_NAME[canonical].automatic


def parse_schedule(schedule: str | None) -> str | None:
    """Canonical schedule type for a user's spelling; None, "" and "Automatic" give None."""
    if schedule is None or not schedule.strip():
        return None
    found = _SCHEDULE_KEYS.get(_key(schedule))
    if found is None:
        hint = _did_you_mean(schedule, [*SCHEDULES, _AUTOMATIC])
        raise SamplerError(
            f"unknown schedule type {schedule!r}.{hint} Valid schedule types: "
            f"{', '.join(SCHEDULES)}, or {_AUTOMATIC} (the sampler's default)."
        )
    return None if found == _AUTOMATIC else found


def parse_sampler(name: str, schedule: str | None = None) -> tuple[str, str | None]:
    """Canonical (sampler, schedule) from either A1111 form.

    Accepts the split form ("DPM++ 2M" + "Karras") and the old combined form
    ("DPM++ 2M Karras", "Euler a"), case-insensitively and whitespace-tolerant. A schedule
    inside the name and a different one in `schedule` is an error rather than a silent pick.
    "Automatic" counts as no schedule given, as in A1111.
    """
    given = parse_schedule(schedule)
    key = _key(name)
    if not key:
        raise SamplerError(f"the sampler name is empty. {_valid_samplers_text()}")

    if key in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[key], given

    for prefix in _SAMPLER_PREFIXES:
        rest = key[len(prefix) :]
        if key.startswith(prefix) and rest in _SCHEDULE_KEYS:
            sampler = _SAMPLER_KEYS[prefix]
            in_name = _SCHEDULE_KEYS[rest]
            in_name = None if in_name == _AUTOMATIC else in_name
            if in_name and given and in_name != given:
                raise SamplerError(
                    f"sampler {name!r} names schedule type {in_name!r}, but schedule type "
                    f"{given!r} was also given; give one of them."
                )
            return sampler, in_name or given

    candidates = [d.name for d in _SAMPLERS] + [
        f"{d.name} {schedule_name}" for d in _SAMPLERS for schedule_name in SCHEDULES
    ]
    raise SamplerError(
        f"unknown sampler {name!r}.{_did_you_mean(name, candidates)} {_valid_samplers_text()}"
    )


def choose_sampler(name: str, schedule: str | None = None, kind: str = "eps") -> SamplerChoice:
    """Parse a sampler choice and check that it fits the model kind and this install.

    This is the intake check: it raises SamplerError for a sampler that does not fit the
    kind, a schedule the sampler's scheduler class cannot do, or a missing optional package.
    """
    _check_kind(kind)
    sampler, parsed_schedule = parse_sampler(name, schedule)
    definition = _BY_NAME[sampler]
    if kind == "flow" and definition.flow is None:
        shown = f"{sampler} {parsed_schedule}" if parsed_schedule else sampler
        raise SamplerError(
            f"sampler {shown!r} is for noise-prediction models (SD, SDXL) and does not fit a "
            f"flow-matching model. Samplers that fit: {', '.join(samplers_for_kind('flow'))}."
        )
    recipe = _recipe(definition, kind)
    if parsed_schedule is not None:
        _check_schedule(sampler, parsed_schedule, recipe, kind)
    return SamplerChoice(sampler=sampler, schedule=parsed_schedule, kind=kind)


def make_scheduler(
    base_config: Mapping[str, Any], sampler: str, schedule: str | None, kind: str = "eps"
) -> SchedulerMixin:
    """Build the diffusers scheduler for an A1111 sampler from a pipeline's scheduler config.

    `base_config` is `pipe.scheduler.config`. Everything in it that describes the trained
    model is kept; what describes the previous sampling method is replaced. As with
    diffusers' own `from_config`, keys the config lists in `_use_default_values` were never
    set by the model, so the new class's defaults apply to them.
    """
    choice = choose_sampler(sampler, schedule, kind)
    _check_config_kind(base_config, kind)
    definition = _BY_NAME[choice.sampler]
    recipe = _recipe(definition, kind)
    scheduler_class = _scheduler_class(recipe.class_name)
    accepted = _init_parameters(scheduler_class)

    defaults = set(base_config.get("_use_default_values", ()))
    config = {
        key: value
        for key, value in base_config.items()
        if key in accepted and key not in _SAMPLER_METHOD_KEYS and key not in defaults
    }
    if kind == "flow":
        _carry_flow_shift(base_config, config, accepted)
    config.update(recipe.options)
    # Start from no special sigma schedule; the chosen schedule turns one on below.
    config.update({flag: False for flag in _SIGMA_FLAGS if flag in accepted})

    effective = choice.schedule
    if effective is None and kind == "eps":
        effective = definition.automatic
    if effective is not None:
        config.update(_schedule_table(kind)[effective])
    return scheduler_class.from_config(config)


# --- helpers -------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise SamplerError(f"unknown model kind {kind!r}; valid kinds: {', '.join(KINDS)}.")


def _valid_samplers_text() -> str:
    return (
        f"Valid samplers: {', '.join(d.name for d in _SAMPLERS)}; optionally followed by a "
        f"schedule type: {', '.join(SCHEDULES)}."
    )


def _did_you_mean(text: str, candidates: list[str]) -> str:
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    close = difflib.get_close_matches(" ".join(text.split()).lower(), by_lower, n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(by_lower[c]) for c in close) + "?"


def _schedule_table(kind: str) -> dict[str, dict[str, Any]]:
    return _FLOW_SCHEDULE_OPTIONS if kind == "flow" else _EPS_SCHEDULE_OPTIONS


def _package_available(package: str) -> bool:
    # Ask diffusers rather than importlib: its answer decides whether it exports the real class
    # or a placeholder that raises on use.
    from diffusers.utils import is_scipy_available, is_torchsde_available

    checks = {"scipy": is_scipy_available, "torchsde": is_torchsde_available}
    return checks[package]()


def _recipe(definition: _SamplerDef, kind: str) -> _Recipe:
    if kind == "flow":
        assert definition.flow is not None  # checked by choose_sampler
        candidates: tuple[_Recipe, ...] = (definition.flow,)
    else:
        candidates = definition.eps
    for recipe in candidates:
        if recipe.needs is None or _package_available(recipe.needs):
            return recipe
    missing = sorted({recipe.needs for recipe in candidates if recipe.needs})
    raise SamplerError(
        f"sampler {definition.name!r} needs the Python package {' or '.join(missing)}, which is "
        f"not installed here (pip install {missing[0]}), or choose another sampler."
    )


def _scheduler_class(class_name: str) -> type[SchedulerMixin]:
    import diffusers

    return getattr(diffusers, class_name)


def _init_parameters(scheduler_class: type) -> set[str]:
    return set(inspect.signature(scheduler_class.__init__).parameters) - {"self"}


def _supported_schedules(recipe: _Recipe, kind: str) -> list[str]:
    table = _schedule_table(kind)
    if recipe.schedules is not None:
        return [name for name in recipe.schedules if name in table]
    accepted = _init_parameters(_scheduler_class(recipe.class_name))
    return [name for name, options in table.items() if set(options) <= accepted]


def _check_schedule(sampler: str, schedule: str, recipe: _Recipe, kind: str) -> None:
    supported = _supported_schedules(recipe, kind)
    if schedule not in supported:
        fits = ", ".join(supported) if supported else "none"
        where = " on flow-matching models" if kind == "flow" else ""
        raise SamplerError(
            f"sampler {sampler!r}{where} has no schedule type {schedule!r}: diffusers' "
            f"{recipe.class_name} does not support it{where}. Schedule types that fit "
            f"{sampler!r}: {fits}; or leave the schedule type empty (Automatic)."
        )
    package = _SCHEDULE_NEEDS.get(schedule)
    if package and not _package_available(package):
        raise SamplerError(
            f"schedule type {schedule!r} needs the Python package {package}, which is not "
            f"installed here (pip install {package}), or choose another schedule type."
        )


def _looks_like_flow(config: Mapping[str, Any]) -> bool:
    return (
        str(config.get("_class_name", "")).startswith("FlowMatch")
        or "shift" in config  # only FlowMatch* schedulers have a plain `shift`
        or bool(config.get("use_flow_sigmas"))
        or config.get("prediction_type") == "flow_prediction"
    )


def _check_config_kind(config: Mapping[str, Any], kind: str) -> None:
    """Catch a family plugin passing the wrong kind: it would render noise, not fail."""
    if _looks_like_flow(config) != (kind == "flow"):
        actual = "flow" if kind == "eps" else "eps"
        raise SamplerError(
            f"the pipeline's scheduler config is for kind {actual!r} models, but kind {kind!r} "
            "was asked for; the family plugin should pass the kind of its model."
        )


def _carry_flow_shift(
    base_config: Mapping[str, Any], config: dict[str, Any], accepted: set[str]
) -> None:
    """Keep the model's flow shift across the two spellings diffusers uses for it.

    FlowMatchEulerDiscreteScheduler calls it `shift`, UniPCMultistepScheduler `flow_shift`;
    Wan ships a UniPC config and Flux/HunyuanVideo a FlowMatchEuler one.
    """
    shift = base_config.get("shift", base_config.get("flow_shift"))
    if shift is None:
        return
    for name in ("shift", "flow_shift"):
        if name in accepted and name not in config:
            config[name] = shift
