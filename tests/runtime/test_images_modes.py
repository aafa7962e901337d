"""Every image mode Pillow reads becomes the right RGB image and mask, or is refused by name; oversized
files are refused from their header."""

import re
import struct
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from vgrt.errors import InvalidInputError
from vgrt.runtime.images import MAX_INPUT_PIXELS, image_size, load_image, load_mask

LEVEL = 1 / 127.5  # one 8-bit level in the [-1, 1] range


def _bands(gray: np.ndarray, *values: int | None) -> list[Image.Image]:
    """Bands for Image.merge: None is the gray image itself, an int a constant band."""
    return [Image.fromarray(gray) if v is None else Image.new("L", gray.shape[::-1], v) for v in values]


def _palette(gray: np.ndarray) -> Image.Image:
    image = Image.frombytes("P", gray.shape[::-1], gray.tobytes())
    image.putpalette([level for i in range(256) for level in (i, i, i)])
    return image


def _sixteen(gray: np.ndarray, dtype: str, mode: str) -> Image.Image:
    return Image.frombytes(mode, gray.shape[::-1], (gray.astype(dtype) * 257).tobytes())


# mode -> an image of that mode showing the 8-bit gray picture `gray` (opaque)
GRAY_IN_MODE = {
    "L": lambda g: Image.fromarray(g),
    "1": lambda g: Image.fromarray(g).point(lambda v: 255 * (v >= 128)).convert("1"),
    "P": _palette,
    "PA": lambda g: _palette(g).convert("PA"),
    "LA": lambda g: Image.merge("LA", _bands(g, None, 255)),
    "La": lambda g: Image.merge("La", _bands(g, None, 255)),
    "RGB": lambda g: Image.merge("RGB", _bands(g, None, None, None)),
    "RGBA": lambda g: Image.merge("RGBA", _bands(g, None, None, None, 255)),
    "RGBa": lambda g: Image.merge("RGBa", _bands(g, None, None, None, 255)),
    "RGBX": lambda g: Image.merge("RGBX", _bands(g, None, None, None, 255)),
    "CMYK": lambda g: Image.merge("CMYK", [*_bands(g, 0, 0, 0), Image.fromarray(255 - g)]),
    "YCbCr": lambda g: Image.merge("YCbCr", _bands(g, None, 128, 128)),
    "HSV": lambda g: Image.merge("HSV", _bands(g, 0, 0, None)),
    "I;16": lambda g: _sixteen(g, "<u2", "I;16"),
    "I;16L": lambda g: _sixteen(g, "<u2", "I;16L"),
    "I;16N": lambda g: _sixteen(g, "=u2", "I;16N"),
    "I;16B": lambda g: _sixteen(g, ">u2", "I;16B"),
    "I": lambda g: Image.fromarray(g.astype(np.int32) * 257),
    "F": lambda g: Image.fromarray(g.astype(np.float32) / 255),
}
grays = arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6)))


def _load(image: Image.Image, **kwargs) -> torch.Tensor:
    with mock.patch("vgrt.runtime.images._open", return_value=image):
        return load_image("in-memory.png", **kwargs)


def _mask(image: Image.Image) -> torch.Tensor:
    with mock.patch("vgrt.runtime.images._open", return_value=image):
        return load_mask("in-memory.png", image.size)


@settings(max_examples=30, deadline=None)
@given(mode=st.sampled_from(sorted(GRAY_IN_MODE)), gray=grays)
def test_every_mode_reads_as_the_same_gray_picture(mode, gray):
    if mode == "1":
        gray = np.where(gray >= 128, 255, 0).astype(np.uint8)
    expected = torch.from_numpy(gray.astype(np.float32) / 127.5 - 1)[None, None].expand(1, 3, *gray.shape)
    got = _load(GRAY_IN_MODE[mode](gray))
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() <= LEVEL + 1e-6, mode


@settings(max_examples=30, deadline=None)
@given(mode=st.sampled_from(sorted(GRAY_IN_MODE)), gray=grays)
def test_every_mode_gives_the_mask_of_its_non_zero_pixels(mode, gray):
    gray = np.where(gray >= 128, 255, 0).astype(np.uint8)  # masks are drawn black and white
    gray.flat[0] = 255  # never empty (an empty mask is refused)
    mask = _mask(GRAY_IN_MODE[mode](gray))
    assert torch.equal(mask, torch.from_numpy((gray > 0).astype(np.float32))[None, None]), mode


def test_lab_is_converted_by_pillow():
    image = Image.new("LAB", (4, 4), (128, 128, 128))  # L* 50, neutral: a middle gray
    assert _load(image).sub(119 / 127.5 - 1).abs().max() <= LEVEL


