"""Graph pass: the exported `vgrt::MaskedAttention` nodes in the form TensorRT maps onto the vgrt plugin.

TensorRT's ONNX parser imports an op it has no importer for through its plugin fallback: the plugin
name is the node's op_type, the namespace its `plugin_namespace` attribute (from TensorRT 10.10 also its
domain), the version its `plugin_version` attribute, and `aot` selects the ahead-of-time implementation
of a Python-defined plugin; every other attribute would become a plugin field. The pass writes exactly
the attributes that `MASKED_ATTENTION` declares, keeps the domain equal to the namespace, and removes
the node's function body: TensorRT >= 10.7 prefers a registered plugin but falls back to a local
function, and a missing plugin must fail the parse rather than run the decomposed body. The result is
for TensorRT only (ONNX Runtime cannot run a custom node without its body).

fp16 exports keep MaskedAttention in fp32 (casts around the node) because ONNX Runtime's attention
overflows fp16 (SD 2.1). The plugin reads and writes fp16 but computes scores, softmax and the weighted
sum in fp32 registers, so the pass drops those casts: the plugin gets fp16 q, k, v and bias, half the
memory traffic of the fp32 island.
"""

import onnx
from onnx import TensorProto

from vgrt.plugins.masked_attention.identity import NODE_DOMAIN, NODE_TYPE
from vgrt.plugins.masked_attention.trt_plugin import MASKED_ATTENTION


def is_plugin_node(node: onnx.NodeProto) -> bool:
    return node.domain == NODE_DOMAIN and node.op_type == NODE_TYPE


def to_plugin_form(model: onnx.ModelProto, aot: bool = True) -> onnx.ModelProto:
    """A copy of `model` whose masked-attention nodes map onto the TensorRT plugin.

    Args:
        model: an exported model in the 'custom' attention form (weights may stay in external data).
        aot: select the ahead-of-time implementation (an engine that runs without Python) or the JIT one.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    attributes = [onnx.helper.make_attribute(k, v) for k, v in MASKED_ATTENTION.node_attributes(aot).items()]
    for node in result.graph.node:
        if is_plugin_node(node):
            del node.attribute[:]
            node.attribute.extend(attributes)
    kept = [f for f in result.functions if (f.domain, f.name) != (NODE_DOMAIN, NODE_TYPE)]
    del result.functions[:]
    result.functions.extend(kept)
    drop_fp32_islands(result)
    return result


def drop_fp32_islands(model: onnx.ModelProto) -> int:
    """Remove the fp16 -> fp32 -> fp16 casts around plugin nodes, in place; return the nodes changed.

    A node changes only when all its inputs are fp32 casts of fp16 tensors and its one output feeds one
    cast back to fp16, so every plugin node keeps a single dtype across its inputs and output.
    """
    nodes = model.graph.node
    elem_type = _elem_types(model)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    graph_outputs = {v.name for v in model.graph.output}

    def cast_up_from_fp16(name: str) -> bool:
        cast = nodes[producer[name]] if name in producer else None
        return _is_cast(cast, TensorProto.FLOAT) and elem_type.get(cast.input[0]) == TensorProto.FLOAT16

    removed: set[int] = set()  # indices of the casts to delete
    widened: list[int] = []
    changed = 0
    for node in filter(is_plugin_node, nodes):
        narrowed = consumers.get(node.output[0], [])
        if not (
            all(cast_up_from_fp16(name) for name in node.input)
            and len(narrowed) == 1
            and _is_cast(nodes[narrowed[0]], TensorProto.FLOAT16)
            and node.output[0] not in graph_outputs
        ):
            continue
        casts = [producer[name] for name in node.input]
        for i, cast in enumerate(casts):
            node.input[i] = nodes[cast].input[0]
        node.output[0] = nodes[narrowed[0]].output[0]
        removed.add(narrowed[0])
        widened += casts
        changed += 1
    still_read = {name for i, node in enumerate(nodes) if i not in removed for name in node.input} | graph_outputs
    removed |= {i for i in widened if nodes[i].output[0] not in still_read}
    kept = [_detached(node) for i, node in enumerate(nodes) if i not in removed]
    del nodes[:]
    nodes.extend(kept)
    produced = {out for node in nodes for out in node.output}
    for v in [v for v in model.graph.value_info if v.name not in produced]:
        model.graph.value_info.remove(v)
    return changed


def _detached(node: onnx.NodeProto) -> onnx.NodeProto:
    """A copy that outlives the graph's node list being cleared."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _is_cast(node: onnx.NodeProto | None, to: int) -> bool:
    return (
        node is not None
        and node.op_type == "Cast"
        and node.domain in ("", "ai.onnx")
        and any(a.name == "to" and a.i == to for a in node.attribute)
    )


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value, inferred on a weightless copy (a UNet's weights can pass 2 GB)."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    for field in ("node", "input", "output", "value_info"):
        getattr(skeleton.graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:  # dtype and shape only, marked external so nothing reads data
        stub = skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        stub.data_location = TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="weights-not-loaded")
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    values = (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types
