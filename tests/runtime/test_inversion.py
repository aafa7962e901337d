"""DDIM inversion keeps its whole trajectory, and sampling from it comes back to the input.

Measured on the tiny preset (random weights), torch backend, fp32, 2 rows of 16x16 latents, 8 random
context tokens, guidance 1, DDIM eta 0 (relative L2 error of the reconstruction):

    prediction   10 steps   50 steps   20 steps, 10 inverted (AIComposer)
    epsilon      0.85       0.48       0.030
    v            0.23       0.054      0.096

The error is DDIM inversion's own (step k evaluates the UNet at the latent of step k-1), amplified up to
1/sqrt(alphas_cumprod[981]) ~ 15x on the way back because a random UNet is no denoiser. It falls about
as 1/steps, as that error should (one row, onnxruntime, epsilon: 0.39, 0.24, 0.14, 0.06 at 50, 100, 200,
500 steps). Trained weights should reconstruct far better; none can be loaded here to show it.
"""

import pytest
import torch

from vgrt.errors import InvalidInputError
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.inversion import InversionSettings, invert
from vgrt.runtime.sampling import SamplingSettings, denoise
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

from .helpers import RecordingRunner, clean_latents, relative_error, text_conditioning

PREDICTIONS = {"epsilon": "sd15", "v_prediction": "sd21"}


def reconstruction_error(runner, preset: str, steps: int, inverted: int | None = None) -> float:
    """Invert `inverted` of `steps` steps (None: all), sample back from there, compare with the input."""
    settings = SchedulerSettings.for_preset(preset)
    conditioning, latents = Conditioning(text_conditioning().cond), clean_latents()
    inversion = InversionSettings(steps=steps, end_step=inverted, progress=False)
    trajectory = invert(runner, build_scheduler("ddim_inverse", settings), latents, conditioning, inversion)
    sampling = SamplingSettings(
        steps=steps, guidance_scale=1.0, start_step=steps - (len(trajectory) - 1), progress=False
    )
    return relative_error(
        denoise(runner, build_scheduler("ddim", settings), trajectory[-1], conditioning, sampling), latents
    )


def test_the_trajectory_holds_every_latent_from_x0_to_xt(runners):
    recording, latents = RecordingRunner(runners["onnxruntime"]), clean_latents()
    scheduler = build_scheduler("ddim_inverse")
    trajectory = invert(
        recording,
        scheduler,
        latents,
        text_conditioning(),
        InversionSettings(steps=6, guidance_scale=2.0, progress=False),
    )
    assert trajectory.shape == (7, *latents.shape)
    assert torch.equal(trajectory[0], latents) and torch.equal(latents, clean_latents())  # the input is left alone
    fed = [int(feed["timestep"][0]) for feed in recording.feeds]
    assert fed == scheduler.timesteps.tolist() == sorted(fed)  # from low noise up
    assert all(torch.equal(feed["sample"][: len(latents)], trajectory[k]) for k, feed in enumerate(recording.feeds))


@pytest.mark.parametrize(
    ("prediction", "bound_at_50", "gain_10_to_50"), [("epsilon", 0.6, 0.7), ("v_prediction", 0.08, 0.5)]
)
def test_inversion_then_sampling_reconstructs_the_input(runners, prediction, bound_at_50, gain_10_to_50):
    runner, preset = runners["torch"], PREDICTIONS[prediction]
    error_at_10 = reconstruction_error(runner, preset, steps=10)
    error_at_50 = reconstruction_error(runner, preset, steps=50)
    assert error_at_50 <= bound_at_50
    assert error_at_50 <= gain_10_to_50 * error_at_10  # converges with the step count


@pytest.mark.parametrize(("prediction", "bound"), [("epsilon", 0.05), ("v_prediction", 0.15)])
def test_sampling_from_a_partial_inversion_reconstructs_the_input(runners, prediction, bound):
    assert reconstruction_error(runners["torch"], PREDICTIONS[prediction], steps=20, inverted=10) <= bound


def test_bad_inversion_settings_are_refused():
    with pytest.raises(InvalidInputError, match=r"end_step must lie in \[1, steps=10\]"):
        InversionSettings(steps=10, end_step=11)
    with pytest.raises(InvalidInputError, match="guidance_scale must be >= 1"):
        InversionSettings(guidance_scale=0.0)
