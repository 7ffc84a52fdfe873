"""A1111 sampler names become working diffusers schedulers, or clear errors at intake."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from daemon.contract.samplers import (
    SCHEDULES,
    SamplerChoice,
    SamplerError,
    automatic_schedule,
    choose_sampler,
    make_scheduler,
    parse_sampler,
    samplers_for_kind,
)

# diffusers turns torch tensors into numpy arrays in ways numpy 2 deprecates, once per sigma:
# tens of thousands of warnings that are not ours and slow the run down.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context and return_scalar"),
]

HAVE_SCIPY = importlib.util.find_spec("scipy") is not None
HAVE_TORCHSDE = importlib.util.find_spec("torchsde") is not None

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0, as shipped.
SDXL_SCHEDULER_JSON = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def sdxl_config():
    """What a family plugin passes: `pipe.scheduler.config` of a loaded SDXL pipeline."""
    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_JSON).config


def flux_config():
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    ).config


def wan_config():
    return UniPCMultistepScheduler(
        beta_schedule="linear",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
    ).config


def run_one_step(scheduler, steps: int = 4) -> torch.Tensor:
    """set_timesteps + one step on a random latent, as a pipeline would do it."""
    kwargs = {"mu": 0.8} if scheduler.config.get("use_dynamic_shifting") else {}
    scheduler.set_timesteps(steps, **kwargs)
    generator = torch.Generator().manual_seed(0)
    # Flow-matching schedulers start from unit noise and need no input scaling.
    latent = torch.randn(1, 4, 8, 8, generator=generator) * getattr(
        scheduler, "init_noise_sigma", 1.0
    )
    timestep = scheduler.timesteps[0]
    model_input = latent
    if hasattr(scheduler, "scale_model_input"):
        model_input = scheduler.scale_model_input(latent, timestep)
    noise_pred = torch.randn(model_input.shape, generator=generator)
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    out = scheduler.step(noise_pred, timestep, latent, **step_kwargs).prev_sample
    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    return out


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "schedule", "expected"),
    [
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("  dpm++   2m  KARRAS ", None, ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "Karras")),
        ("DPM++ 2M SDE", "Exponential", ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ SDE Karras", None, ("DPM++ SDE", "Karras")),
        ("DPM2 a Karras", None, ("DPM2 a", "Karras")),
        ("DPM2 Karras", None, ("DPM2", "Karras")),
        ("Euler a", None, ("Euler a", None)),
        ("euler A", "Automatic", ("Euler a", None)),
        ("Euler", "", ("Euler", None)),
        ("Euler SGM Uniform", None, ("Euler", "SGM Uniform")),
        ("Euler", "sgm_uniform", ("Euler", "SGM Uniform")),
        ("DDIM", "SGMUniform", ("DDIM", "SGM Uniform")),
        ("k_dpmpp_2m", None, ("DPM++ 2M", None)),
        ("k_euler_a", None, ("Euler a", None)),
        ("LMS Karras", None, ("LMS", "Karras")),
        ("unipc", "simple", ("UniPC", "Simple")),
        ("LCM", None, ("LCM", None)),
        ("Heun Beta", None, ("Heun", "Beta")),
        # The same schedule twice is not a conflict.
        ("DPM++ 2M Karras", "karras", ("DPM++ 2M", "Karras")),
        # "Automatic" means "none given", so the name's schedule stands (as in A1111).
        ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
    ],
)
def test_parse_accepts_split_and_combined_forms(name, schedule, expected):
    assert parse_sampler(name, schedule) == expected


def test_unknown_sampler_suggests_the_close_name_and_lists_choices():
    with pytest.raises(SamplerError) as caught:
        parse_sampler("Eular a")
    message = str(caught.value)
    assert "'Eular a'" in message
    assert "Did you mean 'Euler a'" in message
    assert "Valid samplers: Euler, Euler a, DPM++ 2M" in message


def test_misspelled_combined_form_suggests_the_combined_name():
    with pytest.raises(SamplerError, match=r"Did you mean 'DPM\+\+ 2M Karras'"):
        parse_sampler("DPM++ 2M Karas")


def test_unknown_schedule_type_is_named_with_a_suggestion():
    with pytest.raises(SamplerError) as caught:
        parse_sampler("Euler", "Karas")
    assert "unknown schedule type 'Karas'" in str(caught.value)
    assert "Did you mean 'Karras'" in str(caught.value)
    assert "Exponential" in str(caught.value)


def test_a_schedule_given_twice_and_different_is_an_error():
    with pytest.raises(SamplerError, match="'Karras'.*'Exponential'"):
        parse_sampler("DPM++ 2M Karras", "Exponential")


def test_empty_sampler_name_is_an_error():
    with pytest.raises(SamplerError, match="empty"):
        parse_sampler("   ")


def test_samplers_for_each_kind():
    assert samplers_for_kind("flow") == ["Euler", "UniPC"]
    eps = samplers_for_kind("eps")
    assert eps[:3] == ["Euler", "Euler a", "DPM++ 2M"]
    assert {"DPM++ 2M SDE", "DPM++ SDE", "DPM2", "DPM2 a", "Heun", "LMS", "DDIM", "LCM"} <= set(eps)
    with pytest.raises(SamplerError, match="valid kinds: eps, flow"):
        samplers_for_kind("video")


def test_automatic_follows_a1111():
    assert automatic_schedule("DPM++ 2M") == "Karras"
    assert automatic_schedule("dpm++ sde") == "Karras"
    assert automatic_schedule("DPM++ 2M SDE") == "Exponential"
    assert automatic_schedule("DPM2 a") == "Karras"
    assert automatic_schedule("Euler a") is None


# --- every eps combination builds and steps ----------------------------------------------


def expected_problem(sampler: str, schedule: str | None) -> str | None:
    """What should refuse this combination here, independent of the module's own logic."""
    if sampler == "LMS" and not HAVE_SCIPY:
        return "needs the Python package scipy"
    if sampler in ("Euler a", "DDIM", "LCM") and schedule in ("Karras", "Exponential", "Beta"):
        return "has no schedule type"
    if sampler == "DPM++ SDE" and not HAVE_TORCHSDE and schedule in ("SGM Uniform", "Simple"):
        return "has no schedule type"  # DPMSolverSinglestepScheduler has fixed spacing
    if schedule == "Beta" and not HAVE_SCIPY:
        return "needs the Python package scipy"
    return None


