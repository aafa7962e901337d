"""Deterministic sampling with gradients: x_T and the text context -> x_0 through the PyTorch UNet.

An engine gives no gradients, so the gradient steps (PNO) sample through the PyTorch module the engine
was exported from. The math is that of `vgrt.runtime.sampling.denoise` over `GuidedUNet`: one UNet call
per step with the unconditional rows first, guidance as `lerp(uncond, cond, scale)`, the diffusers
scheduler's own step. So an engine given the optimised inputs samples what the gradient saw.

With `checkpoint=True` every UNet call runs under `torch.utils.checkpoint` (non-reentrant): its
activations are recomputed during the backward pass instead of kept, so what autograd holds grows by
a few latent-sized tensors per step instead of one UNet's activations per step.

With `precision="bf16"` every UNet call runs under bf16 autocast (vgrt.runtime.gradient_precision; the
recomputation of a checkpointed call too, as checkpointing keeps the autocast state), and its output is
cast back to the latents' dtype before guidance and the scheduler's step.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpointed

from vgrt.errors import InvalidInputError
from vgrt.runtime.gradient_precision import gradient_autocast
from vgrt.runtime.guided_unet import check_guidance_scale
from vgrt.runtime.nonfinite import FirstNonFiniteStep
from vgrt.runtime.residency import step_loop
from vgrt.runtime.schedulers import set_timesteps


def sample_with_grad(
    unet: nn.Module,
    scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int,
    guidance_scale: float,
    checkpoint: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Final latents [B, C, h, w] from x_T `noise` under the contexts `cond` and `uncond` [B, L, D].

    `unet(sample, timestep, encoder_hidden_states)` is a PyTorch UNet (ConditionedUNet, or
    `Composer.module("unet")`); `scheduler` a diffusers scheduler with a deterministic step (DDIM with
    eta 0). Gradients flow to `noise` and `cond` when they require them; `uncond` must have the length
    of `cond` (pad it with zero tokens as VCF does). Floats follow `noise`'s dtype. NaN or infinite
    latents raise NumericalError naming the first bad step, once the loop is over. `precision`: 'fp32', or
    'bf16' for UNet calls under bf16 autocast (check the device first: `check_gradient_precision`).
    """
    check_guidance_scale(guidance_scale)
    guided = guidance_scale > 1.0
    if guided and uncond.shape != cond.shape:
        raise InvalidInputError(
            f"the unconditional context {tuple(uncond.shape)} must have the conditional context's shape "
            f"{tuple(cond.shape)}: pad the shorter one with zero tokens"
        )
    set_timesteps(scheduler, steps)
    context = torch.cat([uncond, cond]) if guided else cond
    rows = context.shape[0]
    latents = noise
    timesteps = scheduler.timesteps.to(noise.device, noise.dtype)  # the UNet's copy, moved once
    watch = FirstNonFiniteStep("gradient sampling", noise.device)
    with step_loop("gradient sampling"):
        for i, t in enumerate(scheduler.timesteps):
            sample = torch.cat([latents, latents]) if guided else latents
            timestep = timesteps[i].expand(rows)
            with gradient_autocast(precision, noise.device):
                if checkpoint:
                    output = checkpointed(unet, sample, timestep, context, use_reentrant=False)
                else:
                    output = unet(sample, timestep, context)
            output = output.to(noise.device, noise.dtype)
            if guided:
                uncond_out, cond_out = output.chunk(2)
                output = torch.lerp(uncond_out, cond_out, guidance_scale)
            latents = scheduler.step(output, t, latents, return_dict=False)[0]
            watch.update(i, latents)
    watch.check(f"steps 0-{steps - 1}")
    return latents
