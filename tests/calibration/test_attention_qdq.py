"""INT8 attention (vgrt.calibration.attention_qdq): the attentions without a mask in Q/DQ form pass the ONNX
checker, run on both CPU backends (OpenVINO in int8), agree with fp32; masked attentions stay as they were."""

import collections

import numpy as np
import pytest

from tests.calibration.conftest import SIZES

pytest.importorskip("onnxruntime.quantization")

# Measured on held-out random feeds of the tiny LocRef UNet: the attention Q/DQ alone 0.001 (with the
# probabilities' scale fixed at 1/255 instead of their measured maximum: 0.017); the whole INT8 UNet 0.05 with
# or without it on ONNX Runtime and OpenVINO. The bounds leave room for spread and catch a broken pass.
ATTENTION_ONLY_TOLERANCE = 0.01
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def int8_attention_export(masked_set, tmp_path_factory):
    """(fp32 export, INT8 export with int8 attention, its QuantisationReport) of the tiny LocRef UNet."""
    from vgrt.calibration.int8 import Int8Settings, quantize_export

    export, calibration = masked_set
    out = tmp_path_factory.mktemp("int8-attention") / "unet-int8"
    out, report = quantize_export(export, calibration, out, Int8Settings(int8_attention=True))
    return export, out, report


def _held_out_feed(export, seed=100):
    from vgrt.export.feeds import random_feed
    from vgrt.export.manifest import read_manifest

    spec = read_manifest(export).component("unet").spec
    return {
        name: value.numpy() for name, value in random_feed(spec, {**spec.profile_sizes("opt"), **SIZES}, seed).items()
    }


def _ops(path):
    import onnx

    return collections.Counter((node.domain, node.op_type) for node in onnx.load(str(path)).graph.node)


def test_every_plain_attention_is_rewritten_and_masked_ones_are_untouched(int8_attention_export):
    import onnx

    from vgrt.plugins.masked_attention.identity import NODE_DOMAIN, NODE_TYPE

    export, out, report = int8_attention_export
    before, after = onnx.load(str(export / "unet.onnx")), onnx.load(str(out / "unet.onnx"))
    onnx.checker.check_model(after)
    plain = [n.name for n in before.graph.node if n.op_type == "Attention"]
    masked = [n for n in before.graph.node if (n.domain, n.op_type) == (NODE_DOMAIN, NODE_TYPE)]
    assert plain and masked  # the LocRef UNet has both
    assert sorted(report.attention_ranges) == sorted(plain)
    assert _ops(out / "unet.onnx")[("", "Attention")] == 0
    assert [n for n in after.graph.node if (n.domain, n.op_type) == (NODE_DOMAIN, NODE_TYPE)] == masked
    dequantized = {o for n in after.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for name in plain:
        products = [n for n in after.graph.node if n.name in (f"{name}/qk", f"{name}/pv")]
        assert len(products) == 2 and all(set(n.input) <= dequantized for n in products)  # q, k, v, p quantised


def test_ranges_are_the_largest_values_seen(int8_attention_export):
    _, _, report = int8_attention_export
    for ranges in report.attention_ranges.values():
        assert 0 < ranges.p <= 1  # softmax probabilities
        assert ranges.q > 0 and ranges.k > 0 and ranges.v > 0
        assert ranges.scales()["p"] == pytest.approx(ranges.p / 255)


@pytest.mark.parametrize("backend,settings", [("onnxruntime", {}), ("openvino", {"threads": 1})])
def test_int8_attention_export_agrees_with_fp32_on_both_backends(int8_attention_export, backend, settings):
    import torch

    from vgrt.engines import open_runner

    if backend == "openvino":
        pytest.importorskip("openvino")
    export, out, report = int8_attention_export
    feed = {name: torch.from_numpy(value) for name, value in _held_out_feed(export).items()}
    with open_runner(export) as reference, open_runner(out, backend=backend, **settings) as quantised:
        name = reference.spec.outputs[0].name
        expected, got = reference.infer(feed)[name], quantised.infer(feed)[name]
    error = ((got - expected).norm() / expected.norm()).item()
    assert 1e-4 < error < TOLERANCE
    assert 0 < report.relative_error < TOLERANCE


def test_the_attention_qdq_alone_stays_within_its_tolerance(masked_set, tmp_path):
    import shutil

    from vgrt.calibration.attention_qdq import measure_ranges, quantise_attention
    from vgrt.calibration.int8 import relative_output_error

    export, _ = masked_set
    calibration = [_held_out_feed(export, seed) for seed in range(4)]
    model = shutil.copy(export / "unet.onnx", tmp_path / "unet.onnx")
    rewritten = quantise_attention(model, measure_ranges(export / "unet.onnx", calibration))
    assert rewritten
    error = relative_output_error(export / "unet.onnx", model, [_held_out_feed(export, 100 + i) for i in range(2)])
    assert 1e-5 < error < ATTENTION_ONLY_TOLERANCE  # quantised, and within INT8's error


def test_openvino_runs_both_attention_products_in_int8(int8_attention_export, tmp_path):
    ov = pytest.importorskip("openvino")
    from vgrt.engines.openvino_runner import prepare_model

    export, out, report = int8_attention_export
    feed = _held_out_feed(export)
    model = ov.Core().read_model(str(prepare_model(out / "unet.onnx", {}, tmp_path)))
    model.reshape({name: list(value.shape) for name, value in feed.items()})
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    kernels = {}  # original node name -> the precision of the kernel that ran it
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        for name in info["originalLayersNames"].astype(str).split(","):
            kernels[name] = info["runtimePrecision"].astype(str)
    for name in report.attention_ranges:
        assert kernels[f"{name}/qk"] in ("i8", "u8") and kernels[f"{name}/pv"] in ("i8", "u8"), name


def test_the_option_reaches_the_manifest(int8_attention_export, masked_set, tmp_path):
    from vgrt.calibration.int8 import Int8Settings, quantize_export
    from vgrt.export.manifest import read_manifest

    _, out, report = int8_attention_export
    quantization = read_manifest(out).data["quantization"]
    assert not any(part.startswith("attention") for part in quantization["kept_in_float"])
    assert any(part.startswith("masked attention") for part in quantization["kept_in_float"])
    assert set(quantization["int8_attention"]["ranges"]) == set(report.attention_ranges)
    off, _ = quantize_export(*masked_set, tmp_path / "off", Int8Settings(int8_attention=False))
    quantization = read_manifest(off).data["quantization"]
    assert quantization["int8_attention"] is None
    assert any(part.startswith("attention (opset-23 Attention") for part in quantization["kept_in_float"])
    assert _ops(off / "unet.onnx")[("", "Attention")] > 0


def test_a_model_without_plain_attention_is_left_alone(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from vgrt.calibration.attention_qdq import measure_ranges, quantise_attention

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    causal = helper.make_node("Attention", ["x", "x", "x"], ["y"], name="causal", is_causal=1)
    path = tmp_path / "causal.onnx"
    onnx.save(
        helper.make_model(helper.make_graph([causal], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 23)]), path
    )
    assert measure_ranges(path, [{"x": np.ones((1, 1, 2, 2), np.float32)}]) == {}
    assert quantise_attention(path, {}) == []
    assert _ops(path) == {("", "Attention"): 1}
