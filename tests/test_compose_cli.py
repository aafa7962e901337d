"""`vgrt compose` end to end on the tiny preset, and its early errors (nothing written on failure)."""

import pytest
from PIL import Image

from vgrt.cli import main

from .cli_args import mca_ctrl_args


def test_compose_writes_an_image(examples, tmp_path, composer_cache, capsys):
    assert main(mca_ctrl_args(examples, tmp_path / "out.png", "--cache", str(composer_cache), steps=3)) == 0
    assert Image.open(tmp_path / "out.png").size == (32, 32)
    assert "random" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "30x30"], "width 30 is not usable"),
        (["--size", "big"], "is not WxH"),
        (["--mode", "draw"], None),  # argparse refuses it
    ],
)
def test_compose_errors_write_nothing(examples, tmp_path, extra, message, capsys):
    out = tmp_path / "out.png"
    if message is None:
        with pytest.raises(SystemExit):
            main(mca_ctrl_args(examples, out, *extra))
    else:
        assert main(mca_ctrl_args(examples, out, *extra)) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_and_mismatched_inputs_are_named(examples, tmp_path, capsys):
    bad = mca_ctrl_args(examples, tmp_path / "out.png")
    bad[bad.index("--subject") + 1] = str(tmp_path / "missing.png")
    assert main(bad) == 2 and "does not exist" in capsys.readouterr().err
    Image.new("L", (16, 16), 255).save(tmp_path / "small_mask.png")
    bad = mca_ctrl_args(examples, tmp_path / "out.png")
    bad[bad.index("--region-mask") + 1] = str(tmp_path / "small_mask.png")
    assert main(bad) == 2 and "is 16x16 but its image is 32x32" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_locref_from_the_command_line(examples, tmp_path, composer_cache, capsys):
    box = (examples / "box.txt").read_text().strip()
    base = ["compose", "locref", "--prompt", "a red ball", "--reference", str(examples / "subject.png"), "--box", box,
            "--size", "32x32", "--steps", "2", "--cache", str(composer_cache)]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "loc.png")]) == 0
    assert Image.open(tmp_path / "loc.png").size == (32, 32)
    assert main([*base, "--box", "0,0,8,8", "--out", str(tmp_path / "bad.png")]) == 2
    assert "1 reference images but 2 boxes" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_aicomposer_from_the_command_line(examples, tmp_path, composer_cache, capsys):
    base = ["compose", "aicomposer", "--foreground", str(examples / "subject.png"),
            "--foreground-mask", str(examples / "subject_mask.png"), "--background", str(examples / "scene.png"),
            "--steps", "4", "--cache", str(composer_cache)]  # fmt: skip
    assert main([*base, "--placement-mask", str(examples / "region_mask.png"), "--out", str(tmp_path / "a.png")]) == 0
    assert main([*base, "--box", "4,4,20,20", "--size", "64x64", "--out", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (32, 32) and Image.open(tmp_path / "b.png").size == (64, 64)
    assert main([*base, "--box", "4,4,40,20", "--out", str(tmp_path / "bad.png")]) == 2
    assert "outside the 32x32 image" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_vcf_from_the_command_line(examples, tmp_path, composer_cache, capsys):
    base = ["compose", "vcf", "--prompt", "a fox in this style", "--steps", "2", "--cache", str(composer_cache)]
    reference = ["--reference", str(examples / "subject.png")]
    assert main([*base, *reference, "--pno-steps", "1", "--out", str(tmp_path / "vcf.png")]) == 0
    assert Image.open(tmp_path / "vcf.png").size == (32, 32)
    assert "pno" in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    assert main([*base, "--reference", str(examples / "box.txt"), "--out", str(bad)]) == 2
    assert "box.txt' is not a readable image" in capsys.readouterr().err
    assert main([*base, *reference, "--pno-steps", "1", "--pno-lr", "nan", "--out", str(bad)]) == 2
    assert "lr_prompt must be a finite number > 0, got nan" in capsys.readouterr().err
    assert not bad.exists()
