"""Bad `vgrt bench` arguments fail before any work, with a message that lists what is available."""

import pytest

from vgrt.bench import backends
from vgrt.cli import main


def bench_error(capsys: pytest.CaptureFixture, tmp_path, *args: str) -> str:
    out = tmp_path / "results"
    assert main(["bench", *args, "--out", str(out)]) == 2
    assert not out.exists(), "nothing may run before the arguments are checked"
    return capsys.readouterr().err


def test_unknown_suite_lists_the_suites(capsys, tmp_path):
    err = bench_error(capsys, tmp_path, "speed")
    assert "unknown bench suite 'speed'" in err
    assert "unet (" in err and "attention (" in err and "export (" in err and "compose (" in err


def test_unknown_backend_lists_the_suites_backends(capsys, tmp_path):
    err = bench_error(capsys, tmp_path, "unet", "--quick", "--backends", "torch,onnx-runtime")
    assert "unknown backend(s) 'onnx-runtime' for the unet suite" in err
    assert (
        "it times: torch, torch-bf16, onnxruntime, openvino, openvino-bf16, openvino-dynamic, onnxruntime-int8, openvino-int8, onnxruntime-cuda, tensorrt"
        in err
    )
    assert "available here: torch" in err


def test_backend_not_installed_says_why_and_what_is_available(capsys, tmp_path, monkeypatch):
    real = backends.unavailable_reason
    monkeypatch.setattr(
        backends, "unavailable_reason", lambda b: "onnxruntime: not installed" if b == "onnxruntime" else real(b)
    )
    err = bench_error(capsys, tmp_path, "attention", "--quick", "--backends", "onnxruntime")
    assert "backend 'onnxruntime' cannot run here: onnxruntime: not installed" in err
    assert "available here: torch" in err


def test_triton_needs_a_gpu(capsys, tmp_path):
    if backends.unavailable_reason("triton") is None:
        pytest.skip("triton can run on this machine")
    err = bench_error(capsys, tmp_path, "attention", "--quick", "--backends", "triton")
    assert "backend 'triton' cannot run here" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (("export", "--backends", "torch"), "the export suite does not take --backends"),
        (("attention", "--features", "all"), "the attention suite does not take --features"),
        (("unet", "--preset", "sd16"), "unknown preset 'sd16'; choose one of: tiny, sd15, sd21, sdxl"),
        (("unet", "--features", "colour"), "unknown feature(s) 'colour'"),
        (("unet", "--precision", "int8"), "unknown --precision 'int8'; choose from: fp32, fp16"),
        (("unet", "--batch", "two"), "--batch takes comma-separated whole numbers"),
        (("unet", "--latent", "60"), "--latent 60 does not fit sd15: latents are multiples of 8 in [32, 128]"),
        (("unet", "--repeats", "0"), "--warmup and --repeats must be >= 1"),
        (("unet", "--export-dir", "/nonexistent"), "is not a complete vgrt export"),
        (("unet", "--methods", "locref"), "the unet suite does not take --methods"),
        (("compose", "--methods", "mca-ctrl,dreambooth"), "unknown method(s) 'dreambooth'; choose from: mca-ctrl"),
        (("compose", "--steps", "0"), "--steps must be >= 1, got 0"),
        (("compose", "--gradient-steps", "0"), "--gradient-steps must be >= 1, got 0"),
        (("unet", "--gradient-steps", "3"), "the unet suite does not take --gradient-steps"),
        (("compose", "--features", "mutual"), "the compose suite does not take --features"),
        (("compose", "--backends", "tensorrt"), "unknown backend(s) 'tensorrt' for the compose suite"),
    ],
)
def test_bad_options(capsys, tmp_path, args, message):
    assert message in bench_error(capsys, tmp_path, *args)


def test_export_dir_that_disagrees_with_the_options(capsys, tmp_path, tiny_export):
    err = bench_error(capsys, tmp_path, "unet", "--export-dir", str(tiny_export()), "--preset", "sd15")
    assert "--preset sd15 disagrees with --export-dir" in err and "which holds tiny" in err
