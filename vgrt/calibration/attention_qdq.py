"""INT8 attention for the CPU INT8 UNet: each attention without a mask, in Q/DQ form.

ONNX Runtime's quantiser leaves the opset-23 `Attention` op in float, and on SD 1.5 (LocRef, b2 64x64,
OpenVINO, 2 threads) that float attention was 39% of the INT8 UNet's time. This pass rewrites every
`Attention` node without a mask, causal flag or softcap (the plain self- and cross-attentions) as

    MatMul(DQ(Q(q)), DQ(Q(k^T))) [* scale] -> Softmax -> DQ(Q(p)) -> MatMul(., DQ(Q(v)))

q, k and v int8 symmetric per tensor (scale: the largest |value| over the calibration feeds / 127); the
softmax probabilities p uint8 with zero point 0 (scale: their largest value / 255). OpenVINO reads each
Q/DQ pair as a FakeQuantize and runs both products in int8; ONNX Runtime runs the graph as written.
The scale multiplies the float scores, so q's range does not depend on it. `vgrt::MaskedAttention`
nodes (region and key masks) are not `Attention` nodes: they stay in float, softmax and masking included.

The ranges come from a float pass of the source model with the same decomposition and a ReduceMin/Max of
each of q, k, v and p as extra outputs (`measure_ranges`), so no feed's full tensors are kept.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vgrt._lazy import require
from vgrt.calibration.sensitivity import probe_session

INT8_MAX = 127.0
UINT8_MAX = 255.0
OPERANDS = ("q", "k", "v", "p")  # the attention's inputs and its softmax probabilities


@dataclass(frozen=True)
class AttentionRanges:
    """The largest |value| of one attention's q, k, v and softmax probabilities p over the calibration feeds."""

    q: float
    k: float
    v: float
    p: float

    def scales(self) -> dict[str, float]:
        """Each operand's quantisation scale: int8 symmetric for q, k, v; uint8 from 0 for p."""
        scales = {name: getattr(self, name) / (UINT8_MAX if name == "p" else INT8_MAX) for name in OPERANDS}
        return {name: scale if scale > 0 else 1.0 for name, scale in scales.items()}  # an all-zero tensor: any


def plain_attentions(model) -> list:
    """The `Attention` nodes of `model` without a mask, causal flag, softcap or extra outputs, on 4-D q, k, v."""
    return [node for node in model.graph.node if _is_plain(node)]


def _is_plain(node) -> bool:
    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
        return False
    attributes = {a.name: require("onnx").helper.get_attribute_value(a) for a in node.attribute}
    return (
        len(node.input) >= 3
        and not any(node.input[3:])  # attn_mask, past key and value, nonpad lengths
        and not any(node.output[1:])  # present key and value, qk output
        and attributes.get("is_causal", 0) == 0
        and attributes.get("softcap", 0.0) == 0.0
        and "q_num_heads" not in attributes  # 3-D inputs: heads packed in the hidden axis
    )


def quantise_attention(path: Path, ranges: dict[str, AttentionRanges]) -> list[str]:
    """Rewrite the ONNX file `path` in place: the plain attentions named in `ranges` in Q/DQ form (module
    docstring); its weights, in the file or beside it, are left as they are. Returns the rewritten nodes."""
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    rewritten = decompose(model, ranges)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # by path: the checker finds the weights beside it
    return rewritten


def decompose(model, ranges: dict[str, AttentionRanges] | None = None) -> list[str]:
    """Replace, in `model`, each plain attention by MatMul/Softmax/MatMul: in Q/DQ form with `ranges` (only
    those it names), in float without. Returns the names of the nodes replaced."""
    nodes, done = [], []
    for node in model.graph.node:
        if _is_plain(node) and (ranges is None or node.name in ranges):
            scales = ranges[node.name].scales() if ranges is not None else None
            nodes.extend(_decomposed(node, scales, model.graph.initializer))
            done.append(node.name)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def operand_names(node) -> dict[str, str]:
    """The float tensors of the decomposed attention `node` that its Q/DQ pairs read: q, k transposed, v, p."""
    q, _, v = node.input[:3]
    return {"q": q, "k": f"{node.name}/k_t", "v": v, "p": f"{node.name}/p"}


