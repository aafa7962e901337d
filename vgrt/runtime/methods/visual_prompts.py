"""Object-level visual prompts (arXiv 2501.01424): a composition of objects given as images.

There is no released code, and only the abstract and summaries of the paper could be read
(../shared/research/seed_methods.md section 4), so this says which parts are the paper's and which ours.

The paper's (as the abstract and third-party summaries describe it; the details are unverified):
- KV-mixed cross-attention: per object, keys from a coarse encoder with a small bottleneck (a linear
  adapter on a global CLIP embedding: layout) and values from a fine encoder with a larger one (a
  Perceiver adapter on CLIP grid features: appearance), in equal numbers (features extra_tokens,
  kv_source; adapters `layout_adapter`, `appearance_adapter`).
- Compositional guidance: a first generation is segmented, segments are matched one-to-one to the
  objects by feature similarity (Hungarian), each object's attention logits are set to -inf outside its
  matched segment (feature regions), and only the appearance (value) tokens are refined by gradient
  steps on an identity loss; then the image is generated with them.

Ours:
- CLIP instead of DINOv2 for the similarity and the identity loss (the presets ship CLIP only), and
  no external open-set segmenter: segments come from the UNet's own attention maps of each object's
  tokens (feature probes, averaged over the first pass's steps; see `segments_from_maps`), or from
  user boxes, which then stand in for the first pass and the matching.
- 8 tokens per object, a 2-layer resampler; the unconditional half of guidance carries no object tokens.
- The identity loss: the conditional row's x0 prediction at the current step, decoded by the VAE,
  cropped to each object's segment (grey outside it), embedded by CLIP; mean cosine distance to the
  object's reference embedding; Adam on the value tokens.
- Where the refinement runs: the second (guided) pass runs on the engine with the regions restricted;
  before each of its first `guidance_steps` steps, one gradient step in PyTorch updates the value
  tokens, and every later step uses the refined tokens. So the final pass is the rest of that run,
  on the engine backend, and the whole method costs two engine runs (one with boxes) plus the
  gradient steps.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vgrt.checks import check_seed
from vgrt.errors import InvalidInputError
from vgrt.models.adapters import OBJECT_TOKENS
from vgrt.models.presets import ShapeProfile
from vgrt.runtime.composer import Composer
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.gradient_precision import check_gradient_precision
from vgrt.runtime.images import Box
from vgrt.runtime.methods.common import Composition, StageTimes, clip_pixels, decode, layer_gates, split_rows, start
from vgrt.runtime.methods.compositional_guidance import (
    GuidanceModules,
    GuidanceStep,
    IdentityGuidance,
    match_segments,
    segment_crops,
    segment_similarity,
    segments_from_maps,
)
from vgrt.runtime.sampling import SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

FEATURES = "extra_tokens,kv_source,regions,probes"
COMPONENTS = (
    "text_encoder",
    "image_encoder",
    "layout_adapter",
    "appearance_adapter",
    "vae_decoder",
)  # besides the UNet
GRADIENT_FEATURES = "extra_tokens,kv_source,regions"  # the same weights; the gradient steps need no maps


@dataclass(frozen=True)
class VisualPromptsRequest:
    """Object images [1, 3, h, w] in [-1, 1] (any sizes) composed into a width x height image.

    Args:
        boxes: optional, one per object, in output pixels: the objects' segments, in order; without
            boxes a first pass finds and matches them.
        guidance_steps: gradient steps on the value tokens, one before each of the guided pass's
            first steps (0: no refinement).
        guidance_lr: Adam's learning rate on the value tokens.
        gradient_precision: 'fp32', or 'bf16' autocast of those steps' modules (bf16 units only; see
            vgrt.runtime.gradient_precision).
    """

    objects: tuple[torch.Tensor, ...]
    width: int
    height: int
    prompt: str = ""
    boxes: tuple[Box, ...] = ()
    steps: int = 50
    guidance_scale: float = 7.5
    guidance_steps: int = 5
    guidance_lr: float = 0.01
    seed: int = 0
    gradient_precision: str = "fp32"

    def validate(self) -> None:
        if not self.objects:
            raise InvalidInputError("visual prompts need at least one object image")
        for i, image in enumerate(self.objects):
            if image.dim() != 4 or image.shape[:2] != (1, 3):
                raise InvalidInputError(f"object {i + 1} must be an RGB tensor [1, 3, H, W], got {tuple(image.shape)}")
        if self.boxes and len(self.boxes) != len(self.objects):
            raise InvalidInputError(
                f"got {len(self.objects)} objects but {len(self.boxes)} boxes: give one box per object, or none"
            )
        for box in self.boxes:
            box.check_inside(self.width, self.height)
        _check_boxes_have_own_area(self.boxes)
        SamplingSettings(steps=self.steps, guidance_scale=self.guidance_scale)
        check_seed(self.seed)
        if not (isinstance(self.guidance_steps, int) and 0 <= self.guidance_steps <= self.steps):
            raise InvalidInputError(
                f"guidance_steps must be an integer in [0, steps={self.steps}], got {self.guidance_steps!r}"
            )
        if not (math.isfinite(self.guidance_lr) and self.guidance_lr > 0):
            raise InvalidInputError(f"guidance_lr must be a finite number > 0, got {self.guidance_lr}")
        check_gradient_precision(self.gradient_precision)


def _check_boxes_have_own_area(boxes: tuple[Box, ...]) -> None:
    for i, inner in enumerate(boxes):
        for j, outer in enumerate(boxes):
            inside = outer.x0 <= inner.x0 and outer.y0 <= inner.y0 and inner.x1 <= outer.x1 and inner.y1 <= outer.y1
            if i != j and inside:
                raise InvalidInputError(
                    f"box {i + 1} ({inner.x0},{inner.y0},{inner.x1},{inner.y1}) lies entirely inside box {j + 1} "
                    f"({outer.x0},{outer.y0},{outer.x1},{outer.y1}): each object needs some area of its own; "
                    "give boxes that overlap at most partly"
                )


def _check_supported(composer: Composer, request: VisualPromptsRequest) -> None:
    """What the preset's engines and the device must support, before any engine runs."""
    check_object_count(len(request.objects), composer.preset.profile)
    if request.guidance_steps:
        check_gradient_precision(request.gradient_precision, composer.device)


