"""`vgrt compose --precision int8 --calibrated DIR`: the UNet of the calibrated export runs in place of the
UNet of its features, everything else in fp32 from the export cache; what cannot work is refused before
any image is decoded or Composer made."""

import json
import shutil

import pytest
from PIL import Image

from vgrt.cli import main

pytest.importorskip("onnxruntime.quantization")

# Final latents of a 3-step VCF compose on tiny, int8 (calibrated on the synthetic set's random feeds)
# against fp32, as measured: 0.18 (onnxruntime), 0.19 (openvino); bf16 0.025; an unquantised UNet gives 0.
LATENTS_TOLERANCE = 0.3


@pytest.fixture(scope="module")
def cpu_int8(synthetic_set, tmp_path_factory):
    """A CPU INT8 export of the tiny plain UNet, the one VCF runs."""
    from vgrt.calibration.int8 import quantize_export

    export, calibration = synthetic_set
    out, _ = quantize_export(export, calibration, tmp_path_factory.mktemp("int8") / "unet-int8")
    return out


def _vcf_args(examples, out, *extra):
    return [
        "compose", "vcf", "--prompt", "a red ball", "--reference", str(examples / "subject.png"), "--steps", "3",
        "--backend", "onnxruntime", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--precision", "int8"],
            "--precision int8 runs an export calibrated by `vgrt calibrate`: give its --out with",
        ),
        (
            ["--calibrated", "{int8}"],
            "--calibrated runs a quantised UNet, and --precision is fp32: add --precision int8",
        ),
        (
            ["--precision", "int8", "--calibrated", "{fp32}"],
            "is an fp32 export of unet, not a quantised UNet; give the",
        ),
        (["--precision", "fp8", "--calibrated", "{int8}"], "--precision fp8 does not run on the onnxruntime backend"),
    ],
)
def test_what_cannot_run_is_refused_first(synthetic_set, cpu_int8, examples, tmp_path, capsys, no_work, extra, message):
    folders = {"int8": str(cpu_int8), "fp32": str(synthetic_set[0])}
    assert main(_vcf_args(examples, tmp_path / "out.png", *(e.format(**folders) for e in extra))) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_an_export_the_backend_does_not_open_is_refused_first(cpu_int8, examples, tmp_path, capsys, no_work):
    tensorrt_only = shutil.copytree(cpu_int8, tmp_path / "trt")
    manifest = json.loads((tensorrt_only / "manifest.json").read_text())
    manifest["quantization"]["backends"] = ["tensorrt"]
    (tensorrt_only / "manifest.json").write_text(json.dumps(manifest))
    argv = _vcf_args(examples, tmp_path / "out.png", "--precision", "int8", "--calibrated", str(tensorrt_only))
    assert main(argv) == 2
    assert "is an int8 export that tensorrt opens, not onnxruntime" in capsys.readouterr().err


def test_an_export_of_other_weights_is_refused_when_the_composer_is_made(cpu_int8, composer_cache):
    from vgrt.errors import InvalidInputError
    from vgrt.models.source import ModelSource
    from vgrt.runtime.composer import Composer

    with pytest.raises(InvalidInputError, match=r"quantises tiny \(random, seed 0\), not the model composed here"):
        Composer(ModelSource("tiny", seed=1), cache=composer_cache, calibrated=(cpu_int8,))


def test_compose_runs_the_int8_unet_and_the_rest_in_fp32(cpu_int8, examples, tmp_path, composer_cache, capsys):
    out = tmp_path / "int8.png"
    argv = _vcf_args(
        examples, out, "--precision", "int8", "--calibrated", str(cpu_int8), "--cache", str(composer_cache)
    )
    assert main(argv) == 0
    assert Image.open(out).text["vgrt.precision"] == "int8"


@pytest.mark.parametrize("backend, options", [("onnxruntime", {}), ("openvino", {"threads": 1})])
def test_an_int8_compose_stays_near_fp32(cpu_int8, examples, composer_cache, composers, backend, options):
    """Final latents of the same VCF request: int8 close to fp32, and not equal to it (the int8 UNet ran)."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    from vgrt.export.manifest import read_manifest
    from vgrt.models.source import ModelSource
    from vgrt.runtime.composer import Composer
    from vgrt.runtime.methods.registry import METHODS

    method = METHODS["vcf"]
    request = method.request({"prompt": "a red ball", "reference": str(examples / "subject.png"), "steps": 3},
                             composers("onnxruntime").preset)  # fmt: skip
    reference = method.compose(composers("onnxruntime"), request).latents
    with Composer(ModelSource("tiny"), backend, cache=composer_cache, progress=False, runner_options=options,
                  calibrated=(cpu_int8,)) as composer:  # fmt: skip
        latents = method.compose(composer, request).latents
        assert composer.engines.artifacts.export("unet", "none") == cpu_int8
        assert read_manifest(composer.engines.artifacts.export("vae_decoder", "none")).precision == "fp32"
    error = ((latents - reference).norm() / reference.norm()).item()
    assert 1e-3 < error < LATENTS_TOLERANCE


def test_the_rest_runs_in_fp32_on_the_cpu_and_fp16_on_tensorrt():
    from vgrt.precision import companion_dtype

    assert [companion_dtype("int8", b) for b in ("onnxruntime", "openvino", "tensorrt")] == ["fp32", "fp32", "fp16"]
    assert (companion_dtype("fp8", "tensorrt"), companion_dtype("bf16", "openvino")) == ("fp16", "fp32")
