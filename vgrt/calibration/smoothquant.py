"""SmoothQuant (Xiao et al. 2023) for the layers that INT8 would otherwise leave in float.

A layer's activation with a few large input channels (SD's feed-forward output projections after GEGLU,
the shortcut convolutions of a concatenated skip) gets a coarse per-tensor INT8 scale. Dividing input
channel j of the activation by s_j and multiplying the weight's input channel j by s_j leaves the product
unchanged and moves the spread into the weight, whose scale is per output channel:
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha). The division is a Mul by a constant inserted before the layer
(both CPU backends fuse it into the elementwise op that makes the activation, OpenVINO into the quantise).

The best alpha differs by layer: too high and the weight's input channels spread instead, or new feeds
exceed the channel maxima the scales were fitted on. Each layer takes the alpha of `alphas` under which its
simulated INT8 (the scheme of vgrt.calibration.int8), fitted on half of the feeds, has the highest output
SQNR on the other half. Smoothed layers are judged by their output SQNR (vgrt.calibration.sensitivity): the
input form, the inputs' relative noise added up, understates a product whose weight rows were rescaled. Output SQNR of SD 1.5's 20 layers below 30 dB after
min/max INT8 (random weights, LocRef feeds; lowest of the 16 feed-forward projections / of the 4 convs):
    min/max 25.4 / 30.6 dB; alpha 0.5: 29.9 / 35.6; alpha 0.65: 31.1 / 36.2; alpha 0.8: 32.2 / 36.7 dB;
    clipping at the best percentile instead of smoothing: 28.9 / 32.4 dB.
On tiny (random feeds) 0.5 lifts all 5 low projections above 30 dB and 0.8 only 2 of them: one alpha
does not fit every model, hence the search (demoDiffusion fixes 0.8 for SD).
Those SD 1.5 figures are on the feeds the scales were fitted on. On held-out feeds (other timesteps, whose
channel maxima differ) `vgrt calibrate` measured the 16 projections at 26.0-29.2 dB smoothed (25.4-28.0
unsmoothed), so they stay in float, and the 4 convolutions at 30.3-31.7 dB, which are now quantised.
Random weights lack the outlier channels of trained ones that SmoothQuant targets: measure on real weights.
"""

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vgrt._lazy import require
from vgrt.calibration.sensitivity import float_values
from vgrt.export.blobs import external_files

ALPHAS = (0.5, 0.6, 0.7, 0.8)  # the strengths searched when smoothing is asked for
SMALLEST_SCALE = 1e-5  # a channel that is all zeros in every feed keeps scale 1; none is scaled below this


def activation_axis(node) -> int | None:
    """The input-channel axis of `node`'s activation (input 0), or None where the layer cannot be smoothed
    (a grouped convolution, a transposed Gemm activation)."""
    attributes = {a.name: a for a in node.attribute}
    if node.op_type == "MatMul":
        return -1
    if node.op_type == "Conv" and ("group" not in attributes or attributes["group"].i == 1):
        return 1
    if node.op_type == "Gemm" and ("transA" not in attributes or attributes["transA"].i == 0):
        return 1
    return None


def weight_axis(node) -> int:
    """The input-channel axis of `node`'s weight (input 1)."""
    if node.op_type == "Conv":
        return 1  # [out, in, kh, kw]
    transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    return 1 if node.op_type == "Gemm" and transposed else 0  # MatMul and Gemm: [in, out]; transB: [out, in]


