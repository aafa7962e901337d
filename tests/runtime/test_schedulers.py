"""Schedulers are configured as Stable Diffusion was trained, with the preset's prediction type."""

import pytest

from vgrt.errors import InvalidInputError
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler, set_timesteps


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "dpmsolver++"])
@pytest.mark.parametrize(("preset", "prediction_type"), [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_schedulers_follow_the_sd_schedule_and_the_preset(kind, preset, prediction_type):
    config = build_scheduler(kind, SchedulerSettings.for_preset(preset)).config
    assert config.prediction_type == prediction_type
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.num_train_timesteps, config.timestep_spacing, config.steps_offset) == (1000, "leading", 1)
    if kind == "dpmsolver++":
        assert config.algorithm_type == "dpmsolver++"
    else:
        assert config.set_alpha_to_one is False and config.clip_sample is False


def test_ddim_and_its_inverse_walk_the_same_timesteps():
    ddim, inverse = build_scheduler("ddim"), build_scheduler("ddim_inverse")
    set_timesteps(ddim, 50)
    set_timesteps(inverse, 50)
    assert ddim.timesteps.tolist() == list(range(981, 0, -20))
    assert inverse.timesteps.tolist() == ddim.timesteps.flip(0).tolist()


def test_overrides_win_over_the_preset():
    settings = SchedulerSettings.for_preset("sd21", timestep_spacing="trailing")
    assert settings.prediction_type == "v_prediction" and settings.timestep_spacing == "trailing"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: build_scheduler("euler"), "unknown scheduler 'euler'"),
        (lambda: SchedulerSettings(prediction_type="sample"), "unknown prediction_type"),
        (lambda: SchedulerSettings.for_preset("sd15", timestep_spacing="even"), "unknown timestep_spacing"),
        (lambda: build_scheduler("ddim_inverse", SchedulerSettings(timestep_spacing="linspace")), "no 'linspace'"),
        (lambda: set_timesteps(build_scheduler("ddim"), 0), "steps must be an integer >= 1"),
        (lambda: set_timesteps(build_scheduler("ddim"), 1001), "exceeds the scheduler's 1000 training timesteps"),
    ],
)
def test_bad_scheduler_arguments_are_named(make, message):
    with pytest.raises(InvalidInputError, match=message):
        make()