FLAG_FOR = {
    "Karras": "use_karras_sigmas",
    "Exponential": "use_exponential_sigmas",
    "Beta": "use_beta_sigmas",
}


@pytest.mark.parametrize("schedule", [None, *SCHEDULES])
@pytest.mark.parametrize("sampler", samplers_for_kind("eps"))
def test_every_sdxl_combination_builds_and_steps_or_is_refused(sampler, schedule):
    problem = expected_problem(sampler, schedule)
    if problem:
        with pytest.raises(SamplerError, match=problem):
            choose_sampler(sampler, schedule)
        with pytest.raises(SamplerError, match=problem):
            make_scheduler(sdxl_config(), sampler, schedule)
        return

    assert choose_sampler(sampler, schedule) == SamplerChoice(sampler, schedule, "eps")
    scheduler = make_scheduler(sdxl_config(), sampler, schedule)
    run_one_step(scheduler)

    config = scheduler.config
    effective = schedule or automatic_schedule(sampler)
    for name, flag in FLAG_FOR.items():
        if flag in config:
            assert config[flag] is (name == effective), flag
    if schedule in ("SGM Uniform", "Simple") and sampler != "LCM":
        assert config["timestep_spacing"] == "trailing"
        assert int(scheduler.timesteps[0]) == 999  # starts at the last training step
    # The model's training setup survives the change of sampler.
    assert config["beta_schedule"] == "scaled_linear"
    assert config["beta_start"] == 0.00085
    assert config["beta_end"] == 0.012
    assert config["prediction_type"] == "epsilon"


@pytest.mark.parametrize(
    ("sampler", "class_name", "options"),
    [
        ("Euler", "EulerDiscreteScheduler", {}),
        ("Euler a", "EulerAncestralDiscreteScheduler", {}),
        ("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        ("DPM2", "KDPM2DiscreteScheduler", {}),
        ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}),
        ("Heun", "HeunDiscreteScheduler", {}),
        ("UniPC", "UniPCMultistepScheduler", {"use_flow_sigmas": False}),
        ("DDIM", "DDIMScheduler", {}),
        ("LCM", "LCMScheduler", {}),
    ],
)
def test_sampler_table(sampler, class_name, options):
    scheduler = make_scheduler(sdxl_config(), sampler, None)
    assert type(scheduler).__name__ == class_name
    for key, value in options.items():
        assert scheduler.config[key] == value
    if "solver_order" in scheduler.config:
        assert scheduler.config["solver_order"] == 2


def test_dpmpp_sde_uses_the_torchsde_port_only_when_it_can():
    scheduler = make_scheduler(sdxl_config(), "DPM++ SDE", None)
    if HAVE_TORCHSDE:
        assert type(scheduler).__name__ == "DPMSolverSDEScheduler"
    else:
        assert type(scheduler).__name__ == "DPMSolverSinglestepScheduler"
        assert scheduler.config["algorithm_type"] == "sde-dpmsolver++"
        assert scheduler.config["solver_order"] == 2
    assert scheduler.config["use_karras_sigmas"] is True  # A1111's Automatic for DPM++ SDE


def test_training_params_of_the_model_are_kept():
    base = EulerDiscreteScheduler.from_config(
        {
            **SDXL_SCHEDULER_JSON,
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
        }
    ).config
    scheduler = make_scheduler(base, "DPM++ 2M", "Karras")
    assert scheduler.config["prediction_type"] == "v_prediction"
    assert scheduler.config["rescale_betas_zero_snr"] is True
    assert scheduler.config["timestep_spacing"] == "trailing"
    assert scheduler.config["steps_offset"] == 1
    euler = make_scheduler(base, "Euler", None)
    assert euler.config["timestep_spacing"] == "trailing"  # no schedule asked: model's own


