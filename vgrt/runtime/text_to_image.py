"""Plain text-to-image: a prompt, DDIM and classifier-free guidance on the plain UNet, nothing else.

Not one of the composition methods: the common ground on which vgrt is compared with pipelines that do
only this (optimum-intel's OVStableDiffusionPipeline in `vgrt bench peer`), and the baseline a
method's extra work is measured against. It computes what diffusers' StableDiffusionPipeline computes
with a DDIM scheduler: guidance is batched into one UNet call per step, unconditional rows first.
"""

from dataclasses import dataclass

import torch

from vgrt.checks import check_seed
from vgrt.errors import InvalidInputError
from vgrt.runtime.composer import Composer
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.methods.common import Composition, StageTimes
from vgrt.runtime.sampling import SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler


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
    request.validate()
    if composer.preset.is_sdxl:
        raise InvalidInputError(f"text-to-image runs SD 1.x/2.x presets; {composer.preset.name!r} is SDXL")
    composer.check_image_size(request.width, request.height)
    f = composer.preset.vae_factor
    shape = (1, composer.preset.unet["in_channels"], request.height // f, request.width // f)
    if request.latents is not None and tuple(request.latents.shape) != shape:
        raise InvalidInputError(f"latents have shape {tuple(request.latents.shape)}; {request.width}x{request.height} "
                                f"needs {shape}")  # fmt: skip
    unet = composer.runner("unet")
    composer.open("text_encoder", "vae_decoder")
    times = StageTimes()
    with times("encode"):
        negative, prompt = composer.encode_prompts([request.negative_prompt, request.prompt]).split(1)
    noise = request.latents
    if noise is None:
        noise = random_latents(shape, torch.Generator().manual_seed(request.seed))
    with times("denoise"):
        latents = denoise(
            unet, build_scheduler("ddim", SchedulerSettings.for_preset(composer.preset)), noise,
            Conditioning({"encoder_hidden_states": prompt}, {"encoder_hidden_states": negative}),
            SamplingSettings(steps=request.steps, guidance_scale=request.guidance_scale, progress=composer.progress),
        )  # fmt: skip
    with times("decode"):
        image = composer.decode_latents(latents)
    return Composition(image, latents, times)
