"""Example inputs drawn with PIL: a subject (a red disc on a light background), a scene (sky over
grass), their masks, and a box. Good for trying every method; not a stand-in for real photographs."""

from pathlib import Path

from PIL import Image, ImageDraw


def write_examples(directory: str | Path, size: int = 64) -> list[Path]:
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
    files = {"subject.png": subject, "subject_mask.png": subject_mask, "scene.png": scene, "region_mask.png": region_mask}
    written = []
    for name, image in files.items():
        image.save(directory / name)
        written.append(directory / name)
    (directory / "box.txt").write_text(",".join(map(str, region)) + "\n")
    written.append(directory / "box.txt")
    return written
