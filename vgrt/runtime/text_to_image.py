"""Plain text-to-image: a prompt, DDIM and classifier-free guidance on the plain UNet, nothing else.

Not one of the composition methods: the common ground on which vgrt is compared with pipelines that do
only this (optimum-intel's OVStableDiffusionPipeline in `vgrt bench peer`), and the baseline a
method's extra work is measured against. It computes what diffusers' StableDiffusionPipeline computes
with a DDIM scheduler: guidance is batched into one UNet call per step, unconditional rows first. On
SDXL it is StableDiffusionXLPipeline's computation: both text encoders, the pooled embedding and the
default micro-conditioning (Composer.text_conditioning); an empty negative prompt is the pipeline's
"no negative prompt", zeros where the model sets force_zeros_for_empty_prompt (Composer.unconditional).
"""

from dataclasses import dataclass

import torch

from vgrt.checks import check_seed
from vgrt.errors import InvalidInputError
from vgrt.runtime.composer import Composer
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.methods.common import Composition, decode, split_rows, start
from vgrt.runtime.sampling import SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

COMPONENTS = ("text_encoder", "vae_decoder")  # besides the plain UNet


@dataclass(frozen=True)
class TextToImageRequest:
    """prompt at width x height pixels; `latents` [1, 4, h, w] replace the seeded starting noise (to run
    the same noise through another pipeline)."""

    prompt: str
    width: int
    height: int
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    latents: torch.Tensor | None = None

    def validate(self) -> None:
        SamplingSettings(steps=self.steps, guidance_scale=self.guidance_scale)  # validates both
        check_seed(self.seed)


def compose(composer: Composer, request: TextToImageRequest) -> Composition:
    run = start(
        composer, request, (request.width, request.height), "none", COMPONENTS, check=lambda: _check(composer, request)
    )
    with run.times("encode"):
        text = composer.text_conditioning([request.negative_prompt, request.prompt], request.width, request.height)
        negative, prompt = split_rows(text)
    if not request.negative_prompt:
        negative = composer.unconditional(negative)
    noise = request.latents
    if noise is None:
        shape = (1, composer.preset.unet["in_channels"], *run.latent_hw)
        noise = random_latents(shape, torch.Generator().manual_seed(request.seed), device=composer.device)
    with run.times("denoise"):
        latents = denoise(
            run.unet, build_scheduler("ddim", SchedulerSettings.for_preset(composer.preset)), noise.to(composer.device),
            Conditioning(prompt, negative),
            SamplingSettings(steps=request.steps, guidance_scale=request.guidance_scale, progress=composer.progress),
        )  # fmt: skip
    return Composition(decode(composer, latents, run.times), latents, run.times)


def _check(composer: Composer, request: TextToImageRequest) -> None:
    f, channels = composer.preset.vae_factor, composer.preset.unet["in_channels"]
    shape = (1, channels, request.height // f, request.width // f)
    if request.latents is not None and tuple(request.latents.shape) != shape:
        raise InvalidInputError(
            f"latents have shape {tuple(request.latents.shape)}; {request.width}x{request.height} needs {shape}"
        )
