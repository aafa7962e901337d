"""Image, mask and box inputs of the composition methods, checked before any engine runs.

Images are RGB tensors [1, 3, H, W] in [-1, 1] (the VAE's range); masks are float [1, 1, H, W] with 1
inside (any non-zero, non-transparent pixel of a mask image counts as inside); boxes are `x0,y0,x1,y1`
in pixels. Every image mode Pillow reads is converted (see `load_image`), and files are size-checked from
their header before any pixel is decoded.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vgrt.errors import InvalidInputError

if TYPE_CHECKING:
    import PIL.Image

    from vgrt.models.presets import Preset


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


MAX_INPUT_PIXELS = 8192 * 8192  # larger files are refused from their header, before any pixel is decoded

# Modes with more than 8 bits per pixel (Pillow's gray-only high-bit modes) and the value read as white.
HIGH_BIT_WHITE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


@contextmanager
def _opened(path: str | Path) -> Iterator["PIL.Image.Image"]:
    """The image file opened lazily (header read, no pixels decoded), its pixel count checked."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_INPUT_PIXELS:
                raise InvalidInputError(
                    f"image {str(path)!r} is {width}x{height} ({width * height / 1e6:.0f} megapixels); vgrt reads "
                    f"images up to {MAX_INPUT_PIXELS / 1e6:.0f} megapixels: downscale it first"
                )
            yield image
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own limit, checked as it opens the file
        raise InvalidInputError(f"image {str(path)!r} is too large to read ({err}); downscale it first") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise InvalidInputError(f"{str(path)!r} is not a readable image (PNG or JPEG): {err}") from err


def _open(path: str | Path) -> "PIL.Image.Image":
    """The decoded image, turned upright as its EXIF orientation says (as viewers show it)."""
    from PIL import ImageOps

    with _opened(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image `load_image` reads from `path`, from the file's header alone."""
    from PIL import ExifTags

    with _opened(path) as image:
        width, height = image.size
        turned = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)  # 90-degree turns
        return (height, width) if turned else (width, height)


def _eight_bit(image: "PIL.Image.Image", path: str | Path) -> "PIL.Image.Image":
    """Any 8-bit mode as RGB, or as RGBA when it carries transparency (alpha band, palette or tRNS)."""
    if image.mode in PREMULTIPLIED:
        image = image.convert(PREMULTIPLIED[image.mode])
    transparent = "A" in image.getbands() or image.has_transparency_data
    try:
        return image.convert("RGBA" if transparent else "RGB")
    except ValueError as err:
        raise InvalidInputError(
            f"image {str(path)!r} has mode {image.mode!r}, which vgrt cannot convert to RGB ({err}); "
            "save it as an RGB PNG or JPEG"
        ) from err


def _high_bit_gray(image: "PIL.Image.Image", path: str | Path) -> np.ndarray:
    """A 16-bit, 32-bit integer or float gray image as [H, W] float32 in [0, 1]."""
    white = HIGH_BIT_WHITE[image.mode]
    values = np.asarray(image, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(values).all() and 0.0 <= low and high <= white):
        raise InvalidInputError(
            f"image {str(path)!r} has mode {image.mode!r} with values in [{low:g}, {high:g}]; vgrt reads this mode "
            f"as gray levels from 0 (black) to {white:g} (white): rescale it to that range or save it as a PNG"
        )
    return values / white


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB [1, 3, H, W] in [-1, 1]; resized (bicubic) to `size` = (width, height) when given.

    Every mode Pillow reads is converted: 16-bit, 32-bit integer and float gray by their full range,
    palettes and other colour spaces by Pillow, and transparent pixels composited over white.
    """
    from PIL import Image

    image = _open(path)
    if image.mode in HIGH_BIT_WHITE:
        gray = _high_bit_gray(image, path)
        if size is not None and image.size != size:
            gray = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BICUBIC)).clip(0.0, 1.0)
        array = np.repeat(gray[..., None], 3, axis=2) * 2.0 - 1.0
    else:
        image = _eight_bit(image, path)
        if image.mode == "RGBA":
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def load_mask(path: str | Path, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """[1, 1, H, W], 1 where the mask image is non-zero (and not transparent). Its size must equal the
    image's (width, height). Every mode Pillow reads is accepted, as in `load_image`."""
    image = _open(path)
    if image.size != size:
        raise InvalidInputError(
            f"{name} {str(path)!r} is {image.size[0]}x{image.size[1]} but its image is {size[0]}x{size[1]}; "
            "masks must have the size of the image they belong to"
        )
    if image.mode in HIGH_BIT_WHITE:
        inside = _high_bit_gray(image, path) > 0
    else:
        pixels = np.asarray(_eight_bit(image, path))
        inside = pixels[..., :3].max(axis=-1) > 0
        if pixels.shape[-1] == 4:
            inside &= pixels[..., 3] > 0
    tensor = torch.from_numpy(inside.astype(np.float32))[None, None]
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


def check_preset_image_size(preset: "Preset", width: int, height: int, what: str = "image") -> None:
    """Refuse image sizes `preset`'s engines cannot take (the check of `Composer.check_image_size`)."""
    f, latent = preset.vae_factor, preset.profile.latent
    check_image_size(width, height, f * preset.latent_factor, latent.min * f, latent.max * f, what)


def save_image(image: torch.Tensor, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write [1, 3, H, W] in [-1, 1] as PNG/JPEG, atomically (a failed write leaves no file).

    `metadata` (how the image was made) goes into PNG text chunks, or a JPEG's comment as JSON.
    """
    import os
    import tempfile

    from PIL import Image

    array = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(array).save(temporary, **_metadata_options(path.suffix, metadata or {}))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _metadata_options(suffix: str, metadata: dict[str, str]) -> dict:
    import json

    from PIL.PngImagePlugin import PngInfo

    if not metadata:
        return {}
    if suffix.lower() == ".png":
        info = PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)  # iTXt (UTF-8) where Latin-1 does not fit
        return {"pnginfo": info}
    if suffix.lower() in (".jpg", ".jpeg"):
        return {"comment": json.dumps(metadata)}
    return {}
