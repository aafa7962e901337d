"""One UNet call per step over any runner, with classifier-free guidance batched into that call.

The feed is built once per run; each step only copies the latents and the timestep into its
buffers, so the host work per step is two small copies, the runner call and the guidance combine.
"""

import math
from collections.abc import Callable

import torch

from vgrt.engines.base import Runner
from vgrt.errors import InvalidInputError
from vgrt.runtime.conditioning import Conditioning, unet_inputs
from vgrt.runtime.residency import host_reads_allowed

# before_step(step_index, timestep, latents, feed): runs before each UNet call. It may edit the feed
# in place or replace its entries (gates, masks, per-step tokens) and overwrite rows of the latents
# (reference branches taken from an inversion). The feed is that of the UNet running the step (a
# sampling Phase may switch it) and holds all its rows: with guidance, rows
# [0, B) are unconditional and [B, 2B) conditional. sample and timestep belong to the loop, which fills
# them after the hook from the latents and the schedule.
BeforeStep = Callable[[int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None]


def check_guidance_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale >= 1.0):  # an infinite scale makes every step NaN
        raise InvalidInputError(f"guidance_scale must be >= 1 and finite (1 turns guidance off), got {scale}")


class GuidedUNet:
    """Predicts the model output for B latent rows; with guidance_scale > 1 the UNet sees 2B rows.

    Args:
        runner: an active runner whose spec has sample, timestep and the model output first among its outputs.
        latents: the first step's latents [B, C, h, w]; fixes batch, shape, device.
        timesteps: the run's timesteps, copied once into the spec's timestep dtype.
    """

    def __init__(
        self,
        runner: Runner,
        conditioning: Conditioning,
        guidance_scale: float,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
    ):
        check_guidance_scale(guidance_scale)
        if latents.ndim != 4 or not latents.is_floating_point():
            raise InvalidInputError(
                f"latents must be a float tensor [batch, channels, height, width], got {latents.dtype} {tuple(latents.shape)}"
            )
        spec = runner.spec
        self.runner, self.guidance_scale = runner, guidance_scale
        self.guided = guidance_scale > 1.0
        self.output_name = spec.outputs[0].name
        copies = 2 if self.guided else 1
        rows, device = latents.shape[0], latents.device
        sample = torch.empty(
            (copies * rows, *latents.shape[1:]), dtype=getattr(torch, spec.input("sample").dtype), device=device
        )
        timestep_dtype = getattr(torch, spec.input("timestep").dtype)
        self.timestep = torch.empty(copies * rows, dtype=timestep_dtype, device=device)
        self.timesteps = timesteps.to(device=device, dtype=timestep_dtype)
        self.sample_copies = sample.view(copies, *latents.shape)  # one broadcast copy fills both halves
        self.feed = {
            **unet_inputs(spec, conditioning, rows, self.guided, device),
            "sample": sample,
            "timestep": self.timestep,
        }
        self.validated = False

    def __call__(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """Model output for `latents` at the run's `step`-th timestep, guidance applied, in latents' dtype."""
        self.sample_copies.copy_(latents)
        self.timestep.copy_(self.timesteps[step])
        if not self.validated:
            with host_reads_allowed("the first feed is validated once"):
                self._validate_first_feed(latents)
        output = self.runner.infer(self.feed, validate=False)[self.output_name].to(latents.device, latents.dtype)
        if not self.guided:
            return output
        uncond, cond = output.chunk(2)
        return torch.lerp(uncond, cond, self.guidance_scale)  # uncond + scale * (cond - uncond)

    def _validate_first_feed(self, latents: torch.Tensor) -> None:
        """Checked once, on the feed as the first step's hook left it, before any UNet work."""
        try:
            self.runner.spec.validate(self.feed)
        except InvalidInputError as err:
            rows = f"{latents.shape[0]} latent rows" + (" x2 for classifier-free guidance" if self.guided else "")
            raise InvalidInputError(
                f"the UNet feed for latents {tuple(latents.shape)} ({rows}) does not fit the runner: {err}"
            ) from err
        self.validated = True
