"""Image, mask and box inputs of the composition methods, checked before any engine runs.

Images are RGB tensors [1, 3, H, W] in [-1, 1] (the VAE's range); masks are float [1, 1, H, W] with 1
inside (any non-zero pixel of a mask image counts as inside); boxes are `x0,y0,x1,y1` in pixels.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vgrt.errors import InvalidInputError


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def parse(cls, text: str) -> "Box":
        try:
            x0, y0, x1, y1 = (int(v) for v in text.split(","))
        except ValueError:
            raise InvalidInputError(f"box {text!r} is not x0,y0,x1,y1 in whole pixels, e.g. 16,16,48,48") from None
        return cls(x0, y0, x1, y1)

    def check_inside(self, width: int, height: int) -> None:
        if not (0 <= self.x0 < self.x1 <= width and 0 <= self.y0 < self.y1 <= height):
            raise InvalidInputError(
                f"box {self.x0},{self.y0},{self.x1},{self.y1} is empty or outside the {width}x{height} image; "
                f"it needs 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
            )

    def mask(self, width: int, height: int) -> torch.Tensor:
        """[1, 1, H, W] mask, 1 inside the box."""
        self.check_inside(width, height)
        mask = torch.zeros(1, 1, height, width)
        mask[..., self.y0 : self.y1, self.x0 : self.x1] = 1.0
        return mask


def _open(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidInputError(f"{str(path)!r} is not a readable image (PNG or JPEG): {err}") from err


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB [1, 3, H, W] in [-1, 1]; resized (bicubic) to `size` = (width, height) when given."""
    from PIL import Image

    image = _open(path).convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def load_mask(path: str | Path, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """[1, 1, H, W], 1 where the mask image is non-zero. Its size must equal the image's (width, height)."""
    mask = _open(path).convert("L")
    if mask.size != size:
        raise InvalidInputError(
            f"{name} {str(path)!r} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}; "
            "masks must have the size of the image they belong to"
        )
    tensor = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]
    if not tensor.any():
        raise InvalidInputError(f"{name} {str(path)!r} is empty (no non-zero pixel); mark the region in white")
    return tensor


def check_image_size(width: int, height: int, multiple: int, low: int, high: int, what: str = "image") -> None:
    """Refuse sizes the preset's engines cannot take, naming the nearest sizes that work."""
    for side, value in (("width", width), ("height", height)):
        if value % multiple or not low <= value <= high:
            near = min(max(round(value / multiple) * multiple, low), high)
            raise InvalidInputError(
                f"{what} {side} {value} is not usable: it must be a multiple of {multiple} in [{low}, {high}]; "
                f"resize to {near} or choose another --size"
            )


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write [1, 3, H, W] in [-1, 1] as PNG/JPEG, atomically (a failed write leaves no file)."""
    import os
    import tempfile

    from PIL import Image

    array = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(array).save(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
