"""TensorRT INT8 and FP8 exports, proved without TensorRT: the Q/DQ graph is in the form TensorRT takes
(symmetric, no INT32 dequantisation, masked attention untouched in fp16), passes the ONNX checker, runs on
ONNX Runtime on the CPU close to the fp16 export, a quantised layer computes what PyTorch's fake
quantisation of it computes, and `vgrt build --precision int8|fp8` hands it to the TensorRT build (the
steps that need TensorRT stood in for, as for the fp16 build)."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from tests.engines.test_tensorrt_cache import builds  # noqa: F401 - the TensorRT stand-in fixture

pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("ml_dtypes")

SIZES = {"batch": 2, "height": 16, "width": 16}  # over the profile's opt sizes (tokens, regions, ...)
# Held-out error against the fp16 export on random feeds of the tiny UNet with every feature, as measured:
# INT8 0.03-0.06, FP8 0.10-0.14 (E4M3's 3 mantissa bits: about 29 dB per layer against INT8's 40). The
# bounds leave room for the spread and catch a broken scale (an unscaled FP8 pass measured 0.44).
TOLERANCE = {"int8": 0.1, "fp8": 0.25}
ZERO_POINT_TYPES = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


@pytest.fixture(scope="module")
def masked_set(tiny_export, tmp_path_factory):
    """(fp16 export with every feature, calibration set of 8 random feeds of its UNet, in fp32 as captured)."""
    from vgrt.calibration.capture import model_identity
    from vgrt.calibration.dataset import CapturedRun, open_for_capture
    from vgrt.export.feeds import random_feed
    from vgrt.export.manifest import read_manifest
    from vgrt.models.source import ModelSource

    export = tiny_export(features="all", dtype="fp16")
    spec = read_manifest(export).component("unet").spec
    feeds = [
        {k: v.float() if v.is_floating_point() else v for k, v in random_feed(spec, _sizes(spec), seed=i).items()}
        for i in range(8)
    ]
    inputs = {n: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for n, v in feeds[0].items()}
    directory = tmp_path_factory.mktemp("calibration") / "set"
    with open_for_capture(directory, model_identity(ModelSource("tiny"))) as writer:
        writer.add_run(CapturedRun("random-0", "random", 0, 8, (128, 128), "all", inputs, 8, 8, "", 0, ""), feeds)
    return export, directory


@pytest.fixture(scope="module", params=["int8", "fp8"])
def qdq_export(request, masked_set, tmp_path_factory):
    from vgrt.calibration.tensorrt_qdq import TensorRtQdqSettings, quantize_for_tensorrt

    export, calibration = masked_set
    out = tmp_path_factory.mktemp("tensorrt") / f"unet-{request.param}"
    out, report = quantize_for_tensorrt(export, calibration, out, TensorRtQdqSettings(precision=request.param))
    return request.param, export, out, report


def _sizes(spec):
    return {**spec.profile_sizes("opt"), **SIZES}


def _model(directory):
    return onnx.load(str(directory / "unet.onnx"))


def test_the_qdq_graph_is_in_tensorrts_form_and_leaves_masked_attention_alone(qdq_export):
    precision, export, out, report = qdq_export
    model, source = _model(out), _model(export)
    onnx.checker.check_model(model)
    constants = {t.name: t for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    pairs = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(pairs) > 100
    for node in pairs:  # symmetric: every zero point 0, of the quantised type
        zero = constants[node.input[2]]
        assert zero.data_type == ZERO_POINT_TYPES[precision] and not np.any(numpy_helper.to_array(zero).astype(float))
    dequantized = [n for n in pairs if n.op_type == "DequantizeLinear"]
    assert all(constants.get(n.input[0]) is None or constants[n.input[0]].data_type != TensorProto.INT32
               for n in dequantized)  # biases stay float: TensorRT has no INT32 dequantisation  # fmt: skip
    masked = [n for n in model.graph.node if n.op_type == "MaskedAttention"]
    assert len(masked) == sum(n.op_type == "MaskedAttention" for n in source.graph.node) > 0
    for node in masked:  # fp16 in, fp16 out: the plugin's
        assert not any(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear" for i in node.input)
    quantised = {n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")} - set(report.float_layers)
    assert set(report.layer_sqnr_db) >= quantised and len(quantised) > 50


def test_the_manifest_names_the_precision_tensorrt_and_the_fp16_rest(qdq_export):
    from vgrt.export.manifest import read_manifest

    precision, _, out, report = qdq_export
    manifest = read_manifest(out)
    assert manifest.precision == precision and manifest.data["settings"]["dtype"] == "fp16"
    assert manifest.data["quantization"]["backends"] == ["tensorrt"]
    assert manifest.data["quantization"]["float_layers"] == report.float_layers
    assert any("vgrt::MaskedAttention" in part for part in manifest.data["quantization"]["kept_in_float"])


def test_it_runs_on_onnxruntime_close_to_the_fp16_export(qdq_export):
    from vgrt.calibration.int8 import relative_output_error
    from vgrt.export.feeds import random_feed
    from vgrt.export.manifest import read_manifest

    precision, export, out, report = qdq_export
    spec = read_manifest(export).component("unet").spec
    feed = {name: value.numpy() for name, value in random_feed(spec, _sizes(spec), seed=100).items()}
    error = relative_output_error(export / "unet.onnx", out / "unet.onnx", [feed], exact=True)
    assert 1e-3 < error < TOLERANCE[precision]  # quantised (not the fp16 graph), and close to it
    assert 1e-3 < report.relative_error < TOLERANCE[precision]


def _fake_quantised(value: torch.Tensor, scale: torch.Tensor, precision: str, axis: int = 0) -> torch.Tensor:
    """PyTorch's fake quantisation of `value` (float32) at `scale`, zero point 0."""
    if precision == "fp8":
        return (value / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(value, scale.item(), 0, -128, 127)
    zero = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(value, scale, zero, axis, -128, 127)


def test_a_quantised_conv_computes_what_pytorch_fake_quantisation_computes(qdq_export):
    """The first quantised Conv of the graph on ONNX Runtime against PyTorch: its dequantized input and
    weights are torch's fake quantisation of the float ones at the graph's scales, and its output is
    torch's conv2d of those: the Q/DQ nodes mean what PyTorch's quantisation means."""
    import onnxruntime as ort

    from vgrt.export.feeds import random_feed
    from vgrt.export.manifest import read_manifest

    precision, export, out, _ = qdq_export
    model = _model(out)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and made_by.get(n.input[1]) is not None
                and made_by[n.input[1]].op_type == "DequantizeLinear")  # fmt: skip
    x_dq, w_dq = made_by[conv.input[0]], made_by[conv.input[1]]
    x_name = made_by[x_dq.input[0]].input[0]  # the float tensor the activation Q/DQ pair quantises
    wanted = [x_name, conv.input[0], conv.input[1], conv.output[0]]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    spec = read_manifest(export).component("unet").spec
    feed = {name: value.numpy() for name, value in random_feed(spec, _sizes(spec), seed=7).items()}
    x, x_got, w_got, y_got = (torch.from_numpy(v.astype(np.float32)) for v in session.run(wanted, feed))

    x_scale = torch.from_numpy(constants[x_dq.input[1]].astype(np.float32))
    w_scale = torch.from_numpy(constants[w_dq.input[1]].astype(np.float32))
    if precision == "fp8":  # fp16 weights behind a Q/DQ pair, per tensor
        w = _fake_quantised(torch.from_numpy(constants[made_by[w_dq.input[0]].input[0]].astype(np.float32)), w_scale,
                            precision)  # fmt: skip
    else:  # stored int8, per output channel
        w = torch.from_numpy(constants[w_dq.input[0]].astype(np.float32)) * w_scale.reshape(-1, 1, 1, 1)
    x_fq = _fake_quantised(x, x_scale, precision)
    w_scale = w_scale.reshape(-1, 1, 1, 1) if w_scale.numel() > 1 else w_scale
    for got, expected, scale in ((x_got, x_fq, x_scale), (w_got, w, w_scale)):
        # ONNX Runtime divides in fp16: 0.7% of the values (ties such as 20.5) round to the neighbouring level
        assert (got == expected.half().float()).float().mean() > 0.99
        assert ((got - expected).abs() <= _one_level(expected, scale, precision)).all()
    assert _relative(x_fq, x) > 3e-3  # and the input is quantised (40 dB: 1e-2), not passed through
    bias = torch.from_numpy(constants[conv.input[2]].astype(np.float32)) if len(conv.input) > 2 else None
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    pads = attributes.get("pads", [0, 0, 0, 0])
    assert pads[:2] == pads[2:]  # symmetric padding, as conv2d takes it
    y = torch.nn.functional.conv2d(
        x_fq, w, bias, stride=attributes.get("strides", 1), padding=pads[:2],
        dilation=attributes.get("dilations", 1), groups=attributes.get("group", 1),
    )  # fmt: skip
    assert _relative(y_got, y) < 1.5e-2  # those levels and fp16 arithmetic: 2.7e-3 (int8), 8e-3 (fp8) measured


