"""Prompt-Noise Optimization (PNO) as VCF runs it: AdamW on the conditional context and x_T, through
the whole sampler, the VAE decoder and a CLIP image-similarity loss.

Follows VCF's code (thijmennijdam/stable-diffusion-v2, scripts/vcf/pno.py,
`optimize_prompt_noise_trajectory`):
- The variables are the fused conditional context [1, L, D] (the unconditional one stays fixed) and
  x_T; AdamW (weight decay at torch's default 0.01) with a learning rate for each. Sampling is DDIM
  with eta 0; the code's per-step noises for eta > 0 are not part of this runtime.
- loss = -cos(CLIP(generated image), CLIP(reference)) + gamma * R(x_T); the gradient norm over both
  variables is clipped to 1. Defaults are the code's: gamma 0.5, blocks of k = 4 entries, 20 shuffles,
  10 iterations; learning rate 1e-2 as in its job scripts (its argparse default is 1e-4).
- Every UNet call is checkpointed (vgrt.runtime.grad_sampling), as the code's UNet blocks are, so memory
  stays flat in the number of sampling steps.
- Our addition: `precision='bf16'` runs the UNet, decoder and image encoder under bf16 autocast
  (vgrt.runtime.gradient_precision); the variables, AdamW's state, the loss and the regularizer stay fp32.

Where this differs:
- The code scores similarity with a separate OpenAI CLIP ViT-L/14; here it is the preset's own image
  encoder (its projected embedding), so no second CLIP is needed. Our choice: give the ViT-L/14 weights
  as the image encoder to match the code.
- R(x_T) is our implementation of Diffusion-PNO's Gaussianity test (see `noise_regularizer`); it
  equals the code's value up to a constant log 2 per term, so its gradient is the same.
- Our choice: after the last update the loss is evaluated once more (without gradient), and the
  variables with the lowest loss seen are returned, so the loss reported is that of the image the
  engine then samples (the code returns the image of the last evaluated step). A non-finite loss or
  gradient stops the loop, names the iteration, and keeps the best variables so far.
"""

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vgrt.checks import check_seed
from vgrt.errors import InvalidInputError, NumericalError, VgrtError
from vgrt.runtime.grad_sampling import sample_with_grad
from vgrt.runtime.gradient_precision import check_gradient_precision, gradient_autocast
from vgrt.runtime.methods.common import clip_pixels
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PnoSettings:
    """How the optimisation runs.

    Args:
        iterations: AdamW updates (the paper runs 10 to 50).
        lr_prompt, lr_noise: learning rates of the conditional context and of x_T.
        noise_weight: gamma, the weight of the noise regularizer (0 turns it off).
        block: entries per block of the regularizer's Gaussianity test (k; the code takes powers of 4).
        shuffles: random permutations of the noise the test also scores.
        max_grad_norm: clip of the joint gradient norm of both variables.
        checkpoint: recompute each UNet call in the backward pass instead of keeping its activations.
        seed: seed of the regularizer's permutations (iteration i uses seed + i).
        precision: 'fp32', or 'bf16' autocast of the modules' passes (bf16 units only; see
            vgrt.runtime.gradient_precision).
    """

    iterations: int = 10
    lr_prompt: float = 1e-2
    lr_noise: float = 1e-2
    noise_weight: float = 0.5
    block: int = 4
    shuffles: int = 20
    max_grad_norm: float = 1.0
    checkpoint: bool = True
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("iterations", "block", "shuffles"):
            value, low = getattr(self, name), 1 if name == "block" else 0
            if not isinstance(value, int) or value < low:
                raise InvalidInputError(f"PNO {name} must be an integer >= {low}, got {value!r}")
        for name, usual in (("lr_prompt", 1e-2), ("lr_noise", 1e-2), ("max_grad_norm", 1.0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidInputError(f"PNO {name} must be a finite number > 0, got {value!r} (VCF runs {usual})")
        if not (math.isfinite(self.noise_weight) and self.noise_weight >= 0):
            raise InvalidInputError(f"PNO noise_weight must be a finite number >= 0, got {self.noise_weight!r}")
        check_seed(self.seed, "PNO seed")
        check_seed(self.seed + self.iterations, "PNO seed + iterations")  # iteration i seeds with seed + i
        check_gradient_precision(self.precision)


@dataclass(frozen=True)
class PnoModels:
    """The frozen PyTorch modules PNO differentiates through: the UNet, the VAE decoder and the CLIP image
    encoder, the same weights as the engines (`Composer.module`)."""

    unet: nn.Module
    decoder: nn.Module
    image_encoder: nn.Module

    @classmethod
    def from_composer(cls, composer) -> "PnoModels":
        return cls(composer.module("unet"), composer.module("vae_decoder"), composer.module("image_encoder"))


def noise_regularizer(noise: torch.Tensor, block: int, shuffles: int, generator: torch.Generator) -> torch.Tensor:
    """How far `noise` is from looking like i.i.d. N(0, 1) entries: about 0 while it does, growing as it drifts.

    Diffusion-PNO's test: the flattened noise is cut into m blocks of k = `block` entries. For m samples
    of N(0, I_k), the norm M1 of their mean and the spectral norm M2 of (their covariance - I) obey
        P(M1 >= a) <= 2 exp(-m a^2 / (2k)),    P(sqrt(1 + M2) - 1 - sqrt(k/m) >= b) <= 2 exp(-m b^2 / 2),
    so log p = min(0, log 2 - m M1^2 / (2k)) + min(0, log 2 - m relu(sqrt(1 + M2) - 1 - sqrt(k/m))^2 / 2)
    bounds how likely what is seen is. The regularizer is -(log p of the entries in their order + the
    mean log p over `shuffles` random permutations), combined as VCF's code does (the permutations see
    structure the block order hides).
    """
    flat = noise.flatten()
    if flat.numel() % block:
        raise InvalidInputError(
            f"the noise has {flat.numel()} entries, which blocks of {block} do not divide: choose another block"
        )
    orders = [torch.randperm(flat.numel(), generator=generator) for _ in range(shuffles)]  # on the CPU generator
    orders = torch.stack(orders).to(flat.device) if orders else []  # one copy to the device, not one per order
    shuffled = [_gaussian_log_bound(flat[order].view(-1, block)) for order in orders]
    return -(_gaussian_log_bound(flat.view(-1, block)) + (torch.stack(shuffled).mean() if shuffled else 0.0))


def _gaussian_log_bound(samples: torch.Tensor) -> torch.Tensor:
    m, k = samples.shape
    mean_norm = samples.mean(0).norm()
    covariance = samples.T @ samples / m
    if not torch.isfinite(covariance).all():  # overflowing noise is as unlikely as it gets (and breaks the SVD)
        return covariance.new_tensor(-math.inf)
    spread = torch.linalg.matrix_norm(covariance - torch.eye(k, dtype=samples.dtype, device=samples.device), ord=2)
    log2 = math.log(2.0)
    log_p_mean = torch.clamp(log2 - m * mean_norm**2 / (2 * k), max=0.0)
    excess = F.relu(torch.sqrt(1 + spread) - 1 - math.sqrt(k / m))
    log_p_covariance = torch.clamp(log2 - m * excess**2 / 2, max=0.0)
    return log_p_mean + log_p_covariance


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    similarity: torch.Tensor  # cosine similarity of the generated image's CLIP embedding to the reference's
    noise: torch.Tensor  # the regularizer R(x_T)


class PnoObjective:
    """The PNO loss as a function of (conditional context, x_T) for one sampling setup.

    Args:
        reference: the reference image [1, 3, H, W] in [-1, 1].
        uncond: the fixed unconditional context [1, L, D], as long as the conditional one.
        steps, guidance_scale: of the DDIM sampling the loss differentiates through.
    Floats follow the UNet's parameters (float64 modules give a float64 loss); the modules' outputs are
    cast back to them under bf16 autocast. bf16 on a device without bf16 arithmetic is refused here.
    """

    def __init__(
        self,
        models: PnoModels,
        scheduler: SchedulerSettings,
        reference: torch.Tensor,
        uncond: torch.Tensor,
        steps: int,
        guidance_scale: float,
        settings: PnoSettings,
    ):
        self.models, self.settings, self.steps, self.guidance_scale = models, settings, steps, guidance_scale
        self.scheduler = build_scheduler("ddim", scheduler)
        parameter = next(models.unet.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        check_gradient_precision(settings.precision, self.device)
        self.uncond = uncond.to(self.device, self.dtype)
        self.clip_size = models.image_encoder.model.config.image_size
        with torch.no_grad():
            self.reference = self.embed(reference.to(self.device, self.dtype))

    def autocast(self):
        """The context the modules run in (bf16 autocast, or none)."""
        return gradient_autocast(self.settings.precision, self.device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings of images [B, 3, H, W] in [-1, 1]."""
        pixels = clip_pixels(images, self.clip_size)
        with self.autocast():
            embeds = self.models.image_encoder(pixels)[0]
        return embeds.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            image = self.models.decoder(latents)
        return image.to(self.dtype)

    def sample(self, context: torch.Tensor, noise: torch.Tensor, checkpoint: bool | None = None) -> torch.Tensor:
        """Final latents of the sampling PNO differentiates through."""
        checkpoint = self.settings.checkpoint if checkpoint is None else checkpoint
        return sample_with_grad(
            self.models.unet, self.scheduler, noise, context, self.uncond, self.steps, self.guidance_scale, checkpoint,
            self.settings.precision,
        )  # fmt: skip

    def __call__(self, context: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> LossTerms:
        image = self.decode(self.sample(context, noise))
        similarity = F.cosine_similarity(self.embed(image), self.reference, dim=-1).mean()
        regularizer = noise_regularizer(noise, self.settings.block, self.settings.shuffles, generator)
        return LossTerms(-similarity + self.settings.noise_weight * regularizer, similarity, regularizer)


@dataclass(frozen=True)
class PnoResult:
    """The optimised variables and the record of the run (for logs and benchmarks).

    Args:
        context, noise: the variables with the lowest loss seen (detached).
        losses, similarities: after 0, 1, 2, ... updates (one more entry than updates made).
        best: the index into `losses` of the returned variables.
        iteration_seconds: wall-clock seconds of each update (sampling, decoding, loss, backward, step),
            all in PyTorch.
        seconds: the whole optimisation, the last evaluation included.
        stopped: why the loop ended early (a non-finite loss or gradient, and at which iteration);
            None when every iteration ran.
    """

    context: torch.Tensor
    noise: torch.Tensor
    losses: tuple[float, ...]
    similarities: tuple[float, ...]
    best: int
    iteration_seconds: tuple[float, ...]
    seconds: float
    stopped: str | None = None


def optimize(
    objective: PnoObjective, context: torch.Tensor, noise: torch.Tensor, settings: PnoSettings, progress: bool = True
) -> PnoResult:
    """Run PNO from the conditional `context` and x_T `noise` (left untouched)."""
    started = time.perf_counter()
    context = context.detach().to(objective.device, objective.dtype).clone().requires_grad_(True)
    noise = noise.detach().to(objective.device, objective.dtype).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": [context], "lr": settings.lr_prompt}, {"params": [noise], "lr": settings.lr_noise}]
    )
    losses, similarities, seconds = [], [], []
    best: tuple[int, float, torch.Tensor, torch.Tensor] | None = None
    stopped = None
    bar = tqdm(total=settings.iterations, desc="pno", disable=not progress)
    for i in range(settings.iterations + 1):
        iteration_started = time.perf_counter()
        updating = i < settings.iterations
        try:
            with torch.set_grad_enabled(updating):
                terms = objective(context, noise, torch.Generator().manual_seed(settings.seed + i))
        except NumericalError as err:  # the sampling went NaN: stop as for a non-finite loss
            stopped = f"at iteration {i} (after {i} updates), {err}"
            break
        # One host read per iteration (each a whole sampling run, decode and backward): stopping on a
        # non-finite loss and keeping the best variables decide on its value. No step loop is inside it.
        loss, similarity, regularizer = torch.stack([terms.total, terms.similarity, terms.noise]).tolist()
        if not math.isfinite(loss):
            stopped = f"the loss became {loss} at iteration {i} (after {i} updates)"
            break
        losses.append(loss)
        similarities.append(similarity)
        if best is None or loss < best[1]:
            best = (i, loss, context.detach().clone(), noise.detach().clone())
        log.info("PNO iteration %d/%d: loss %.5f (similarity %.5f, noise regularizer %.5f)",
                 i, settings.iterations, loss, similarity, regularizer)  # fmt: skip
        if not updating:
            break
        optimizer.zero_grad()
        terms.total.backward()
        # The second read: a non-finite gradient must stop the loop before it updates the variables.
        norm = torch.nn.utils.clip_grad_norm_([context, noise], settings.max_grad_norm).item()
        if not math.isfinite(norm):
            stopped = f"the gradient norm became {norm} at iteration {i} (after {i} updates)"
            break
        optimizer.step()
        seconds.append(time.perf_counter() - iteration_started)
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update()
    bar.close()
    if stopped is not None:
        kept = "nothing to keep" if best is None else f"keeping the variables of iteration {best[0]}"
        log.warning("PNO stopped: %s; %s (lower the learning rates)", stopped, kept)
    if best is None:
        raise VgrtError(f"PNO could not evaluate its loss even once: {stopped}; check the reference and the weights")
    index, _, best_context, best_noise = best
    total = time.perf_counter() - started
    return PnoResult(
        best_context, best_noise, tuple(losses), tuple(similarities), index, tuple(seconds), total, stopped
    )
