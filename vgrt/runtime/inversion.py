"""DDIM inversion: x_0 -> x_T over any UNet runner, keeping every intermediate latent.

Methods re-use the trajectory while sampling: MCA-Ctrl overwrites its reference branches with it
every step, AIComposer re-pastes the background from it. Step k feeds the UNet the latent after k
steps at the *next* (noisier) timestep, as diffusers' DDIMInverseScheduler and the MasaCtrl / MCA-Ctrl
`invert` do.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vgrt.engines.base import Runner
from vgrt.errors import InvalidInputError
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.guided_unet import BeforeStep, GuidedUNet, check_guidance_scale
from vgrt.runtime.nonfinite import FirstNonFiniteStep
from vgrt.runtime.residency import step_loop
from vgrt.runtime.sampling import check_step_count
from vgrt.runtime.schedulers import set_timesteps


@dataclass(frozen=True)
class InversionSettings:
    """How one inversion goes.

    Args:
        steps: inference steps of the schedule (use the sampling run's count).
        guidance_scale: 1 (plain conditional UNet) in AIComposer; MCA-Ctrl uses 7.5 with equal
            prompts, which is the same thing at twice the cost.
        end_step: run only the first end_step steps (AIComposer inverts 10 of 20); None runs all.
        progress: show a tqdm progress bar.
    """

    steps: int = 50
    guidance_scale: float = 1.0
    end_step: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_step_count(self.steps)
        check_guidance_scale(self.guidance_scale)
        if self.end_step is not None and not 1 <= self.end_step <= self.steps:
            raise InvalidInputError(f"end_step must lie in [1, steps={self.steps}] or be None, got {self.end_step}")


def invert(
    runner: Runner,
    scheduler,
    latents: torch.Tensor,
    conditioning: Conditioning,
    settings: InversionSettings = InversionSettings(),
    *,
    before_step: BeforeStep | None = None,
) -> torch.Tensor:
    """Invert clean `latents` [B, C, h, w] with a 'ddim_inverse' scheduler (see vgrt.runtime.schedulers).

    Returns the trajectory [K+1, B, C, h, w] (K steps run): trajectory[0] is the input and
    trajectory[k] the latent after k steps. Sampling with the same step count starting at step
    start_step = steps - K reads trajectory[K - (i - start_step)] as the latent at its step i (with all
    steps inverted: trajectory[-1 - i]). NaN or infinite latents raise NumericalError naming the first
    bad step, once the loop is over (no host read per step).
    """
    set_timesteps(scheduler, settings.steps)
    timesteps = scheduler.timesteps[: settings.end_step]
    trajectory = torch.empty((len(timesteps) + 1, *latents.shape), dtype=latents.dtype, device=latents.device)
    trajectory[0] = latents
    current = latents.clone()
    unet = GuidedUNet(runner, conditioning, settings.guidance_scale, current, scheduler.timesteps)
    watch = FirstNonFiniteStep("invert", latents.device)
    with step_loop("invert"):
        for i in tqdm(range(len(timesteps)), desc="invert", disable=not settings.progress):
            t = timesteps[i]
            if before_step is not None:
                before_step(i, t, current, unet.feed)
            current = scheduler.step(unet(current, i), t, current, return_dict=False)[0]
            trajectory[i + 1] = current
            watch.update(i, current)
    watch.check(f"steps 0-{len(timesteps) - 1}")
    return trajectory
