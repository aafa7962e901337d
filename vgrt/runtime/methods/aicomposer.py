"""AIComposer (ICCV 2025, arXiv 2507.20721): put a foreground object into a background image.

Follows the released code (sherlhw/AIComposer: `demo.py`, `model/sdxl.py`, `model/sdxl_inversion.py`,
`model/sdxl_utils/attention_processor.py`), which differs from the paper's text in places:
- Placement: the foreground mask is eroded, its box cropped and resized into the placement box and
  pasted (the placed foreground mask); the code dilates it by 50 px at 1024 px into the edit region.
  Kernels scale with the image size here.
- Image tokens: IP-Adapter projection of the CLIP image embeds of the foreground crop (content) and of
  the background (style), each with the projection of zeros as its unconditional tokens, fused by the
  MLP as `content + style - mlp(content, style)` over all 8 tokens; the first 4 are the conditional, the
  last 4 the unconditional image tokens. In the code these fused tokens are the only image tokens and
  only foreground queries attend to them (the paper speaks of background queries attending to fused
  features: not what the code does). They act on every cross-attention layer, both guidance halves, only
  in the step window [inversion_steps, image_token_end], together with the text prompt (conditional half)
  and the "exceptional prompt" (every token id 7788; unconditional half, as the code passes it as the
  negative prompt); outside it both halves see the exceptional prompt without image tokens. There the
  image tokens' gates are 0, so the steps after the window run the plain UNet; on SD 1.x both halves are
  then the same input, so they run one row unguided (the guided output equals either half).
- Inversion: the foreground latent is AdaIN-normalized in the placed region to the background's
  statistics (epsilon 1), both are decoded and pasted in pixels, the paste is re-encoded and
  DDIM-inverted with the exceptional prompt, no guidance, for only the first `inversion_steps` steps
  (10 of 20); sampling starts from there with DPM-Solver++. On steps up to adain_end the latent's
  placed region is normalized again toward its own background (epsilon 0.1), and after every step the
  latent outside the edit region is replaced by the inverted latent of the same level.
- Not reproduced: the code's "proximal guidance" (a latent pull toward the inversion for t < 400
  outside an edit mask derived from |cond - uncond|), and its -1e4 text-attention bias on queries
  outside the edit region, which is a constant per softmax row (no effect in exact arithmetic; in the
  code's fp16 it only coarsens the rounding).
- The exceptional prompt is encoded as the code's `CLIPTextInv*` encoders do it (`model/sdxl_utils/
  modeling_clip.py`): without position embeddings, so all 77 tokens encode alike. The engines' text
  encoders add them, so it runs in PyTorch (`Composer.module`), one token's pass (`positionless_states`).
- SDXL (the code's model; SD 1.x presets run the same steps with their one text encoder): the text
  inputs are both encoders' (Composer.text_conditioning), the image encoder is IP-Adapter SDXL's
  (OpenCLIP ViT-bigG, 1280-d embeds, the sdxl preset's), projected to 4 tokens of 2048 and fused by the
  MLP with 512 hidden units, on every cross-attention layer. Pooled text embeds: the prompt's in the
  conditional half, the exceptional prompt's in the unconditional half, also outside the image-token
  window, where the conditional half's context is the exceptional prompt's but its pooled embedding stays
  the prompt's (the code's `blank_add_text_embeds`): those steps stay guided, two rows of the plain UNet.
  time_ids: the output size in sampling (the pipeline's default); the inversion keeps the code's fixed
  1024 x 1024 whatever the size (`Inversion.init_prompt`).
  The code resizes the background to a long side of 1024 px; here the background's size is the output's.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vgrt.errors import InvalidInputError
from vgrt.models.encoders import positionless_states
from vgrt.runtime.composer import Composer
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.inversion import InversionSettings, invert
from vgrt.runtime.methods.common import (
    Composition,
    check_pair,
    clip_pixels,
    decode,
    dilate,
    erode,
    layer_gates,
    start,
    to_latent_grid,
)
from vgrt.runtime.sampling import Phase, SamplingSettings, denoise
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

FEATURES = "extra_tokens"
# besides the conditioned UNet; the plain UNet runs where the image tokens are gated off: the inversion and
# the steps after the image-token window
COMPONENTS = ("vae_encoder", "vae_decoder", "text_encoder", "image_encoder", "image_proj", "fusion_mlp", "unet")
EXCEPTIONAL_TOKEN = 7788  # code: every input id of the "exceptional prompt"
CODE_SIZE = 1024  # the code's image size; its pixel kernels scale from it
ERODE_KERNEL, DILATE_KERNEL = 5, 50  # code: cv2 erode 5x5 / dilate 50x50 of the foreground mask
INVERSION_ADAIN, SAMPLING_ADAIN = 1.0, 0.1  # code: adaptive_latent_normalization epsilons


@dataclass(frozen=True)
class AIComposerRequest:
    """The foreground [1, 3, h, w] with its mask [1, 1, h, w], the background [1, 3, H, W] and where
    the foreground goes in it, `placement` [1, 1, H, W] (its bounding box is used). Images in [-1, 1].

    Args:
        prompt: text for the image-token steps.
        steps: schedule length (code: 20).
        inversion_steps: steps inverted and then skipped by sampling (code: 10 of 20).
        image_token_end: last step that sees the image tokens and the prompt (code: 16 of 20).
        adain_end: last step whose placed region is re-normalized (code: 14 of 20).
        The three windows default to the code's fractions of `steps`.
    """

    foreground: torch.Tensor
    foreground_mask: torch.Tensor
    background: torch.Tensor
    placement: torch.Tensor
    prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    inversion_steps: int | None = None
    image_token_end: int | None = None
    adain_end: int | None = None

    def __post_init__(self) -> None:
        for name, fraction in (("inversion_steps", 0.5), ("image_token_end", 0.8), ("adain_end", 0.7)):
            if getattr(self, name) is None and isinstance(self.steps, int):
                object.__setattr__(self, name, min(round(self.steps * fraction), self.steps - 1))

    def validate(self) -> None:
        check_pair(self.foreground, self.foreground_mask, "foreground")
        check_pair(self.background, self.placement, "placement")
        SamplingSettings(steps=self.steps, guidance_scale=self.guidance_scale)
        if not 1 <= self.inversion_steps < self.steps:
            raise InvalidInputError(
                f"inversion_steps={self.inversion_steps} must lie in [1, steps={self.steps}): AIComposer inverts "
                "part of the schedule and samples the rest (steps >= 2)"
            )
        for name in ("image_token_end", "adain_end"):
            value = getattr(self, name)
            if not self.inversion_steps <= value < self.steps:
                raise InvalidInputError(
                    f"{name}={value} must lie in [inversion_steps={self.inversion_steps}, steps={self.steps})"
                )


@dataclass(frozen=True)
class Placement:
    """Pixel-space inputs at the background's size: the pasted image, the placed (eroded) foreground
    mask that gates the image tokens, the dilated edit region outside which the background is kept,
    and the foreground crop the content tokens come from."""

    composite: torch.Tensor  # [1, 3, H, W]
    foreground_mask: torch.Tensor  # [1, 1, H, W]
    region: torch.Tensor  # [1, 1, H, W]
    crop: torch.Tensor  # [1, 3, h', w']


def _odd_kernel(code_kernel: int, size: int) -> int:
    return max(1, round(code_kernel * size / CODE_SIZE)) | 1


def _bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = mask[0, 0].any(1).nonzero(), mask[0, 0].any(0).nonzero()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def place(request: AIComposerRequest) -> Placement:
    """Crop the foreground to its (eroded) mask and paste it into the placement box."""
    size = max(request.background.shape[2:])
    mask = erode(request.foreground_mask, _odd_kernel(ERODE_KERNEL, size))
    if not mask.any():  # a mask thinner than the kernel: keep it as drawn
        mask = request.foreground_mask
    y0, y1, x0, x1 = _bounds(mask)
    crop, crop_mask = request.foreground[..., y0:y1, x0:x1], mask[..., y0:y1, x0:x1]
    py0, py1, px0, px1 = _bounds(request.placement)
    box = (py1 - py0, px1 - px0)
    placed = torch.zeros_like(request.placement)
    placed[..., py0:py1, px0:px1] = F.interpolate(crop_mask, size=box, mode="nearest")
    pasted = request.background.clone()
    pasted[..., py0:py1, px0:px1] = F.interpolate(crop, size=box, mode="bilinear", align_corners=False)
    composite = torch.lerp(request.background, pasted, placed)
    region = dilate(placed, 1, _odd_kernel(DILATE_KERNEL, size))
    return Placement(composite, placed, region, crop)


def adaptive_latent_normalization(
    latent: torch.Tensor, reference: torch.Tensor, inside: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """The latent [C, h, w] with its `inside` positions moved toward the per-channel mean and std that
    `reference` has outside them (AdaIN; epsilon 1 replaces the statistics, 0 leaves them). Masked sums
    rather than boolean indexing, so a step loop that calls it never syncs; `inside` [h, w] is 0/1."""
    inside = inside.bool()
    source_mean, source_std = _masked_statistics(latent, inside)
    target_mean, target_std = _masked_statistics(reference, ~inside)
    normalized = (latent - source_mean) / source_std * target_std + target_mean
    out = torch.where(inside, torch.lerp(latent, normalized, epsilon), latent)
    return torch.where(inside.all(), latent, out)  # nothing outside: no statistics to take


def _masked_statistics(
    values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [C, 1, 1] of `values` [C, h, w] where `mask` [h, w] holds (unbiased from two up)."""
    weights = mask.to(values.dtype)
    count = weights.sum()
    mean = (values * weights).sum((1, 2), keepdim=True) / count
    variance = ((values - mean) ** 2 * weights).sum((1, 2), keepdim=True) / (count - 1).clamp_min(1)
    return mean, (variance + eps).sqrt()