def _decomposed(node, scales: dict[str, float] | None, initializers) -> list:
    """The nodes computing `node` (a plain Attention) in standard ops, each operand behind a Q/DQ pair when
    `scales` are given; new tensors and nodes are named after `node`."""
    helper = require("onnx").helper
    prefix, operands = node.name, operand_names(node)
    nodes = [helper.make_node("Transpose", [node.input[1]], [operands["k"]], name=f"{prefix}/k_t", perm=[0, 1, 3, 2])]
    if scales is not None:
        for name in ("q", "k", "v"):
            operands[name] = _qdq(nodes, initializers, operands[name], f"{prefix}/{name}", scales[name], np.int8)
    nodes.append(helper.make_node("MatMul", [operands["q"], operands["k"]], [f"{prefix}/qk"], name=f"{prefix}/qk"))
    scores = _scaled(nodes, initializers, node, f"{prefix}/qk")
    nodes.append(helper.make_node("Softmax", [scores], [operands["p"]], name=f"{prefix}/softmax", axis=-1))
    if scales is not None:
        operands["p"] = _qdq(nodes, initializers, operands["p"], operands["p"], scales["p"], np.uint8)
    nodes.append(helper.make_node("MatMul", [operands["p"], operands["v"]], [node.output[0]], name=f"{prefix}/pv"))
    return nodes


def _scaled(nodes: list, initializers, node, scores: str) -> str:
    """`scores` times the node's scale: its `scale` attribute (nothing to do at 1), else 1/sqrt(head size)."""
    onnx = require("onnx")
    helper = onnx.helper
    prefix = node.name
    scale = next((a.f for a in node.attribute if a.name == "scale"), None)
    if scale == 1.0:
        return scores
    if scale is not None:
        initializers.append(onnx.numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}/scale"))
    else:  # the Attention default, from q's last axis
        nodes += [
            helper.make_node("Shape", [node.input[0]], [f"{prefix}/head_size"], start=-1),
            helper.make_node("Cast", [f"{prefix}/head_size"], [f"{prefix}/head_size_f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Sqrt", [f"{prefix}/head_size_f"], [f"{prefix}/sqrt_head_size"]),
            helper.make_node("Reciprocal", [f"{prefix}/sqrt_head_size"], [f"{prefix}/scale"]),
        ]
    nodes.append(helper.make_node("Mul", [scores, f"{prefix}/scale"], [f"{prefix}/scores"], name=f"{prefix}/scale"))
    return f"{prefix}/scores"


def _qdq(nodes: list, initializers, tensor: str, prefix: str, scale: float, dtype) -> str:
    """Append a QuantizeLinear/DequantizeLinear pair on `tensor` (per tensor, zero point 0, `dtype`), its
    nodes and parameters named from `prefix`; returns the dequantized tensor."""
    onnx = require("onnx")
    initializers.extend(
        [
            onnx.numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}/qdq_scale"),
            onnx.numpy_helper.from_array(np.array(0, dtype), f"{prefix}/qdq_zero_point"),
        ]
    )
    parameters = [f"{prefix}/qdq_scale", f"{prefix}/qdq_zero_point"]
    quantized, dequantized = f"{prefix}/quantized", f"{prefix}/dequantized"
    nodes += [
        onnx.helper.make_node("QuantizeLinear", [tensor, *parameters], [quantized], name=quantized),
        onnx.helper.make_node("DequantizeLinear", [quantized, *parameters], [dequantized], name=dequantized),
    ]
    return dequantized


def measure_ranges(source: Path, feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, AttentionRanges]:
    """{attention node name: its ranges} over `feeds`, for every plain attention of the float model `source`
    (a private copy when its weights lie beside it: see vgrt.calibration.sensitivity.probe_session)."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    probe = onnx.load(str(source), load_external_data=False)
    operands = {node.name: operand_names(node) for node in plain_attentions(probe)}
    if not operands:
        return {}
    decompose(probe)
    outputs = _add_extremes(probe, operands)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = probe_session(probe, source, options)
    largest = dict.fromkeys(outputs, 0.0)
    for feed in feeds:
        for output, value in zip(outputs, session.run(outputs, feed)):
            largest[output] = max(largest[output], float(np.max(np.abs(value))))
    return {name: AttentionRanges(**{o: _largest(largest, name, o) for o in OPERANDS}) for name in operands}


def _add_extremes(model, operands: dict[str, dict[str, str]]) -> list[str]:
    """Add ReduceMin and ReduceMax of each decomposed attention's operands ({node name: {operand: tensor}})
    as graph outputs; return their names."""
    onnx = require("onnx")
    outputs = []
    for name, tensors in operands.items():
        for operand, tensor in tensors.items():
            for reduce in ("ReduceMin", "ReduceMax"):
                output = f"{name}/{operand}/{reduce}"
                model.graph.node.append(onnx.helper.make_node(reduce, [tensor], [output], name=output, keepdims=0))
                outputs.append(output)
    model.graph.output.extend(onnx.ValueInfoProto(name=output) for output in outputs)
    return outputs


def _largest(largest: dict[str, float], name: str, operand: str) -> float:
    value = max(largest[f"{name}/{operand}/ReduceMin"], largest[f"{name}/{operand}/ReduceMax"])
    return value if math.isfinite(value) else 0.0