def smoothing_scales(activation_absmax: np.ndarray, weight: np.ndarray, axis: int, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j (`axis` of `weight`)."""
    other = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
    weight_absmax = np.abs(weight).max(axis=other).astype(np.float64)
    scales = activation_absmax.astype(np.float64) ** alpha / np.maximum(weight_absmax, 1e-12) ** (1 - alpha)
    scales[activation_absmax == 0] = 1.0
    return np.maximum(scales, SMALLEST_SCALE)


def channel_absmax(values: list[np.ndarray], axis: int) -> np.ndarray:
    """max |x| per channel (`axis`) over every value of an activation."""
    absmax = None
    for value in values:
        other = tuple(i for i in range(value.ndim) if i != axis % value.ndim)
        current = np.abs(value).max(axis=other)
        absmax = current if absmax is None else np.maximum(absmax, current)
    return absmax


def simulated_sqnr_db(
    fit: list[np.ndarray], check: list[np.ndarray], act_axis: int, weight: np.ndarray, axis: int, scales: np.ndarray
) -> float:
    """Output SQNR (dB) of a layer whose activation channels are divided by `scales` and weight input
    channels (`axis`) multiplied by them, under vgrt's CPU INT8: u8 asymmetric per-tensor min/max
    activations (the range of the `fit` values), s8 symmetric weights per output channel; measured on the
    `check` values, as vgrt.calibration.sensitivity measures smoothed layers. A convolution is read as the
    product over its input channels that a 1x1 one is (exact for those, the smoothed convs of SD)."""
    weight_shape = [1] * weight.ndim
    weight_shape[axis] = scales.size
    smoothed = weight.astype(np.float64) * scales.reshape(weight_shape)
    out_axis = 0 if weight.ndim > 2 or axis == 1 else 1  # Conv [out, in, ...]; [in, out]; transposed [out, in]
    other = tuple(i for i in range(weight.ndim) if i != out_axis)
    step = np.maximum(np.abs(smoothed).max(axis=other, keepdims=True), 1e-30) / 127
    rounded = np.clip(np.round(smoothed / step), -127, 127) * step
    matrix, matrix_q = (_as_matrix(w, axis) for w in (smoothed, rounded))  # [in, out]
    rows = [np.moveaxis(v, act_axis, -1).reshape(-1, scales.size).astype(np.float64) / scales for v in fit + check]
    low, high = min(min(r.min() for r in rows[: len(fit)]), 0.0), max(max(r.max() for r in rows[: len(fit)]), 0.0)
    step, zero = max(high - low, 1e-30) / 255, np.round(-low / max(high - low, 1e-30) * 255)
    noise = 0.0
    for row in rows[len(fit) :]:
        expected = row @ matrix
        got = ((np.clip(np.round(row / step) + zero, 0, 255) - zero) * step) @ matrix_q
        noise += _relative_noise(expected, got) / len(check)
    return float("inf") if noise == 0 else float(-10 * np.log10(noise))


def _as_matrix(weight: np.ndarray, axis: int) -> np.ndarray:
    """A weight as [in, out], its kernel positions summed (a 1x1 convolution's exact matrix)."""
    if weight.ndim > 2:
        weight = weight.sum(axis=tuple(range(2, weight.ndim)))  # [out, in]
    return weight.T if axis == 1 else weight


def _relative_noise(value: np.ndarray, approx: np.ndarray) -> float:
    return float(np.sum((approx - value) ** 2) / max(float(np.sum(value**2)), 1e-30))


def smoothable(model, layers: list[str]) -> dict[str, object]:
    """{name: node} of `layers` that can be smoothed: a known activation axis and a weight initializer."""
    initializers = {t.name for t in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node if node.name in set(layers)}
    return {
        name: node
        for name, node in nodes.items()
        if activation_axis(node) is not None and len(node.input) > 1 and node.input[1] in initializers
    }


@contextmanager
def smoothed_model(
    source: Path, layers: list[str], feeds: list[dict[str, np.ndarray]], alphas: tuple[float, ...] = ALPHAS
) -> Iterator[tuple[Path, dict[str, float]]]:
    """(a copy of the float model `source` with `layers` smoothed, {layer smoothed: its alpha}). Activations
    come from running `source` over `feeds`; each layer takes the alpha of `alphas` with the best SQNR. A model with external weights is written
    beside `source` (which must then be a private copy, vgrt.export.blobs.private_copy: its weights are
    read from there) and removed after; the smoothed weights are stored inside it."""
    onnx = require("onnx")
    model = onnx.load(str(source), load_external_data=False)
    nodes = smoothable(model, layers)
    values = float_values(source, {node.input[0] for node in nodes.values()}, feeds) if nodes else {}
    weights = {t.name: t for t in model.graph.initializer if t.name in {n.input[1] for n in nodes.values()}}
    chosen = {}
    for name, node in nodes.items():
        activation, weight_proto = values.pop(node.input[0]), weights[node.input[1]]
        chosen[name] = _smooth(model, node, activation, weight_proto, source.parent, alphas)
    _drop_unused(model, set(weights))
    with _written(model, source) as path:
        yield path, chosen


def _smooth(model, node, activation: list[np.ndarray], weight_proto, base_dir: Path, alphas) -> float:
    """Insert Mul(activation, 1 / s) before `node` and give it a weight scaled by s along its input channels,
    with s of the alpha of `alphas` that simulates best; returns that alpha."""
    from onnx import helper, numpy_helper

    weight = numpy_helper.to_array(weight_proto, base_dir=str(base_dir))
    axis, act_axis = weight_axis(node), activation_axis(node)
    alpha = _best_alpha(activation, act_axis, weight, axis, alphas)
    scales = smoothing_scales(channel_absmax(activation, act_axis), weight, axis, alpha)
    shape = [1] * weight.ndim
    shape[axis] = scales.size
    smoothed_weight = (weight * scales.reshape(shape)).astype(weight.dtype)
    # [1, C, 1, 1] for a Conv's activation, [C] (the last axis) for MatMul and Gemm
    inverse_shape = [1, scales.size] + [1] * (weight.ndim - 2) if node.op_type == "Conv" else [scales.size]
    inverse = (1.0 / scales).astype(weight.dtype).reshape(inverse_shape)
    prefix = f"{node.name}_smoothquant"
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(smoothed_weight, f"{prefix}_weight"),
            numpy_helper.from_array(inverse, f"{prefix}_inverse"),
        ]
    )
    mul = helper.make_node("Mul", [node.input[0], f"{prefix}_inverse"], [f"{prefix}_input"], f"{prefix}_mul")
    position = list(model.graph.node).index(node)
    node.input[0], node.input[1] = f"{prefix}_input", f"{prefix}_weight"
    model.graph.node.insert(position, mul)
    return alpha


