"""Per-layer sensitivity of a Q/DQ model: each quantised layer's signal-to-quantisation-noise ratio.

One pass of the float model over held-out feeds gives every quantised layer's float inputs; each input is
then quantised with the scale and zero point the Q/DQ model chose for it (weights: their stored int8
values), and the layer's SQNR is that of its inputs together: noise powers relative to signal add up
through a product, so SQNR = -10 log10(sum over inputs of 10^(-SQNR_i / 10)). This is the noise each
layer adds by itself, not the noise it inherits from earlier layers, so a layer's figure does not depend
on which other layers were quantised, and one pass ranks them all.
"""

import math
from pathlib import Path

import numpy as np

from vgrt._lazy import require
from vgrt.export.blobs import external_files

QUANTISED_OPS = ("Conv", "MatMul", "Gemm")  # those vgrt.calibration.int8 quantises; other readers of a
# dequantized tensor (Shape, the GroupNorm decomposition) compute nothing quantised themselves
BIAS_INPUT = 2  # Conv and Gemm: the bias is int32 at the product's scale; its rounding is negligible


def layer_sqnr_db(
    reference: Path, quantised: Path, feeds: list[dict[str, np.ndarray]], by_output: frozenset[str] = frozenset()
) -> dict[str, float]:
    """{quantised node name: SQNR in dB} over `feeds`, for every node of `quantised` whose inputs are
    dequantized; `reference` is the float model it was quantised from (same node and tensor names). The
    layers of `by_output` are measured on their output instead (`_output_sqnr`)."""
    onnx = require("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(quantised))
    made_by = {output: node for node in model.graph.node for output in node.output}
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = {}  # node name -> [(float tensor name or None, dequantized weight or None, scale, zero point, axis)]
    nodes = {node.name: node for node in model.graph.node if node.name in by_output}
    for node in model.graph.node:
        inputs = []
        for index, name in enumerate(node.input):
            dq = made_by.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or index == BIAS_INPUT:
                continue
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            scale, zero = constants[dq.input[1]], constants[dq.input[2]]
            q = made_by.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                inputs.append((q.input[0], None, scale, zero, axis))
            elif dq.input[0] in constants:
                inputs.append((dq.input[0].removesuffix("_quantized"), constants[dq.input[0]], scale, zero, axis))
        if inputs and node.op_type in QUANTISED_OPS:
            layers[node.name] = inputs
    floats = float_values(reference, {name for ins in layers.values() for name, *_ in ins}, feeds)
    return {
        name: _output_sqnr(nodes[name], inputs, floats) if name in nodes else _combined_sqnr(inputs, floats)
        for name, inputs in layers.items()
    }


def float_values(reference: Path, names: set[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """The float model's values of `names` (activations per feed, weights once) over `feeds`."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    from onnx import numpy_helper

    model = onnx.load(str(reference))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
    inputs = {i.name for i in model.graph.input}
    activations = sorted(names - set(weights) - inputs)
    del model  # the probe below keeps the weights where they are
    probe = onnx.load(str(reference), load_external_data=False)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in activations if name not in outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
    session = probe_session(probe, reference, options)
    values = {name: [w] for name, w in weights.items()}
    for feed in feeds:
        for name, value in zip(activations, session.run(activations, feed)):
            values.setdefault(name, []).append(value)
        for name in inputs & names:
            values.setdefault(name, []).append(feed[name])
    return values


def _combined_sqnr(inputs: list[tuple], floats: dict[str, list[np.ndarray]]) -> float:
    relative_noise = 0.0
    for name, stored, scale, zero, axis in inputs:
        for value in floats[name]:
            value = value.astype(np.float64)
            approx = (
                _dequantize(stored, scale, zero, axis) if stored is not None else _fake_quant(value, scale, zero, axis)
            )
            signal = float(np.sum(value**2))
            relative_noise += float(np.sum((approx - value) ** 2)) / max(signal, 1e-30) / len(floats[name])
    return math.inf if relative_noise == 0 else -10 * math.log10(relative_noise)


def _output_sqnr(node, inputs: list[tuple], floats: dict[str, list[np.ndarray]]) -> float:
    """SQNR of the layer's product, quantised inputs against float ones. The input form adds the inputs'
    relative noise, which is the product's only where the weight's input channels have like norms (as
    unsmoothed random weights do: both forms read 25.4 dB on SD 1.5's worst feed-forward projection); a
    smoothed layer's weight is not, and there the input form understates it (28.6 dB for 32.2 dB)."""
    if len(inputs) != 2 or inputs[1][1] is None or not _computable(node):
        return _combined_sqnr(inputs, floats)
    (x_name, _, x_scale, x_zero, x_axis), (w_name, stored, w_scale, w_zero, w_axis) = inputs
    weight, weight_q = floats[w_name][0].astype(np.float64), _dequantize(stored, w_scale, w_zero, w_axis)
    relative_noise = 0.0
    for value in floats[x_name]:
        value = value.astype(np.float64)
        expected = _product(node, value, weight)
        got = _product(node, _fake_quant(value, x_scale, x_zero, x_axis), weight_q)
        relative_noise += float(np.sum((got - expected) ** 2)) / max(float(np.sum(expected**2)), 1e-30)
    relative_noise /= len(floats[x_name])
    return math.inf if relative_noise == 0 else -10 * math.log10(relative_noise)


def _computable(node) -> bool:
    """Whether `_product` computes `node`: MatMul, Gemm, and 1-D or 2-D Conv with symmetric explicit pads."""
    if node.op_type != "Conv":
        return True
    attributes = {a.name: require("onnx").helper.get_attribute_value(a) for a in node.attribute}
    pads = list(attributes.get("pads", []))
    symmetric = pads[: len(pads) // 2] == pads[len(pads) // 2 :]
    return symmetric and attributes.get("auto_pad", b"NOTSET") == b"NOTSET" and len(pads) in (0, 2, 4)


def _product(node, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The bias-free product of a MatMul, Gemm or Conv node (what its quantised inputs feed)."""
    attributes = {a.name: require("onnx").helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return np.matmul(x, w)
    if node.op_type == "Gemm":
        return np.matmul(x.T if attributes.get("transA") else x, w.T if attributes.get("transB") else w)
    import torch

    pads = list(attributes.get("pads", [0] * (2 * (w.ndim - 2))))
    half = len(pads) // 2
    convolve = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d}[w.ndim]
    out = convolve(
        torch.from_numpy(x), torch.from_numpy(w), stride=attributes.get("strides", 1),
        padding=pads[:half] or 0, dilation=attributes.get("dilations", 1), groups=attributes.get("group", 1),
    )  # fmt: skip
    return out.numpy()


def _per_axis(array: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-tensor (scalar) or per-channel (1-D along `axis`) parameter, shaped to broadcast."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 0:
        return array
    shape = [1] * ndim
    shape[axis % ndim] = array.size
    return array.reshape(shape)


def _dequantize(stored: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    return (stored.astype(np.float64) - _per_axis(zero, stored.ndim, axis)) * _per_axis(scale, stored.ndim, axis)


def _fake_quant(value: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    s, z = _per_axis(scale, value.ndim, axis), _per_axis(zero, value.ndim, axis)
    kind = np.asarray(zero).dtype
    if kind.kind in "iu":
        info = np.iinfo(kind)
        return (np.clip(np.round(value / s) + z, info.min, info.max) - z) * s
    # FLOAT8E4M3FN (zero point 0): QuantizeLinear saturates to the largest finite value, then rounds to fp8
    ml_dtypes = require("ml_dtypes")
    limit = float(ml_dtypes.finfo(kind).max)
    return np.clip(value / s, -limit, limit).astype(kind).astype(np.float64) * s


def probe_session(probe, reference: Path, options):
    """An ONNX Runtime session of `probe`, a graph of `reference` with more outputs. With weights in files
    (a large model: protobuf holds 2 GB) the probe is saved beside `reference`, which must then be a private
    copy (vgrt.export.blobs.private_copy), and removed once the session holds the weights."""
    ort = require("onnxruntime")
    if not external_files(reference):
        return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    path = reference.with_name(f".probe-{reference.name}")
    require("onnx").save(probe, str(path))
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    finally:
        path.unlink()
