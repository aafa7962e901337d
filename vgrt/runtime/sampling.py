"""The sampling loop: x_T -> x_0 with a diffusers scheduler (DDIM, DPM-Solver++) over any UNet runner."""

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from tqdm.auto import tqdm

from vgrt.engines.base import Runner
from vgrt.errors import InvalidInputError
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.guided_unet import BeforeStep, GuidedUNet, check_guidance_scale
from vgrt.runtime.nonfinite import FirstNonFiniteStep
from vgrt.runtime.residency import step_loop
from vgrt.runtime.schedulers import SchedulerSettings, check_steps, set_timesteps

# after_step(step_index, timestep, latents): runs after each scheduler step and may edit the new
# latents in place (background re-pasting, local blending with inverted latents).
AfterStep = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class SamplingSettings:
    """How one sampling run goes.

    Args:
        steps: inference steps of the schedule.
        guidance_scale: classifier-free guidance; 1 runs the conditional rows only.
        eta: DDIM stochasticity (0 = deterministic); other schedulers take no eta.
        start_step: skip the first steps of the schedule and start from latents already at
            timesteps[start_step] (img2img, sampling from a partial inversion as AIComposer does).
        progress: show a tqdm progress bar.
    """

    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    start_step: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_step_count(self.steps)
        check_guidance_scale(self.guidance_scale)
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise InvalidInputError(f"eta must be >= 0 and finite, got {self.eta}")
        if not 0 <= self.start_step < self.steps:
            raise InvalidInputError(f"start_step must lie in [0, steps={self.steps}), got {self.start_step}")


@dataclass(frozen=True)
class Phase:
    """From `start_step` on, the sampling loop calls `runner` with `conditioning` and `guidance_scale`
    instead of what the steps before used. The scheduler stays the same, so a multistep solver's history
    (DPM-Solver++) carries over. A method uses it where the later steps need less: the plain UNet where
    every gate is 0, one row (guidance_scale 1) where both guidance halves would be the same.
    """

    start_step: int
    runner: Runner
    conditioning: Conditioning
    guidance_scale: float


def check_phases(phases: Sequence[Phase], settings: SamplingSettings) -> None:
    """Phases start in increasing order inside the run's steps (after its first), checked before any work."""
    starts = [phase.start_step for phase in phases]
    bounds = (settings.start_step, *starts, settings.steps)
    if any(earlier >= later for earlier, later in pairwise(bounds)):
        raise InvalidInputError(
            f"phase start steps {starts} must increase and lie between the run's start_step={settings.start_step} "
            f"and steps={settings.steps}, both excluded"
        )


def check_step_count(steps: int) -> None:
    """Steps must be a whole number from 1 to the schedule's training timesteps, checked before any work."""
    check_steps(steps)
    most = SchedulerSettings.num_train_timesteps
    if steps > most:
        raise InvalidInputError(f"steps={steps} exceeds the schedule's {most} training timesteps; use at most {most}")


def random_latents(
    shape: tuple[int, ...], generator: torch.Generator, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """x_T: unit Gaussian noise (DDIM and DPM-Solver start at sigma 1), drawn on the CPU so a seed gives the
    same latents on every device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def denoise(
    runner: Runner,
    scheduler,
    latents: torch.Tensor,
    conditioning: Conditioning,
    settings: SamplingSettings = SamplingSettings(),
    *,
    generator: torch.Generator | None = None,
    before_step: BeforeStep | None = None,
    after_step: AfterStep | None = None,
    phases: Sequence[Phase] = (),
) -> torch.Tensor:
    """Denoise `latents` [B, C, h, w] (left untouched) and return the final latents.

    `runner` with `conditioning` and `settings.guidance_scale` runs every step, or the steps before the
    first of `phases` (see Phase), whose UNets then take over; `before_step` gets the feed of the UNet
    that runs its step.

    `scheduler` is a diffusers scheduler whose model input is the latent itself (DDIM, DPM-Solver;
    see vgrt.runtime.schedulers); the loop calls its set_timesteps. `generator` drives the noise of
    stochastic steps (eta > 0). With an onnxruntime runner, OrtSettings(reuse_outputs=True) saves a copy
    per step: the loop is done with each output before the next call. NaN or infinite latents raise
    NumericalError naming the first bad step, once the loop is over (no host read per step). Nothing in
    the loop reads device data on the host or copies it across devices (vgrt.runtime.residency), the
    hooks included.
    """
    check_phases(phases, settings)
    options = _step_options(scheduler, settings.eta, generator)
    set_timesteps(scheduler, settings.steps)
    latents = latents.clone()
    first = Phase(settings.start_step, runner, conditioning, settings.guidance_scale)
    unets = _unet_per_step((first, *phases), latents, scheduler.timesteps, settings.steps)
    steps = range(settings.start_step, settings.steps)
    watch = FirstNonFiniteStep("denoise", latents.device)
    with step_loop("denoise"):
        for i in tqdm(steps, desc="denoise", disable=not settings.progress):
            t = scheduler.timesteps[i]  # on the host, as the scheduler keeps and reads it
            unet = unets[i]
            if before_step is not None:
                before_step(i, t, latents, unet.feed)
            latents = scheduler.step(unet(latents, i), t, latents, **options)[0]
            if after_step is not None:
                after_step(i, t, latents)
            watch.update(i, latents)
    watch.check(f"steps {steps.start}-{steps.stop - 1}")
    return latents


def _unet_per_step(
    phases: Sequence[Phase], latents: torch.Tensor, timesteps: torch.Tensor, steps: int
) -> dict[int, GuidedUNet]:
    """Each step's GuidedUNet, every one built (feed and buffers) before the loop."""
    unets = {}
    for phase, (start, end) in zip(phases, pairwise([*(p.start_step for p in phases), steps])):
        unet = GuidedUNet(phase.runner, phase.conditioning, phase.guidance_scale, latents, timesteps)
        unets.update(dict.fromkeys(range(start, end), unet))
    return unets


def _step_options(scheduler, eta: float, generator: torch.Generator | None) -> dict:
    accepted = inspect.signature(scheduler.step).parameters
    if eta and "eta" not in accepted:
        raise InvalidInputError(f"eta={eta} is a DDIM setting; {type(scheduler).__name__} takes no eta: use eta=0")
    options = {"return_dict": False}
    if "eta" in accepted:
        options["eta"] = eta
    if "generator" in accepted:
        options["generator"] = generator
    return options
