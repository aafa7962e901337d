"""What every method shares: its start and its decode, stage timing, the result type, masks at latent resolution."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vgrt.engines.base import Runner
from vgrt.errors import InvalidInputError
from vgrt.models.features import GATED
from vgrt.models.processors import EXTRA_GATE, MUTUAL_GATE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class StageTimes:
    """Wall-clock seconds per stage (encode, invert, denoise, decode), in the order they ran.

    spans: (stage, start, end) perf_counter readings of every timed block, so a tool can attribute work
    done inside a stage to it (`vgrt bench compose` charges each UNet call to its stage this way).
    """

    seconds: dict[str, float] = field(default_factory=dict)
    spans: list[tuple[str, float, float]] = field(default_factory=list)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            ended = time.perf_counter()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + ended - started
            self.spans.append((stage, started, ended))


@dataclass
class Composition:
    image: torch.Tensor  # [1, 3, H, W] in [-1, 1]
    latents: torch.Tensor  # final latents of the composed row [1, 4, h, w]
    times: StageTimes


@dataclass(frozen=True)
class Run:
    """What a method's compose works with once its request passed every check."""

    unet: Runner  # the UNet with the method's features, open
    times: StageTimes
    latent_hw: tuple[int, int]  # the output's latent grid (height, width)


def start(
    composer,
    request,
    size: tuple[int, int],
    features: str,
    components: tuple[str, ...],
    check: Callable[[], None] | None = None,
) -> Run:
    """The start every method shares, in this order: the request's own checks (`validate`, then `check`
    for limits of the preset's engines), the output `size` (width, height) the engines take, then the UNet
    with `features` and the `components` opened (exported on first use). So bad input fails before any
    engine runs, and the stage timer that comes back times inference, never a first-use export."""
    request.validate()
    if check is not None:
        check()
    width, height = size
    composer.check_image_size(width, height)
    unet = composer.runner("unet", features)
    composer.open(*components)
    f = composer.preset.vae_factor
    return Run(unet, StageTimes(), (height // f, width // f))


def split_rows(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """UNet inputs of B rows -> B inputs of one row each (the text conditioning of B prompts, one per prompt)."""
    count = len(next(iter(inputs.values())))
    return [{name: value[row : row + 1] for name, value in inputs.items()} for row in range(count)]


def repeat_rows(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """One-row UNet inputs as `rows` rows (views: a Conditioning copies them into the feed)."""
    return {name: value.expand(rows, *value.shape[1:]) for name, value in inputs.items()}


def decode(composer, latents: torch.Tensor, times: StageTimes) -> torch.Tensor:
    """The image of `latents`, timed as the 'decode' stage."""
    with times("decode"):
        return composer.decode_latents(latents)


def to_latent_grid(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel mask [1, 1, H, W] -> [h, w] at latent resolution, nearest as the methods' code resizes."""
    return F.interpolate(mask.float(), size=(height, width), mode="nearest")[0, 0]


def dilate(mask: torch.Tensor, iterations: int, kernel: int = 3) -> torch.Tensor:
    """Binary dilation with a square kernel, as cv2.dilate with np.ones((kernel, kernel))."""
    for _ in range(iterations):
        mask = F.max_pool2d(mask, kernel, stride=1, padding=kernel // 2)
    return mask


def erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary erosion with a square kernel (odd; 1 leaves the mask as it is)."""
    return -F.max_pool2d(-mask, kernel, stride=1, padding=kernel // 2)


def clip_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> CLIP-normalized [B, 3, size, size] (bicubic, as CLIP's preprocessing)."""
    pixels = F.interpolate((image + 1) / 2, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=image.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def layer_gates(blocks: int, device: torch.device, *, extra: float = 0.0, mutual: float = 0.0) -> torch.Tensor:
    """The UNet's `layer_gates` [blocks, len(GATED)]: every block's extra-token and mutual-attention gates."""
    gates = torch.empty(blocks, len(GATED), device=device)
    gates[:, EXTRA_GATE], gates[:, MUTUAL_GATE] = extra, mutual
    return gates


def check_pair(image: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise InvalidInputError(f"{name} must be an RGB tensor [1, 3, H, W], got {tuple(image.shape)}")
    if mask.shape != (1, 1, *image.shape[2:]):
        raise InvalidInputError(
            f"{name} mask has shape {tuple(mask.shape)}, expected (1, 1, {image.shape[2]}, {image.shape[3]})"
        )
    if not mask.any():
        raise InvalidInputError(f"{name} mask is empty: it must mark at least one pixel")
