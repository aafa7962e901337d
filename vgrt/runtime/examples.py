"""Example inputs drawn with PIL: a subject (a red disc on a light background), a scene (sky over
grass), their masks, and a box. Good for trying every method; not a stand-in for real photographs."""

from pathlib import Path

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo


def write_examples(directory: str | Path, size: int = 64, preset: str | None = None) -> list[Path]:
    """Write the examples at `size` x `size`. With `preset`, a size its engines cannot take is refused first
    (the check `vgrt compose` makes), so no file is written that compose would refuse."""
    from vgrt import __version__
    from vgrt.models.presets import get_preset
    from vgrt.runtime.images import check_preset_image_size

    if preset is not None:
        check_preset_image_size(get_preset(preset), size, size, what=f"--size {size} ({preset} preset)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quarter, half = size // 4, size // 2
    subject = Image.new("RGB", (size, size), (235, 235, 225))
    subject_mask = Image.new("L", (size, size), 0)
    disc = (quarter, quarter, size - quarter, size - quarter)
    ImageDraw.Draw(subject).ellipse(disc, fill=(200, 40, 40))
    ImageDraw.Draw(subject_mask).ellipse(disc, fill=255)
    scene = Image.new("RGB", (size, size), (120, 170, 230))
    ImageDraw.Draw(scene).rectangle((0, half + quarter // 2, size, size), fill=(60, 150, 60))
    region = (half, quarter, size - quarter // 2, half + quarter)  # right of centre, above the grass
    region_mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(region_mask).rectangle(region, fill=255)
    files = {
        "subject.png": subject,
        "subject_mask.png": subject_mask,
        "scene.png": scene,
        "region_mask.png": region_mask,
    }
    written = []
    for name, image in files.items():
        info = PngInfo()
        info.add_text("Software", f"vgrt {__version__}")
        info.add_text("vgrt.example", f"{name}, {size}x{size}, drawn by vgrt examples")
        image.save(directory / name, pnginfo=info)
        written.append(directory / name)
    (directory / "box.txt").write_text(",".join(map(str, region)) + "\n")
    written.append(directory / "box.txt")
    return written