def _one_level(value: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """The distance from `value` to the next quantisation level, plus fp16's rounding of the level."""
    fp16_rounding = value.abs() * 2**-10
    if precision == "fp8":  # E4M3: 3 mantissa bits, subnormals below 2^-6 spaced 2^-9 (times the scale)
        return 1.01 * torch.maximum(value.abs() / 8, scale * 2**-9) + fp16_rounding
    return 1.01 * scale + fp16_rounding


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def test_fp8_needs_opset_19_and_q_dq_pairs_on_weights(qdq_export):
    from vgrt.calibration.tensorrt_qdq import to_fp8
    from vgrt.errors import InvalidInputError

    precision, _, out, _ = qdq_export
    model = _model(out)
    if precision == "int8":  # stored int8 weights cannot be rescaled into FP8
        with pytest.raises(InvalidInputError, match="dequantizes weights stored as int8, which FP8 cannot take"):
            to_fp8(model)
        return
    model.opset_import[0].version = 18
    with pytest.raises(InvalidInputError, match="FP8 Q/DQ needs opset >= 19; the model has opset 18"):
        to_fp8(model)


def test_an_fp32_export_is_refused_before_calibrating(synthetic_set, tmp_path):
    from vgrt.calibration.tensorrt_qdq import TensorRtQdqSettings, quantize_for_tensorrt
    from vgrt.errors import InvalidInputError

    export, calibration = synthetic_set
    with pytest.raises(InvalidInputError, match="is an fp32 export; TensorRT fp8 is calibrated from an fp16 export"):
        quantize_for_tensorrt(export, calibration, tmp_path / "out", TensorRtQdqSettings(precision="fp8"))
    assert not (tmp_path / "out").exists()


# --- vgrt build --precision int8|fp8, up to the TensorRT library call -------------------------------------


@pytest.fixture
def built_copy(qdq_export, tmp_path):
    precision, _, out, _ = qdq_export
    return precision, shutil.copytree(out, tmp_path / "export")


def test_build_hands_the_qdq_graph_in_plugin_form_to_tensorrt(built_copy, builds):  # noqa: F811
    from vgrt.engines.tensorrt.build import build_engine
    from vgrt.plugins.masked_attention.trt_plugin import MASKED_ATTENTION

    precision, directory = built_copy
    path = build_engine(directory, precision=precision)
    (onnx_path,) = builds.made
    assert onnx_path == directory / "unet.trt-plugin-aot.onnx" and path.parent == directory / "tensorrt"
    built, source = onnx.load(str(onnx_path)).graph.node, _model(directory).graph.node
    plugins = [n for n in built if n.op_type == MASKED_ATTENTION.name]
    assert len(plugins) == sum(n.op_type == "MaskedAttention" for n in source) > 0
    assert all({a.name for a in n.attribute} == set(MASKED_ATTENTION.node_attributes(True)) for n in plugins)
    for op in ("QuantizeLinear", "DequantizeLinear"):  # every Q/DQ node goes to TensorRT
        assert sum(n.op_type == op for n in built) == sum(n.op_type == op for n in source) > 0
    assert builds.registered == [MASKED_ATTENTION.plugin_id]


def test_build_precision_must_be_the_exports(built_copy, builds, capsys):  # noqa: F811
    from vgrt.cli import main

    precision, directory = built_copy
    other = "fp8" if precision == "int8" else "int8"
    assert main(["build", str(directory), "--precision", other]) == 2
    err = capsys.readouterr().err
    assert f"--precision {other}: '{directory}' is an {precision} export, and TensorRT builds" in err
    assert f"vgrt calibrate METHOD --target tensorrt --precision {other}" in err
    assert main(["build", str(directory), "--precision", "fp16"]) == 2
    assert "export one with `vgrt export --precision fp16`" in capsys.readouterr().err
    assert builds.made == []


def test_a_cpu_int8_export_is_not_handed_to_tensorrt(built_copy, builds):  # noqa: F811
    from vgrt.engines.tensorrt.build import build_engine
    from vgrt.errors import InvalidInputError

    _, directory = built_copy
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["quantization"]["backends"] = ["onnxruntime", "openvino"]  # what a --target cpu export says
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match="export that onnxruntime, openvino open, not tensorrt"):
        build_engine(directory)
    assert builds.made == []
