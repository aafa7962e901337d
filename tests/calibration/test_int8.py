"""INT8 exports: they open on the CPU backends and agree with fp32, the float fallback follows the
per-layer SQNR and is listed in the manifest, and manifests of quantised exports are read strictly."""

import json

import numpy as np
import pytest

from ..runtime.cpu import pretend_cpu

pytest.importorskip("onnxruntime.quantization")

# Measured on the synthetic set's held-out feeds: ONNX Runtime 0.03-0.07, OpenVINO 0.05-0.10 (random
# weights and feeds; AVX-512 VNNI, 8-bit weights; AVX2 without VNNI, 7-bit weights: 0.05 on both); the bound leaves room for run-to-run spread and catches a broken quantisation (> 0.3).
TOLERANCE = 0.15


def _relative_error(export, out, backend, **settings):
    from vgrt.engines import open_runner
    from vgrt.export.feeds import random_feed

    with open_runner(export) as reference, open_runner(out, backend=backend, **settings) as quantised:
        feed = random_feed(reference.spec, {"batch": 2, "height": 16, "width": 16, "context": 77}, seed=100)
        name = reference.spec.outputs[0].name
        expected, got = reference.infer(feed)[name], quantised.infer(feed)[name]
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("backend,settings", [("onnxruntime", {}), ("openvino", {"threads": 1})])
def test_int8_export_opens_with_open_runner_and_agrees_with_fp32(int8_export, backend, settings):
    if backend == "openvino":
        pytest.importorskip("openvino")
    export, out, report = int8_export
    error = _relative_error(export, out, backend, **settings)
    assert 1e-4 < error < TOLERANCE  # quantised (not a copy of the fp32 model), and close to it
    assert 0 < report.relative_error < TOLERANCE


def test_int8_manifest_names_precision_backends_set_and_float_parts(int8_export, synthetic_set):
    from vgrt.calibration.int8 import Int8Settings, reduces_range
    from vgrt.export.manifest import read_manifest

    _, out, report = int8_export
    manifest = read_manifest(out)
    quantization = manifest.data["quantization"]
    assert manifest.precision == "int8"
    assert manifest.data["settings"]["dtype"] == "fp32"  # inputs and outputs stay fp32
    assert quantization["backends"] == ["onnxruntime", "openvino"]
    assert quantization["calibration"]["directory"] == str(synthetic_set[1].resolve())
    assert quantization["calibration"]["samples"] == 8
    assert any("Attention" in part for part in quantization["kept_in_float"])
    assert quantization["float_layers"] == report.float_layers
    assert quantization["reduce_range"] is reduces_range(Int8Settings())  # chosen by the CPU that quantised


@pytest.mark.parametrize(
    "flags,chosen,expected",
    [(("avx2",), None, True), (("avx512_vnni",), None, False), ((None,), None, True), (("avx2",), False, False)],
)
def test_weights_are_7_bit_where_the_cpu_has_no_int8_units_unless_chosen(monkeypatch, flags, chosen, expected):
    from vgrt.calibration.int8 import Int8Settings, reduces_range

    pretend_cpu(monkeypatch, *flags)
    assert reduces_range(Int8Settings(reduce_range=chosen)) is expected


@pytest.mark.parametrize("flags,warned", [(("avx2",), True), (("avx2", "avx_vnni"), False)])
def test_8_bit_weights_opened_on_a_cpu_without_int8_units_are_warned_of(
    int8_export, tmp_path, monkeypatch, caplog, flags, warned
):
    from vgrt.engines import open_runner

    pretend_cpu(monkeypatch, *flags)
    copy = _manifest_with(int8_export, tmp_path, lambda d: d["quantization"].update(reduce_range=False))
    with caplog.at_level("WARNING", logger="vgrt.engines"):
        open_runner(copy, backend="onnxruntime")
    assert ("saturating int16" in caplog.text) is warned
    assert "vgrt calibrate --reduce-range" in caplog.text or not warned


def test_torch_backend_is_refused_for_an_int8_export(int8_export):
    from vgrt.engines import open_runner
    from vgrt.errors import InvalidInputError

    _, out, _ = int8_export
    with pytest.raises(InvalidInputError, match="int8 export that onnxruntime, openvino open, not torch"):
        open_runner(out, backend="torch")


def test_layers_below_the_threshold_fall_back_to_float_and_are_listed(synthetic_set, tmp_path):
    import onnx

    from vgrt.calibration.int8 import Int8Settings, quantize_export
    from vgrt.export.manifest import read_manifest

    export, calibration = synthetic_set
    out, report = quantize_export(export, calibration, tmp_path / "int8", Int8Settings(sqnr_threshold_db=38.0))
    low = sorted(name for name, db in report.layer_sqnr_db.items() if db < 38.0)
    assert low and len(low) < len(report.layer_sqnr_db)  # the threshold splits the layers
    assert report.float_layers == low
    assert read_manifest(out).data["quantization"]["float_layers"] == low
    model = onnx.load(str(out / "unet.onnx"))
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        dequantized = [made_by.get(i) == "DequantizeLinear" for i in node.input[:2]]
        assert any(dequantized) != (node.name in low) or node.op_type not in ("Conv", "MatMul", "Gemm")


def test_sqnr_is_per_layer_and_finite(int8_export):
    _, _, report = int8_export
    values = np.array(list(report.layer_sqnr_db.values()))
    assert len(values) > 50 and np.isfinite(values).all()
    assert 15 < np.median(values) < 60  # int8 of well-spread values: about 6 dB per bit, less the spread


def test_a_set_without_feeds_for_the_unet_is_refused_before_quantising(synthetic_set, tmp_path):
    import torch

    from vgrt.calibration.capture import model_identity
    from vgrt.calibration.dataset import CapturedRun, open_for_capture
    from vgrt.calibration.int8 import quantize_export
    from vgrt.errors import InvalidInputError
    from vgrt.models.source import ModelSource

    export, _ = synthetic_set
    other = {"sample": torch.zeros(2, 4, 16, 16), "self_key_masks": torch.ones(2, 2, 16, 16)}  # another UNet's feeds
    inputs = {name: {"dtype": "float32", "shape": list(v.shape)} for name, v in other.items()}
    with open_for_capture(tmp_path / "set", model_identity(ModelSource("tiny"))) as writer:
        writer.add_run(CapturedRun("m-0", "mca-ctrl", 0, 1, (128, 128), "mutual", inputs, 1, 1, "", 0, ""), [other])
    with pytest.raises(InvalidInputError, match="has no feeds for a UNet with inputs.*mca-ctrl \\(mutual\\)"):
        quantize_export(export, tmp_path / "set", tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def _manifest_with(int8_export, tmp_path, change):
    import shutil

    _, out, _ = int8_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = json.loads((copy / "manifest.json").read_text())
    change(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda d: d.update(precision="int4"),
            "precision is a string \"int4\", expected 'fp32' or 'fp16' or 'int8' or 'fp8'",
        ),
        (
            lambda d: d.pop("quantization"),
            "quantization is missing, expected present exactly when precision is 'int8' or 'fp8'",
        ),
        (lambda d: d["quantization"].pop("backends"), "quantization.backends is missing"),
    ],
)
def test_quantised_manifests_are_read_strictly(int8_export, tmp_path, change, message):
    from vgrt.errors import ArtifactError
    from vgrt.export.manifest import read_manifest

    with pytest.raises(ArtifactError, match=message.replace("(", "\\(").replace(")", "\\)")):
        read_manifest(_manifest_with(int8_export, tmp_path, change))
