"""What every method shares: stage timing, the result type, masks at latent resolution."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vgrt.errors import InvalidInputError


@dataclass
class StageTimes:
    """Wall-clock seconds per stage (encode, invert, denoise, decode), in the order they ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


@dataclass
class Composition:
    image: torch.Tensor  # [1, 3, H, W] in [-1, 1]
    latents: torch.Tensor  # final latents of the composed row [1, 4, h, w]
    times: StageTimes


def to_latent_grid(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel mask [1, 1, H, W] -> [h, w] at latent resolution, nearest as the methods' code resizes."""
    return F.interpolate(mask.float(), size=(height, width), mode="nearest")[0, 0]


def dilate(mask: torch.Tensor, iterations: int, kernel: int = 3) -> torch.Tensor:
    """Binary dilation with a square kernel, as cv2.dilate with np.ones((kernel, kernel))."""
    for _ in range(iterations):
        mask = F.max_pool2d(mask, kernel, stride=1, padding=kernel // 2)
    return mask


def check_pair(image: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise InvalidInputError(f"{name} must be an RGB tensor [1, 3, H, W], got {tuple(image.shape)}")
    if mask.shape != (1, 1, *image.shape[2:]):
        raise InvalidInputError(f"{name} mask has shape {tuple(mask.shape)}, expected (1, 1, {image.shape[2]}, {image.shape[3]})")
    if not mask.any():
        raise InvalidInputError(f"{name} mask is empty: it must mark at least one pixel")
