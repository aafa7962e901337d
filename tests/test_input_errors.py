"""Ordinary mistakes get one clear message (exit 2) before any work, and nothing is written: output and
cache locations, sizes, seeds, non-finite numbers, runner settings and feed types. Written images record
how they were made."""

import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vgrt.cli import main
from vgrt.errors import InvalidInputError

from .cli_args import mca_ctrl_args


def refused(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--size", "0x0"],
            ["--size 0x0 (tiny preset) width 0 is not usable", "multiple of 4 in [16, 64]", "resize to 16"],
        ),
        (
            ["--size", "100000x100000"],
            ["--size 100000x100000 (tiny preset) width 100000 is not usable", "resize to 64"],
        ),
        (["--size=-32x32"], ["width -32 is not usable", "resize to 16"]),
        (["--seed", str(2**64)], [f"--seed must be a whole number in [0, 2**64 - 1], got {2**64}", "smaller seed"]),
        (["--seed", "-1"], ["--seed must be a whole number in [0, 2**64 - 1], got -1"]),
    ],
)
def test_sizes_and_seeds_are_refused_before_any_image_is_read(examples, tmp_path, capsys, no_work, extra, expected):
    err = refused(mca_ctrl_args(examples, tmp_path / "out.png", *extra), capsys)
    for text in expected:
        assert text in err
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--guidance", "inf"], "guidance_scale must be >= 1 and finite (1 turns guidance off), got inf"),
        (["--guidance", "nan"], "guidance_scale must be >= 1 and finite (1 turns guidance off), got nan"),
        (["--steps", "5000"], "steps=5000 exceeds the schedule's 1000 training timesteps; use at most 1000"),
    ],
)
def test_non_finite_and_unbounded_numbers_are_refused(examples, tmp_path, capsys, monkeypatch, extra, expected):
    monkeypatch.setattr("vgrt.runtime.composer.Composer.__post_init__", lambda self: pytest.fail("engines opened"))
    assert expected in refused(mca_ctrl_args(examples, tmp_path / "out.png", *extra), capsys)
    assert files_under(tmp_path) == []


