"""Compositional guidance of object-level visual prompts: segments, matching, identity refinement.

- `segments_from_maps`: object segments from the UNet's own attention maps (the `probes` output).
- `segment_similarity` + `match_segments`: CLIP similarity of each object's reference to each segment
  of a generated image, and the one-to-one assignment that maximises it (Hungarian, scipy).
- `IdentityGuidance`: gradient steps on the objects' value tokens that lower the identity loss,
  in PyTorch (an engine gives no gradients), in fp32 or under bf16 autocast.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vgrt.runtime.gradient_precision import check_gradient_precision, gradient_autocast
from vgrt.runtime.methods.common import clip_pixels

SEGMENT_THRESHOLD = 0.5  # a pixel joins its winning object's segment from this share of the object's peak


def segments_from_maps(maps: torch.Tensor, threshold: float = SEGMENT_THRESHOLD) -> torch.Tensor:
    """Attention maps [O, h, w] -> segments [O, h, w] (bool).

    Each map is scaled to its own peak, so that objects drawing less attention overall still win
    where they are strongest; a pixel belongs to the object whose scaled map is highest there, if that
    value reaches `threshold`, else to none (background). An object that wins nowhere keeps the pixels
    where its own scaled map reaches `threshold`, so no segment is empty.
    """
    relative = maps / maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)[:, None, None]
    strong = relative >= threshold
    winner = F.one_hot(relative.argmax(dim=0), len(maps)).permute(2, 0, 1).bool()
    segments = winner & strong
    empty = ~segments.flatten(1).any(dim=1)
    segments[empty] = strong[empty]
    return segments


Bounds = tuple[tuple[int, int, int, int], ...]  # (y0, y1, x0, x1) of each segment, ends exclusive


def segment_bounds(segments: torch.Tensor) -> Bounds:
    """Bounding boxes of segments [S, h, w] on their grid (host reads: compute them once, outside loops)."""
    bounds = []
    for segment in segments:
        ys, xs = torch.nonzero(segment, as_tuple=True)
        bounds.append((int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1))
    return tuple(bounds)


def segment_crops(image: torch.Tensor, segments: torch.Tensor, size: int, bounds: Bounds | None = None) -> torch.Tensor:
    """Image [1, 3, H, W] in [-1, 1] and segments [S, h, w] -> CLIP inputs [S, 3, size, size]: each
    segment's bounding box, grey outside the segment. Differentiable in `image`. The image is a whole
    multiple of the segments' grid (the VAE factor); `bounds` (from segment_bounds) saves the host reads."""
    height, width = image.shape[2:]
    factor = height // segments.shape[1]
    masks = F.interpolate(segments[:, None].float(), size=(height, width), mode="nearest")
    crops = []
    for mask, (y0, y1, x0, x1) in zip(masks, bounds or segment_bounds(segments)):
        y0, y1, x0, x1 = y0 * factor, y1 * factor, x0 * factor, x1 * factor
        crops.append(clip_pixels(image[..., y0:y1, x0:x1] * mask[None, :, y0:y1, x0:x1], size))
    return torch.cat(crops)


def segment_similarity(embeds: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [O, S] of reference embeddings [O, P] to segment embeddings [S, P]."""
    return F.normalize(references, dim=-1) @ F.normalize(embeds, dim=-1).T


def match_segments(similarity: torch.Tensor) -> tuple[int, ...]:
    """Similarity [O, S] (S >= O) -> the segment of each object: one-to-one, largest total similarity."""
    from scipy.optimize import linear_sum_assignment

    objects, chosen = linear_sum_assignment(similarity.detach().double().cpu().numpy(), maximize=True)
    return tuple(int(s) for _, s in sorted(zip(objects, chosen)))


def predicted_x0(
    latents: torch.Tensor, output: torch.Tensor, alpha_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean latents the model output implies at noise level `alpha_cumprod`."""
    if prediction_type == "v_prediction":
        return alpha_cumprod.sqrt() * latents - (1 - alpha_cumprod).sqrt() * output
    return (latents - (1 - alpha_cumprod).sqrt() * output) / alpha_cumprod.sqrt()


@dataclass(frozen=True)
class GuidanceModules:
    """PyTorch modules (fp32, frozen) the identity loss runs through; see `Composer.module`."""

    unet: nn.Module  # the conditioned UNet with extra_tokens, kv_source, regions
    vae_decoder: nn.Module
    image_encoder: nn.Module


@dataclass(frozen=True)
class GuidanceStep:
    """One gradient step of the guided pass.

    Args:
        step: index of the denoising step it ran before.
        loss: the identity loss before the update.
        torch_seconds: the gradient step in PyTorch (UNet, VAE decoder, image encoder, backward, update).
        engine_seconds: the denoising step that followed on the engine (UNet call and scheduler update).
    """

    step: int
    loss: float
    torch_seconds: float
    engine_seconds: float


class IdentityGuidance:
    """Refines the objects' value tokens [1, O*K, C] by Adam steps on the identity loss.

    The loss at latents x_t: one UNet call (conditional row), its x0 prediction decoded by the VAE,
    each object's segment cropped and embedded by the CLIP image encoder, and the mean over objects of
    the cosine distance to the object's reference embedding. Keys, segments and weights stay fixed.

    Everything it makes stays on the latents' device: a step reads nothing back to the host (`step`
    returns the loss as a tensor).

    Args:
        inputs: the UNet's conditional inputs for one row other than sample, timestep and extra_tokens,
            on the modules' device.
        references: reference embeddings [O, P], in object order; segments [O, h, w] likewise.
        alphas_cumprod: the scheduler's training noise schedule, indexed by timestep.
        precision: 'fp32', or 'bf16': the three modules under bf16 autocast, their outputs cast back to
            fp32 (the value tokens and Adam's state stay fp32); refused where the device has no bf16.
    """

    def __init__(
        self,
        modules: GuidanceModules,
        inputs: dict[str, torch.Tensor],
        values: torch.Tensor,
        references: torch.Tensor,
        segments: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        clip_size: int,
        lr: float,
        precision: str = "fp32",
    ):
        check_gradient_precision(precision, references.device)
        self.precision = precision
        self.modules, self.inputs, self.references, self.segments = modules, inputs, references, segments
        self.bounds = segment_bounds(segments)  # the crop boxes, read once here rather than every step
        self.alphas_cumprod, self.prediction_type, self.clip_size = alphas_cumprod, prediction_type, clip_size
        self.values = values.detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.values], lr=lr)

    def autocast(self):
        """The context the modules run in (bf16 autocast, or none)."""
        return gradient_autocast(self.precision, self.values.device)

    def loss(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sample = latents.detach().float()
        t = torch.as_tensor(timestep)  # a host timestep, as the schedulers keep it: read without a sync
        timesteps = torch.full((len(sample),), float(t), device=sample.device)  # a fill, not a copy
        with self.autocast():
            output = self.modules.unet(sample=sample, timestep=timesteps, extra_tokens=self.values, **self.inputs)
        x0 = predicted_x0(sample, output.float(), self.alphas_cumprod[t.long()], self.prediction_type)
        with self.autocast():
            image = self.modules.vae_decoder(x0)
        crops = segment_crops(image.float(), self.segments, self.clip_size, self.bounds)
        with self.autocast():
            embeds = self.modules.image_encoder(crops)[0]
        return (1 - F.cosine_similarity(embeds.float(), self.references, dim=-1)).mean()

    def step(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """One update of the value tokens at `latents` [1, C, h, w], timestep `timestep`; returns the loss
        before it (0-dim, on the device: read it after the loop)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(latents, timestep)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
