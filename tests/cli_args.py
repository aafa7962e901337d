"""Command lines the CLI tests share."""

from pathlib import Path


def mca_ctrl_args(examples: Path, out: Path, *extra: str, steps: int = 2) -> list[str]:
    """`vgrt compose mca-ctrl` on the example images (the `examples` fixture), writing `out`."""
    return [
        "compose", "mca-ctrl", "--subject", str(examples / "subject.png"), "--subject-mask", str(examples / "subject_mask.png"),
        "--condition", str(examples / "scene.png"), "--region-mask", str(examples / "region_mask.png"),
        "--steps", str(steps), "--out", str(out), *extra,
    ]  # fmt: skip
