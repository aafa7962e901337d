"""LocRef-Diffusion (arXiv 2411.15252): layout- and appearance-guided generation from reference images.

LocRef has no released code and only its abstract was readable, so this follows the paper's outline and
says where the details are ours:
- Appearance tokens per instance: CLIP image-encoder penultimate tokens of the reference (our choice:
  the class token plus the patch grid average-pooled to 2x2, five tokens) through the Appearance-Net
  (two linear layers and a norm).
- Instance region cross-attention: each instance's tokens are attended only by queries inside its box
  (the `regions` feature: region masks from the boxes, a token-to-instance map).
- Composite-image tokens: the references pasted into their boxes on a grey canvas, encoded the same way;
  they belong to no instance, so every foreground query may attend to them (our choice: they share the
  instances' softmax rather than a cross-attention of their own).
- fg/bg blend: the image tokens' output is gated by the union of the boxes, so the background is
  generated from the text alone. The unconditional half of guidance carries no image tokens.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vgrt.checks import check_seed
from vgrt.errors import InvalidInputError
from vgrt.models.presets import ShapeProfile
from vgrt.runtime.composer import Composer
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.images import Box
from vgrt.runtime.methods.common import Composition, clip_pixels, decode, layer_gates, split_rows, start
from vgrt.runtime.sampling import SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

FEATURES = "extra_tokens,regions"
COMPONENTS = ("text_encoder", "image_encoder", "appearance_net", "vae_decoder")  # besides the UNet
POOLED_GRID = 2  # patch tokens pooled to a 2x2 grid, plus the class token: 5 tokens per image


@dataclass(frozen=True)
class LocRefRequest:
    """A prompt, reference images [1, 3, h, w] in [-1, 1] and one box per reference on the output canvas.

    Args:
        width, height: output size in pixels.
    """

    prompt: str
    references: tuple[torch.Tensor, ...]
    boxes: tuple[Box, ...]
    width: int
    height: int
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0

    def validate(self) -> None:
        if not self.references:
            raise InvalidInputError("LocRef needs at least one reference image with its box")
        if len(self.references) != len(self.boxes):
            raise InvalidInputError(
                f"got {len(self.references)} reference images but {len(self.boxes)} boxes: give one box each"
            )
        for image in self.references:
            if image.dim() != 4 or image.shape[:2] != (1, 3):
                raise InvalidInputError(f"a reference must be an RGB tensor [1, 3, H, W], got {tuple(image.shape)}")
        for box in self.boxes:
            box.check_inside(self.width, self.height)
        SamplingSettings(steps=self.steps, guidance_scale=self.guidance_scale)
        check_seed(self.seed)


def max_references(profile: ShapeProfile) -> int:
    """References one exported UNet (and one image-encoder batch, the composite included) can take."""
    tokens = 1 + POOLED_GRID**2
    return min(profile.regions.max, profile.extra_tokens.max // tokens - 1, profile.batch.max - 1)


def check_reference_count(count: int, profile: ShapeProfile) -> None:
    most = max_references(profile)
    if count > most:
        raise InvalidInputError(
            f"{count} reference images, but the exported profile takes at most {most}: regions up to "
            f"{profile.regions.max}, extra tokens up to {profile.extra_tokens.max} at {1 + POOLED_GRID**2} per image "
            f"plus the composite's, image-encoder batch up to {profile.batch.max} with the composite; give at most "
            f"{most} references"
        )


def image_tokens(composer: Composer, images: list[torch.Tensor]) -> torch.Tensor:
    """Appearance tokens [N, 1 + POOLED_GRID**2, C] of N images [1, 3, h, w] of any sizes."""
    size = composer.runner("image_encoder").spec.input("pixel_values").shape[-1]
    pixels = torch.cat([clip_pixels(image, size) for image in images])
    tokens = composer.infer("image_encoder", pixel_values=pixels)["penultimate_tokens"]
    cls, patches = tokens[:, :1], tokens[:, 1:]
    side = int(patches.shape[1] ** 0.5)
    grid = patches.transpose(1, 2).reshape(len(images), -1, side, side)
    pooled = F.adaptive_avg_pool2d(grid, POOLED_GRID).flatten(2).transpose(1, 2)
    return composer.infer("appearance_net", image_tokens=torch.cat([cls, pooled], dim=1))["appearance_tokens"]


def composite(request: LocRefRequest) -> torch.Tensor:
    """The references pasted into their boxes on a grey canvas, [1, 3, H, W] in [-1, 1]."""
    canvas = torch.zeros(1, 3, request.height, request.width)
    for image, box in zip(request.references, request.boxes):
        canvas[..., box.y0 : box.y1, box.x0 : box.x1] = F.interpolate(
            image, size=(box.y1 - box.y0, box.x1 - box.x0), mode="bilinear", align_corners=False
        )
    return canvas


def layout_inputs(request: LocRefRequest, tokens_per_image: int, latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Region masks (boxes at latent resolution), the token-to-instance map (composite tokens last, in no
    region) and the foreground gate (union of the boxes)."""
    h, w = latent_hw
    instances = len(request.boxes)
    boxes = torch.cat([box.mask(request.width, request.height) for box in request.boxes], dim=1)
    region_masks = F.interpolate(boxes, size=(h, w), mode="nearest")  # [1, R, h, w]
    token_regions = torch.zeros(1, instances, (instances + 1) * tokens_per_image)
    for r in range(instances):
        token_regions[0, r, r * tokens_per_image : (r + 1) * tokens_per_image] = 1.0
    return {
        "region_masks": region_masks,
        "token_regions": token_regions,
        "extra_gate": region_masks.amax(1, keepdim=True),
    }


def compose(composer: Composer, request: LocRefRequest) -> Composition:
    run = start(
        composer, request, (request.width, request.height), FEATURES, COMPONENTS,
        check=lambda: check_reference_count(len(request.references), composer.preset.profile),
    )  # fmt: skip
    unet, times, latent_hw = run.unet, run.times, run.latent_hw
    with times("encode"):
        empty, prompt = split_rows(composer.text_conditioning(["", request.prompt], request.width, request.height))
        tokens = image_tokens(composer, [*request.references, composite(request)])
    layout = layout_inputs(request, tokens.shape[1], latent_hw)
    blocks = unet.spec.input("layer_gates").shape[0]
    cond = {
        **prompt, "extra_tokens": tokens.reshape(1, -1, tokens.shape[-1]),
        "layer_gates": layer_gates(blocks, composer.device, extra=1.0), **layout,
    }  # fmt: skip
    uncond = {**composer.unconditional(empty), "extra_gate": torch.zeros_like(layout["extra_gate"])}
    noise = random_latents((1, 4, *latent_hw), torch.Generator().manual_seed(request.seed), device=composer.device)
    with times("denoise"):
        latents = denoise(
            unet, build_scheduler("ddim", SchedulerSettings.for_preset(composer.preset)), noise, Conditioning(cond, uncond),
            SamplingSettings(steps=request.steps, guidance_scale=request.guidance_scale, progress=composer.progress),
        )  # fmt: skip
    return Composition(decode(composer, latents, times), latents, times)