def test_other_methods_refuse_non_finite_numbers(examples, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vgrt.runtime.composer.Composer.__post_init__", lambda self: pytest.fail("engines opened"))
    objects = ["compose", "visual-prompts", "--object", str(examples / "subject.png"), "--out", str(tmp_path / "o.png")]
    assert "guidance_lr must be a finite number > 0, got inf" in refused([*objects, "--guidance-lr", "inf"], capsys)
    vcf = [
        "compose",
        "vcf",
        "--prompt",
        "p",
        "--reference",
        str(examples / "subject.png"),
        "--out",
        str(tmp_path / "v.png"),
    ]
    assert "alpha must lie in [0, 1] (the image's weight), got nan" in refused([*vcf, "--alpha", "nan"], capsys)
    assert files_under(tmp_path) == []


def test_a_huge_input_image_is_refused_from_its_header(examples, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("L", (1, 1)).save(big)
    data = bytearray(big.read_bytes())  # rewrite the header's size: 9000x9000, never decoded
    data[16:24] = (9000).to_bytes(4, "big") * 2
    data[29:33] = __import__("zlib").crc32(bytes(data[12:29])).to_bytes(4, "big")
    big.write_bytes(bytes(data))
    argv = mca_ctrl_args(examples, tmp_path / "out.png")
    argv[argv.index("--condition") + 1] = str(big)
    assert "is 9000x9000 (81 megapixels); vgrt reads images up to 67 megapixels: downscale it" in refused(argv, capsys)
    assert not (tmp_path / "out.png").exists()


def test_an_unusable_image_size_is_refused_before_decoding(examples, tmp_path, capsys, no_work):
    Image.new("RGB", (30, 32)).save(tmp_path / "odd.png")
    argv = mca_ctrl_args(examples, tmp_path / "out.png")
    argv[argv.index("--condition") + 1] = str(tmp_path / "odd.png")
    err = refused(argv, capsys)
    assert "odd.png' (no --size given; tiny preset) width 30 is not usable" in err and "resize to 32" in err


@pytest.mark.parametrize("count", [8, 20])
def test_too_many_references_or_objects_are_refused_before_loading(examples, tmp_path, capsys, no_work, count):
    reference = str(examples / "subject.png")
    locref = ["compose", "locref", "--prompt", "p", "--size", "32x32", "--out", str(tmp_path / "l.png")]
    for _ in range(count):
        locref += ["--reference", reference, "--box", "0,0,8,8"]
    assert f"{count} reference images, but the exported profile takes at most 7" in refused(locref, capsys)
    objects = ["compose", "visual-prompts", "--size", "32x32", "--out", str(tmp_path / "o.png")]
    objects += ["--object", reference] * (count + 1)
    assert f"{count + 1} objects, but the exported profile takes at most 8" in refused(objects, capsys)


def test_out_must_be_a_writable_file_path(examples, tmp_path, capsys, no_work):
    (tmp_path / "a_file").write_text("mine")
    err = refused(mca_ctrl_args(examples, tmp_path / "a_file" / "out.png"), capsys)
    assert f"--out '{tmp_path}/a_file/out.png' lies under '{tmp_path}/a_file', which is a file, not a folder" in err
    (tmp_path / "folder.png").mkdir()
    err = refused(mca_ctrl_args(examples, tmp_path / "folder.png"), capsys)
    assert "is an existing folder, not a file; name a file in it, e.g. " in err and "folder.png/out.png'" in err
    assert "must end in .png or .jpg or .jpeg" in refused(mca_ctrl_args(examples, tmp_path / "out.gif"), capsys)
    assert (tmp_path / "a_file").read_text() == "mine" and list((tmp_path / "folder.png").iterdir()) == []


def _refuse_writes_in(folder: Path, monkeypatch):
    """The write probe fails in `folder` as in a read-only folder (root ignores permission bits)."""
    make = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_out_and_cache_folders_are_refused(examples, tmp_path, capsys, monkeypatch, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    _refuse_writes_in(locked, monkeypatch)
    err = refused(mca_ctrl_args(examples, locked / "new" / "out.png"), capsys)
    assert f"--out '{locked}/new/out.png' cannot be written: the folder '{locked}' is not writable" in err
    assert "Permission denied" in err and "choose a writable location" in err
    err = refused(mca_ctrl_args(examples, tmp_path / "out.png", "--cache", str(locked)), capsys)
    assert f"--cache '{locked}' cannot be written: the folder '{locked}' is not writable" in err
    assert files_under(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_folder_is_refused(examples, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert "is not writable" in refused(mca_ctrl_args(examples, locked / "out.png"), capsys)


def test_cache_that_is_a_file_is_refused(examples, tmp_path, capsys, no_work):
    (tmp_path / "cache").write_text("not a folder")
    err = refused(mca_ctrl_args(examples, tmp_path / "out.png", "--cache", str(tmp_path / "cache")), capsys)
    assert f"--cache '{tmp_path}/cache' is a file, not a folder; give a folder" in err
    assert (tmp_path / "cache").read_text() == "not a folder" and not (tmp_path / "out.png").exists()


def test_the_default_cache_is_checked_too(examples, tmp_path, capsys, monkeypatch, no_work):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("VGRT_CACHE", str(tmp_path / "cache"))
    err = refused(mca_ctrl_args(examples, tmp_path / "out.png"), capsys)
    assert f"the cache (--cache or $VGRT_CACHE) '{tmp_path}/cache' is a file, not a folder" in err


def test_examples_refuse_the_sizes_compose_refuses(tmp_path, capsys):
    for size in ("7", "0", "100"):
        err = refused(["examples", "--out", str(tmp_path / "ex"), "--size", size], capsys)
        assert f"--size {size} (tiny preset) width {size} is not usable: it must be a multiple of 4 in [16, 64]" in err
    assert not (tmp_path / "ex").exists()
    err = refused(["examples", "--out", str(tmp_path / "ex"), "--size", "64", "--preset", "sd15"], capsys)
    assert "(sd15 preset) width 64 is not usable: it must be a multiple of 64 in [256, 1024]" in err
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in refused(["examples", "--out", str(tmp_path / "file")], capsys)
    assert main(["examples", "--out", str(tmp_path / "ex"), "--size", "16"]) == 0
    assert Image.open(tmp_path / "ex" / "scene.png").text["Software"].startswith("vgrt ")


def test_open_runner_names_an_unknown_setting_and_lists_the_valid_ones(tmp_path):
    from vgrt.engines import open_runner

    expected = {
        "onnxruntime": ("threads", "allow_spinning, denormals_as_zero, device_id, intra_op_threads, memory_arena"),
        "torch": ("dtype", "takes: compile_mode, device"),
        "tensorrt": ("graph", "aot, attention, cache_dir, cuda_graph, device"),
    }
    for backend, (keyword, valid) in expected.items():
        with pytest.raises(InvalidInputError, match=f"unknown {backend} runner setting {keyword}; the {backend} "):
            open_runner(tmp_path, backend=backend, **{keyword: 1})
        with pytest.raises(InvalidInputError, match=valid):
            open_runner(tmp_path, backend=backend, **{keyword: 1})


def test_feed_values_must_be_tensors_of_the_spec_dtype_even_unvalidated():
    from vgrt.engines.base import Runner
    from vgrt.export.spec import unet_spec
    from vgrt.models.presets import get_preset

    spec = unet_spec(get_preset("tiny"), frozenset(), "float32", num_blocks=4)

    class Stub(Runner):
        def activate_impl(self): ...

        def deactivate_impl(self): ...

        def infer_impl(self, feed, sizes):
            raise AssertionError("ran an unchecked feed")

    runner = Stub(spec).activate()
    feed = {
        "sample": torch.zeros(1, 4, 16, 16),
        "timestep": torch.zeros(1),
        "encoder_hidden_states": torch.zeros(1, 8, 32),
    }
    for validate in (True, False):
        listed = {**feed, "timestep": [1.0]}
        with pytest.raises(InvalidInputError, match=r"input 'timestep' is a list, expected a torch tensor or numpy"):
            runner.infer(listed, validate=validate)
        doubles = {**feed, "sample": np.zeros((1, 4, 16, 16))}
        with pytest.raises(InvalidInputError, match=r"'sample' has dtype float64, expected float32; convert it with"):
            runner.infer(doubles, validate=validate)


def test_written_images_record_how_they_were_made(examples, tmp_path, composer_cache):
    from vgrt import __version__

    out = tmp_path / "out.png"
    assert (
        main([*mca_ctrl_args(examples, out, "--seed", "7", "--cache", str(composer_cache)), "--backend", "torch"]) == 0
    )
    text = Image.open(out).text
    assert text["Software"] == f"vgrt {__version__}" and text["vgrt.version"] == __version__
    assert {k: text[f"vgrt.{k}"] for k in ("method", "seed", "steps", "backend", "precision", "preset")} == {
        "method": "mca-ctrl", "seed": "7", "steps": "2", "backend": "torch", "precision": "fp32", "preset": "tiny",
    }  # fmt: skip
    assert text["vgrt.guidance_scale"] == "7.5" and text["vgrt.weights"] == "random, seed 0"


def test_jpeg_output_records_the_same_in_its_comment(tmp_path):
    from vgrt.runtime.images import save_image

    save_image(torch.zeros(1, 3, 8, 8), tmp_path / "out.jpg", {"vgrt.method": "vcf", "vgrt.weights": "/models/ünet"})
    assert json.loads(Image.open(tmp_path / "out.jpg").info["comment"]) == {
        "vgrt.method": "vcf", "vgrt.weights": "/models/ünet",
    }  # fmt: skip
    save_image(torch.zeros(1, 3, 8, 8), tmp_path / "out.png", {"vgrt.weights": "/models/ünet"})
    assert Image.open(tmp_path / "out.png").text["vgrt.weights"] == "/models/ünet"  # iTXt: not Latin-1