def image_tokens(
    composer: Composer, placement: Placement, background: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (conditional, unconditional) image tokens [1, 4, C] each."""
    size = composer.runner("image_encoder").spec.input("pixel_values").shape[-1]
    pixels = torch.cat([clip_pixels(placement.crop, size), clip_pixels(background, size)])
    embeds = composer.infer("image_encoder", pixel_values=pixels)["image_embeds"]
    with_zeros = torch.stack([embeds[0], torch.zeros_like(embeds[0]), embeds[1], torch.zeros_like(embeds[1])])
    ip = composer.infer("image_proj", image_embeds=with_zeros)["ip_tokens"]  # [4, T, C]
    content, style = torch.cat([ip[0], ip[1]])[None], torch.cat([ip[2], ip[3]])[None]  # [1, 2T, C]: cond ‖ uncond
    fused = composer.infer("fusion_mlp", content=content, style=style)["fused"]
    return fused.chunk(2, dim=1)


def exceptional_prompt(composer: Composer, width: int, height: int) -> dict[str, torch.Tensor]:
    """Text inputs of the exceptional prompt for a width x height output: context [1, L, D] (and SDXL's pooled
    embedding and time_ids), every input id of both text encoders 7788, encoded without position embeddings
    as the code's `CLIPTextInv*` encoders do (in PyTorch: the engines add them). A vocabulary without id 7788
    (tiny presets) uses the same id modulo its ordinary tokens."""
    tokenizers = {"text_encoder": composer.tokenizer, "text_encoder_2": composer.tokenizer_2}
    states = []
    for name, tokenizer in tokenizers.items():
        if tokenizer is not None:
            encoder = composer.module(name)
            ordinary = min(encoder.model.config.vocab_size, tokenizer.start)  # the ids below the special tokens
            token = EXCEPTIONAL_TOKEN if EXCEPTIONAL_TOKEN < ordinary else EXCEPTIONAL_TOKEN % ordinary
            states.append(positionless_states(encoder, token))
    return composer.encoder_conditioning(states, width=width, height=height)


def inversion_text(composer: Composer, blank: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inversion's text inputs: the exceptional prompt; on SDXL with the code's fixed 1024 x 1024
    micro-conditioning (its inversion's default, whatever the image size)."""
    if "time_ids" not in blank:
        return blank
    return {**blank, "time_ids": composer.time_ids(CODE_SIZE, CODE_SIZE)}


def inversion_start(composer: Composer, request: AIComposerRequest, placement: Placement) -> torch.Tensor:
    """The clean latent that is inverted: the pasted foreground normalized to the background, re-encoded."""
    f = composer.preset.vae_factor
    latent_hw = (request.background.shape[2] // f, request.background.shape[3] // f)
    background, pasted = composer.encode_images(torch.cat([request.background, placement.composite])).split(1)
    inside = to_latent_grid(placement.foreground_mask, *latent_hw).to(composer.device)
    pasted = adaptive_latent_normalization(pasted[0], background[0], inside, INVERSION_ADAIN)[None]
    decoded = composer.decode_latents(torch.cat([background, pasted]))
    return composer.encode_images(torch.lerp(decoded[:1], decoded[1:], placement.foreground_mask.to(composer.device)))


def invert_placement(
    composer: Composer, request: AIComposerRequest, clean: torch.Tensor, text: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The partial DDIM inversion of the clean latent [1, C, h, w] with the text inputs `text` (see
    `inversion_text`): [inversion_steps + 1, 1, C, h, w]."""
    # The image tokens are gated off here, which is the plain UNet: run that, not the extra-token attention.
    return invert(
        composer.runner("unet"), build_scheduler("ddim_inverse", SchedulerSettings.for_preset(composer.preset)), clean,
        Conditioning(text),
        InversionSettings(steps=request.steps, end_step=request.inversion_steps, progress=composer.progress),
    )  # fmt: skip


def window_conditioning(spec, prompt, blank, gate: torch.Tensor, tokens) -> Conditioning:
    """The conditioned UNet's inputs inside the image-token window: the prompt (conditional half) and the
    exceptional prompt (unconditional half), each with its image tokens, on the queries `gate` marks."""
    cond_tokens, uncond_tokens = tokens
    gates = layer_gates(spec.input("layer_gates").shape[0], gate.device, extra=1.0)
    cond = {**prompt, "extra_tokens": cond_tokens, "extra_gate": gate, "layer_gates": gates}
    return Conditioning(cond, {**blank, "extra_tokens": uncond_tokens})


def after_window(composer: Composer, request: AIComposerRequest, prompt, blank) -> tuple[Phase, ...]:
    """The steps after the image-token window (none when it ends at the last step): no image tokens, so the
    plain UNet, with the exceptional prompt in both halves. They differ only in SDXL's pooled embedding (the
    prompt's in the conditional half, as the code keeps it); without one (SD 1.x) both halves are the same
    input, so one row runs, unguided: the guided output would equal either half."""
    start, plain = request.image_token_end + 1, composer.runner("unet")
    if start == request.steps:
        return ()
    if "text_embeds" not in prompt:
        return (Phase(start, plain, Conditioning(blank), 1.0),)
    cond = {**prompt, "encoder_hidden_states": blank["encoder_hidden_states"]}
    return (Phase(start, plain, Conditioning(cond, blank), request.guidance_scale),)


def compose(composer: Composer, request: AIComposerRequest) -> Composition:
    height, width = request.background.shape[2:]
    run = start(composer, request, (width, height), FEATURES, COMPONENTS)
    unet, times, latent_hw = run.unet, run.times, run.latent_hw
    placement = place(request)

    blank = exceptional_prompt(composer, width, height)  # before the timers: its PyTorch encoders build on first use
    with times("encode"):
        prompt = composer.text_conditioning([request.prompt], width, height)
        tokens = image_tokens(composer, placement, request.background)
    with times("normalize"):  # the VAE round trip of the AdaIN paste, kept out of the inversion's host work
        clean = inversion_start(composer, request, placement)
    with times("invert"):
        trajectory = invert_placement(composer, request, clean, inversion_text(composer, blank))

    inside = to_latent_grid(placement.foreground_mask, *latent_hw).to(composer.device)
    keep = to_latent_grid(placement.region, *latent_hw).to(composer.device)  # outside it the background is re-pasted
    window = window_conditioning(unet.spec, prompt, blank, inside[None, None], tokens)
    last = len(trajectory) - 1

    def before_step(i, t, latents, feed):
        if i <= request.adain_end:
            latents[0] = adaptive_latent_normalization(latents[0], latents[0], inside, SAMPLING_ADAIN)

    def after_step(i, t, latents):
        inverted = trajectory[last - (i - request.inversion_steps) - 1]  # the same noise level
        latents.copy_(torch.lerp(inverted, latents, keep))

    with times("denoise"):
        latents = denoise(
            unet, build_scheduler("dpmsolver++", SchedulerSettings.for_preset(composer.preset)), trajectory[-1], window,
            SamplingSettings(steps=request.steps, guidance_scale=request.guidance_scale,
                             start_step=request.inversion_steps, progress=composer.progress),
            before_step=before_step, after_step=after_step, phases=after_window(composer, request, prompt, blank),
        )  # fmt: skip
    return Composition(decode(composer, latents, times), latents, times)