def _best_alpha(activation: list[np.ndarray], act_axis: int, weight: np.ndarray, axis: int, alphas) -> float:
    """The alpha of `alphas` whose scales, fitted on half of the feeds, simulate best on the other half (fitted
    and checked on the same feeds, a high alpha fits their channel maxima and clips new feeds: on tiny 34 dB
    simulated on its own feeds, 29 dB on held-out ones)."""
    fit, check = (activation[::2], activation[1::2]) if len(activation) > 1 else (activation, activation)
    absmax = channel_absmax(fit, act_axis)
    return max(
        alphas,
        key=lambda alpha: simulated_sqnr_db(
            fit, check, act_axis, weight, axis, smoothing_scales(absmax, weight, axis, alpha)
        ),
    )


def _drop_unused(model, names: set[str]) -> None:
    """Remove the initializers of `names` that no node reads any more (weights every reader of which was smoothed)."""
    read = {name for node in model.graph.node for name in node.input}
    unused = [t for t in model.graph.initializer if t.name in names and t.name not in read]
    for tensor in unused:
        model.graph.initializer.remove(tensor)


@contextmanager
def _written(model, source: Path) -> Iterator[Path]:
    onnx = require("onnx")
    if external_files(source):  # its external weights are read relative to its folder
        path = source.with_name(f".smoothed-{source.name}")
        try:
            onnx.save(model, str(path))
            yield path
        finally:
            path.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="vgrt-smoothquant-") as scratch:
        path = Path(scratch) / source.name
        onnx.save(model, str(path))
        yield path
