"""`vgrt compose` end to end on the tiny preset, and its early errors (nothing written on failure)."""

import importlib.util

import pytest
import torch
from PIL import Image

from vgrt._lazy import is_available
from vgrt.cli import main

from .cli_args import mca_ctrl_args


def test_compose_writes_an_image(examples, tmp_path, composer_cache, capsys):
    assert main(mca_ctrl_args(examples, tmp_path / "out.png", "--cache", str(composer_cache), steps=3)) == 0
    image = Image.open(tmp_path / "out.png")
    assert image.size == (32, 32) and image.text["vgrt.device"] == "cpu" and "vgrt.attention" not in image.text
    assert "random" in capsys.readouterr().out


def test_the_default_backend_is_openvino_where_installed(monkeypatch):
    from vgrt.engines import default_backend

    assert default_backend() == "openvino"  # vgrt[cpu] installs it
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "openvino" else real_find_spec(name))
    assert default_backend() == "onnxruntime"


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


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--backend", "onnxruntime", "--attention", "native"],
            "--attention native is a tensorrt option, and the backend is onnxruntime; add ",
        ),
        (["--backend", "torch", "--attention", "plugin"], "--attention plugin is a tensorrt option, and the backend"),
        (
            ["--backend", "tensorrt", "--precision", "bf16"],
            "--precision bf16 does not run on the tensorrt backend; it runs on: openvino",
        ),
        (
            ["--backend", "onnxruntime", "--precision", "int8"],
            "--precision int8 runs an export calibrated by `vgrt calibrate`",
        ),
        (["--device", "gpu"], "unknown device 'gpu'; give 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_engine_options_the_backend_cannot_take_are_refused_first(examples, tmp_path, capsys, no_work, extra, message):
    assert main(mca_ctrl_args(examples, tmp_path / "out.png", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: cuda is a valid device")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_cuda_without_a_gpu_is_refused_first(examples, tmp_path, capsys, no_work, backend):
    assert main(mca_ctrl_args(examples, tmp_path / "out.png", "--backend", backend, "--device", "cuda")) == 2
    assert "device 'cuda:0' needs a CUDA GPU" in capsys.readouterr().err


def test_the_device_must_suit_the_backend(examples, tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the backend, not the machine, refuses it
    argv = mca_ctrl_args(examples, tmp_path / "out.png", "--backend", "openvino", "--device", "cuda")
    assert main(argv) == 2
    assert "the openvino backend runs on the CPU, not on 'cuda:0'; give device 'cpu'" in capsys.readouterr().err


@pytest.mark.skipif(is_available("tensorrt"), reason="TensorRT is installed here")
def test_tensorrt_without_tensorrt_names_what_to_install(examples, tmp_path, capsys, no_work):
    for extra in ([], ["--attention", "native"], ["--device", "cuda"]):  # cuda is its default device
        assert main(mca_ctrl_args(examples, tmp_path / "out.png", "--backend", "tensorrt", *extra)) == 2
        assert "TensorRT is not installed but is needed here; install it with: pip install" in capsys.readouterr().err


def test_the_light_option_lists_match_the_engines():
    from vgrt.commands import compose
    from vgrt.engines.engine_set import ATTENTION_ROUTES
    from vgrt.engines.openvino_runner import PRECISIONS as OPENVINO_PRECISIONS
    from vgrt.precision import BACKENDS_OF

    assert compose.ATTENTION_ROUTES == ATTENTION_ROUTES
    assert {p for p, backends in BACKENDS_OF.items() if "openvino" in backends} - {"int8"} == set(OPENVINO_PRECISIONS)