@settings(max_examples=25, deadline=None)
@given(
    colour=arrays(np.uint8, (4, 4, 3)),
    opaque=arrays(np.bool_, (4, 4)),
    mode=st.sampled_from(["RGBA", "LA", "PA"]),
)
def test_transparent_pixels_are_white_in_images_and_outside_masks(colour, opaque, mode):
    opaque[0, 0] = True
    colour[0, 0] = 255  # the mask is never empty
    rgba = np.dstack([colour, np.where(opaque, 255, 0).astype(np.uint8)])
    image = Image.fromarray(rgba)
    if mode != "RGBA":  # one band of colour; PA through a gray palette
        rgba[..., 1] = rgba[..., 2] = rgba[..., 0]
        gray = Image.merge("LA", [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 3])])
        image = gray if mode == "LA" else Image.merge("PA", [_palette(rgba[..., 0]), gray.getchannel("A")])
    pixels = _load(image)[0].permute(1, 2, 0)
    expected = torch.from_numpy(np.where(opaque[..., None], rgba[..., :3], 255).astype(np.float32) / 127.5 - 1)
    assert torch.allclose(pixels, expected, atol=1e-6)
    inside = opaque & (rgba[..., :3].max(-1) > 0)
    assert torch.equal(_mask(image)[0, 0], torch.from_numpy(inside.astype(np.float32)))


def test_a_16_bit_png_keeps_its_gray_levels(tmp_path):
    """It was read as all white: Pillow's own conversion clips 16-bit values to 255."""
    levels = np.array([[0, 16384, 32768, 65535]], np.uint16)
    Image.fromarray(levels).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    got = load_image(tmp_path / "gray16.png")[0, 0, 0]
    assert torch.allclose(got, torch.tensor([-1.0, -0.5, 0.0, 1.0]), atol=1e-4)
    resized = load_image(tmp_path / "gray16.png", (8, 2))  # resized as floats, not clipped to white
    assert resized.shape == (1, 3, 2, 8) and -1 <= resized.min() and resized.max() <= 1 and resized.mean() < 0.5


@pytest.mark.parametrize(
    "mode, make, suffix",
    [
        ("P", lambda: _transparent_palette(), ".png"),
        ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 155)), ".tif"),
        ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 155)), ".jpg"),
        ("F", lambda: Image.fromarray(np.full((4, 4), 100 / 255, np.float32)), ".tif"),
        ("I;16B", lambda: Image.frombytes("I;16B", (4, 4), (np.full(16, 100 * 257, ">u2")).tobytes()), ".tif"),
        ("I", lambda: Image.fromarray(np.full((4, 4), 100 * 257, np.int32)), ".tif"),
    ],
)
def test_files_in_other_modes_read_back(tmp_path, mode, make, suffix):
    make().save(tmp_path / f"image{suffix}")
    assert Image.open(tmp_path / f"image{suffix}").mode == mode
    image = load_image(tmp_path / f"image{suffix}")
    expected = 255.0 if mode == "P" else 100.0  # the transparent palette entry reads as white
    assert (image - (expected / 127.5 - 1)).abs().max() <= 2 * LEVEL


def _transparent_palette() -> Image.Image:
    image = _palette(np.zeros((4, 4), np.uint8))
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "image, seen",
    [
        (Image.fromarray(np.array([[0.0, 2.5]], np.float32)), "mode 'F' with values in [0, 2.5]"),
        (Image.fromarray(np.array([[-7, 9]], np.int32)), "mode 'I' with values in [-7, 9]"),
        (Image.fromarray(np.array([[0.0, np.nan]], np.float32)), "mode 'F' with values in"),
    ],
)
def test_values_outside_a_modes_range_are_refused_by_name(image, seen):
    with pytest.raises(InvalidInputError, match=rf"{re.escape(seen)}.*gray levels from 0 \(black\).*rescale it"):
        _load(image)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header says width x height, with no pixel data: it can be opened, never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(8193, 9000), height=st.integers(8193, 9000))
def test_oversized_files_are_refused_from_the_header(tmp_path, width, height):
    _png_header_only(tmp_path / "big.png", width, height)
    for read in (load_image, image_size, lambda p: load_mask(p, (width, height))):
        with pytest.raises(InvalidInputError, match=rf"is {width}x{height} \(\d+ megapixels\).*up to 67 megapixels"):
            read(tmp_path / "big.png")
    assert MAX_INPUT_PIXELS == 8192 * 8192


def test_pillows_decompression_bomb_limit_is_a_clear_error(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(InvalidInputError, match="'.*bomb.png' is too large to read.*downscale it"):
        load_image(tmp_path / "bomb.png")


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (16, 8), (200, 0, 0)).save(tmp_path / "turned.jpg", exif=exif)
    assert image_size(tmp_path / "turned.jpg") == (8, 16)
    assert load_image(tmp_path / "turned.jpg").shape == (1, 3, 16, 8)
