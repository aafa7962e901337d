"""Image, mask and box inputs fail with clear errors before any engine runs."""

import numpy as np
import pytest
import torch
from PIL import Image

from vgrt.errors import InvalidInputError
from vgrt.runtime.images import Box, check_image_size, load_image, load_mask, save_image


@pytest.fixture
def files(tmp_path):
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((32, 48), np.uint8)
    mask[8:16, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_and_mask_load(files):
    image = load_image(files / "image.png")
    assert image.shape == (1, 3, 32, 48) and torch.allclose(image, torch.full_like(image, 200 / 127.5 - 1))
    mask = load_mask(files / "mask.png", (48, 32))
    assert mask.shape == (1, 1, 32, 48) and mask.sum() == 8 * 16


def test_bad_files_are_named(files):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_image(files / "missing.png")
    with pytest.raises(InvalidInputError, match="not a readable image"):
        load_image(files / "notes.txt")
    with pytest.raises(InvalidInputError, match="is 16x16 but its image is 48x32"):
        load_mask(files / "small.png", (48, 32))
    with pytest.raises(InvalidInputError, match="is empty"):
        load_mask(files / "empty.png", (48, 32))


def test_boxes():
    assert Box.parse("4,4,20,12").mask(48, 32).sum() == 16 * 8
    with pytest.raises(InvalidInputError, match="outside the 48x32 image"):
        Box.parse("0,0,64,8").mask(48, 32)
    with pytest.raises(InvalidInputError, match="not x0,y0,x1,y1"):
        Box.parse("1,2,3")


def test_image_size_check_names_a_working_size():
    check_image_size(64, 32, 16, 16, 128)
    with pytest.raises(InvalidInputError, match="width 70 is not usable.*resize to 64"):
        check_image_size(70, 32, 16, 16, 128)


def test_save_is_atomic(tmp_path, monkeypatch):
    image = torch.zeros(1, 3, 8, 8)
    save_image(image, tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").size == (8, 8)
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_image(image, tmp_path / "fail.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