def max_objects(profile: ShapeProfile) -> int:
    """Objects one exported UNet (and one image-encoder batch) can take under `profile`."""
    return min(profile.regions.max, profile.extra_tokens.max // OBJECT_TOKENS, profile.batch.max)


def check_object_count(count: int, profile: ShapeProfile) -> None:
    most = max_objects(profile)
    if count > most:
        raise InvalidInputError(
            f"{count} objects, but the exported profile takes at most {most}: regions up to {profile.regions.max}, "
            f"extra tokens up to {profile.extra_tokens.max} at {OBJECT_TOKENS} per object, batch up to "
            f"{profile.batch.max}; give at most {most} objects, or widen those ranges of the preset's "
            "ShapeProfile (vgrt/models/presets.py) and export again"
        )


@dataclass(frozen=True)
class ObjectTokens:
    keys: torch.Tensor  # [O, K, C] layout tokens (coarse)
    values: torch.Tensor  # [O, K, C] appearance tokens (fine)
    embeds: torch.Tensor  # [O, P] CLIP image embeddings, the references of matching and identity


def _clip_size(composer: Composer) -> int:
    return composer.runner("image_encoder").spec.input("pixel_values").shape[-1]


def encode_objects(composer: Composer, objects: tuple[torch.Tensor, ...]) -> ObjectTokens:
    pixels = torch.cat([clip_pixels(image, _clip_size(composer)) for image in objects])
    clip = composer.infer("image_encoder", pixel_values=pixels)
    keys = composer.infer("layout_adapter", image_embeds=clip["image_embeds"])["layout_tokens"]
    values = composer.infer("appearance_adapter", image_tokens=clip["penultimate_tokens"])["appearance_tokens"]
    return ObjectTokens(keys, values, clip["image_embeds"])


def _similarity(
    composer: Composer, image: torch.Tensor, segments: torch.Tensor, references: torch.Tensor
) -> torch.Tensor:
    """[O, S]: each object's reference embedding against the CLIP embedding of each segment of `image`."""
    crops = segment_crops(image, segments, _clip_size(composer))
    embeds = composer.infer("image_encoder", pixel_values=crops)["image_embeds"]
    return segment_similarity(embeds, references)


def box_segments(boxes: tuple[Box, ...], width: int, height: int, factor: int) -> torch.Tensor:
    """Boxes -> segments [O, h, w] (bool) at latent resolution; a latent pixel counts if any of its pixels does."""
    masks = torch.cat([box.mask(width, height) for box in boxes], dim=1)[0]
    return F.max_pool2d(masks, factor) > 0


def token_regions(objects: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, O, O*K]: object o owns its K tokens."""
    return torch.eye(objects, device=device).repeat_interleave(OBJECT_TOKENS, dim=1)[None]


class _MapRecorder:
    """Runs a UNet runner with the probes output and sums the last (conditional) row's attention maps, on
    the runner's output device (nothing read back per step)."""

    def __init__(self, runner):
        self.runner, self.spec = runner, runner.spec
        self.total: torch.Tensor | None = None
        self.calls = 0

    def infer(self, feed, validate=True):
        out = self.runner.infer(feed, validate)
        maps = out["attention_maps"][-1].float()
        if self.total is None:
            self.total = maps.clone()  # its own memory: a runner may reuse its output buffers
        else:
            self.total.add_(maps)  # in place: no new tensor per step
        self.calls += 1
        return out


@dataclass
class VisualPromptsComposition(Composition):
    """A Composition plus what the guidance decided and what its steps cost.

    Args:
        segments: [O, h, w] bool, each object's region in the guided pass (latent grid).
        assignment: the first-pass segment each object was matched to (0, 1, ... with boxes).
        guidance: the gradient steps, in order.
    """

    segments: torch.Tensor
    assignment: tuple[int, ...]
    guidance: tuple[GuidanceStep, ...]


def compose(composer: Composer, request: VisualPromptsRequest) -> VisualPromptsComposition:
    """Stages in `times`: encode, first_pass and match (without boxes), guidance (the gradient steps in
    PyTorch), denoise (the guided pass on the engine, less its gradient steps), decode."""
    run = start(
        composer, request, (request.width, request.height), FEATURES, COMPONENTS,
        check=lambda: _check_supported(composer, request),
    )  # fmt: skip
    unet, times, latent_hw = run.unet, run.times, run.latent_hw
    modules = None
    if request.guidance_steps:
        modules = GuidanceModules(
            composer.module("unet", GRADIENT_FEATURES), composer.module("vae_decoder"), composer.module("image_encoder")
        )
    f, count, device = composer.preset.vae_factor, len(request.objects), composer.device
    with times("encode"):
        text = composer.text_conditioning(["", request.prompt], request.width, request.height)
        empty, prompt = split_rows(text)
        tokens = encode_objects(composer, request.objects)
    cond = {
        **prompt,
        "extra_tokens": tokens.values.reshape(1, -1, tokens.values.shape[-1]),
        "extra_key_tokens": tokens.keys.reshape(1, -1, tokens.keys.shape[-1]),
        "extra_gate": torch.ones(1, 1, *latent_hw, device=device),
        "region_masks": torch.ones(1, count, *latent_hw, device=device),
        "token_regions": token_regions(count, device),
        "layer_gates": layer_gates(unet.spec.input("layer_gates").shape[0], device, extra=1.0),
    }
    uncond = {**composer.unconditional(empty), "extra_gate": torch.zeros(1, 1, *latent_hw, device=device)}
    noise = random_latents(
        (1, unet.spec.input("sample").shape[1], *latent_hw), torch.Generator().manual_seed(request.seed), device
    )
    scheduler_settings = SchedulerSettings.for_preset(composer.preset)
    sampling = SamplingSettings(steps=request.steps, guidance_scale=request.guidance_scale, progress=composer.progress)

    if request.boxes:
        segments = box_segments(request.boxes, request.width, request.height, f).to(device)
        assignment = tuple(range(count))
    else:
        with times("first_pass"):
            recorder = _MapRecorder(unet)
            first = denoise(
                recorder, build_scheduler("ddim", scheduler_settings), noise, Conditioning(cond, uncond), sampling
            )
        with times("match"):
            found = segments_from_maps(recorder.total / recorder.calls)
            assignment = match_segments(_similarity(composer, composer.decode_latents(first), found, tokens.embeds))
        segments = found[list(assignment)]
    cond["region_masks"] = segments[None].float()

    scheduler = build_scheduler("ddim", scheduler_settings)
    log: list[tuple] = []  # (step, loss on the device, torch seconds, engine seconds), read after the loop
    hooks = {}
    if modules is not None:
        guidance = IdentityGuidance(
            modules, {k: v for k, v in cond.items() if k != "extra_tokens"}, cond["extra_tokens"], tokens.embeds,
            segments, scheduler.alphas_cumprod, composer.preset.prediction_type, _clip_size(composer),
            request.guidance_lr, request.gradient_precision,
        )  # fmt: skip
        hooks = _guidance_hooks(guidance, request.guidance_steps, times, log)
    with times("denoise"):
        latents = denoise(unet, scheduler, noise, Conditioning(cond, uncond), sampling, **hooks)
    times.seconds["denoise"] -= times.seconds.get("guidance", 0.0)
    image = decode(composer, latents, times)
    steps = tuple(GuidanceStep(i, float(loss), *seconds) for i, loss, *seconds in log)
    return VisualPromptsComposition(image, latents, times, segments, assignment, steps)


def _guidance_hooks(guidance: IdentityGuidance, steps: int, times: StageTimes, log: list[tuple]) -> dict:
    """before_step: a gradient step, its tokens written into the feed's conditional row; after_step:
    the engine time of that denoising step. Nothing is read back: on a GPU the seconds are those of the
    host's work and launches, as the loop runs ahead of the device."""
    pending: dict[str, float | torch.Tensor] = {}

    def before_step(i, t, latents, feed):
        if i >= steps:
            return
        with times("guidance"):
            started = time.perf_counter()
            loss = guidance.step(latents, t)
            feed["extra_tokens"][-1].copy_(guidance.values.detach()[0])
            pending.update(step=i, loss=loss, torch_seconds=time.perf_counter() - started)
        pending["engine_started"] = time.perf_counter()

    def after_step(i, t, latents):
        if pending.get("step") == i:
            engine_seconds = time.perf_counter() - pending.pop("engine_started")
            log.append((i, pending["loss"], pending["torch_seconds"], engine_seconds))

    return {"before_step": before_step, "after_step": after_step}