def test_the_previous_samplers_method_does_not_leak():
    base = DPMSolverMultistepScheduler.from_config(
        SDXL_SCHEDULER_JSON,
        algorithm_type="sde-dpmsolver++",
        solver_order=3,
        use_karras_sigmas=True,
        use_lu_lambdas=False,
    ).config
    scheduler = make_scheduler(base, "DPM++ 2M", "Exponential")
    assert scheduler.config["algorithm_type"] == "dpmsolver++"
    assert scheduler.config["solver_order"] == 2
    assert scheduler.config["use_karras_sigmas"] is False
    assert scheduler.config["use_exponential_sigmas"] is True
    euler = make_scheduler(base, "Euler", None)
    assert euler.config["use_karras_sigmas"] is False


def test_values_the_model_never_set_take_the_new_class_defaults():
    # As diffusers' from_config does: a default of the old class is not a model setting.
    base = EulerDiscreteScheduler(beta_schedule="scaled_linear").config
    assert "timestep_spacing" in base["_use_default_values"]
    ddim = make_scheduler(base, "DDIM", None)
    assert ddim.config["timestep_spacing"] == "leading"  # DDIMScheduler's default
    assert ddim.config["beta_schedule"] == "scaled_linear"


def test_unsupported_schedule_names_what_fits():
    with pytest.raises(SamplerError) as caught:
        make_scheduler(sdxl_config(), "Euler a", "Karras")
    message = str(caught.value)
    assert "'Euler a' has no schedule type 'Karras'" in message
    assert "EulerAncestralDiscreteScheduler" in message
    assert "SGM Uniform, Simple" in message
    with pytest.raises(SamplerError, match="'DDIM' has no schedule type 'Karras'"):
        choose_sampler("DDIM Karras")


# --- flow models -------------------------------------------------------------------------


@pytest.mark.parametrize("config_factory", [flux_config, wan_config], ids=["flux", "wan"])
@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [
        ("Euler", None),
        ("Euler", "Simple"),
        ("Euler", "Karras"),
        ("Euler", "Exponential"),
        ("UniPC", None),
        ("UniPC", "Simple"),
    ],
)
def test_flow_samplers_build_and_step(config_factory, sampler, schedule):
    scheduler = make_scheduler(config_factory(), sampler, schedule, kind="flow")
    run_one_step(scheduler)


def test_flow_euler_keeps_shift_from_either_spelling():
    from_flux = make_scheduler(flux_config(), "Euler", None, kind="flow")
    assert type(from_flux).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert from_flux.config["shift"] == 3.0
    assert from_flux.config["use_dynamic_shifting"] is True
    assert from_flux.config["max_shift"] == 1.15
    from_wan = make_scheduler(wan_config(), "Euler", None, kind="flow")
    assert from_wan.config["shift"] == 5.0  # Wan's UniPC calls it flow_shift


def test_flow_unipc_is_the_flow_prediction_variant():
    from_wan = make_scheduler(wan_config(), "UniPC", None, kind="flow")
    assert type(from_wan).__name__ == "UniPCMultistepScheduler"
    assert from_wan.config["prediction_type"] == "flow_prediction"
    assert from_wan.config["use_flow_sigmas"] is True
    assert from_wan.config["flow_shift"] == 5.0
    from_flux = make_scheduler(flux_config(), "UniPC", None, kind="flow")
    assert from_flux.config["flow_shift"] == 3.0
    assert from_flux.config["use_dynamic_shifting"] is True


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M Karras", "DDIM", "LCM"])
def test_eps_only_sampler_on_a_flow_model_names_what_fits(name):
    with pytest.raises(SamplerError) as caught:
        choose_sampler(name, kind="flow")
    assert "flow-matching" in str(caught.value)
    assert "Samplers that fit: Euler, UniPC" in str(caught.value)
    with pytest.raises(SamplerError, match="Euler, UniPC"):
        make_scheduler(flux_config(), name, None, kind="flow")


@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [("Euler", "SGM Uniform"), ("UniPC", "Karras"), ("UniPC", "Exponential")],
)
def test_flow_schedule_that_does_not_apply_is_refused(sampler, schedule):
    with pytest.raises(SamplerError, match="on flow-matching models has no schedule type"):
        choose_sampler(sampler, schedule, kind="flow")


def test_a_kind_that_contradicts_the_pipeline_config_is_caught():
    with pytest.raises(SamplerError, match="kind 'flow' models, but kind 'eps'"):
        make_scheduler(flux_config(), "Euler", None, kind="eps")
    with pytest.raises(SamplerError, match="kind 'eps' models, but kind 'flow'"):
        make_scheduler(sdxl_config(), "Euler", None, kind="flow")
