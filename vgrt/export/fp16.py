"""fp16 export: weights and activations in fp16, with the known overflow spots kept in fp32.

The exporter traces the module in fp16 (weights converted by torch), then this pass wraps the ops
listed in FP32_OPS in casts. Kept in fp32: attention scores and softmax (SD 2.1's attention overflows
fp16), and normalization statistics (the SDXL VAE's overflow in fp16). The pass rewrites graph
structure only, so it works on models whose weights live in external data.
"""

import onnx
from onnx import TensorProto, helper

from vgrt.plugins.masked_attention.identity import NODE_TYPE

FP32_OPS = (
    NODE_TYPE,
    "Attention",
    "Softmax",
    "GroupNormalization",
    "LayerNormalization",
    "InstanceNormalization",
    "ReduceMean",
    "Pow",
    "Sqrt",
)


def keep_ops_in_fp32(model: onnx.ModelProto, op_types: tuple[str, ...] = FP32_OPS) -> list[str]:
    """Wrap every fp16 input and output of nodes in `op_types` in casts; return the op types wrapped."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    elem_type = {
        v.name: v.type.tensor_type.elem_type
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    elem_type.update({t.name: t.data_type for t in model.graph.initializer})
    new_nodes: list[onnx.NodeProto] = []
    wrapped: set[str] = set()
    for index, original in enumerate(model.graph.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)  # detached: the graph's node list is cleared below
        if node.op_type not in op_types:
            new_nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if name and elem_type.get(name) == TensorProto.FLOAT16:
                cast = f"{name}_fp32_{index}_{i}"
                new_nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT, name=f"{cast}_cast"))
                node.input[i] = cast
        casts_back = []
        for i, name in enumerate(node.output):
            if elem_type.get(name) == TensorProto.FLOAT16:
                wide = f"{name}_fp32_{index}"
                node.output[i] = wide
                casts_back.append(
                    helper.make_node("Cast", [wide], [name], to=TensorProto.FLOAT16, name=f"{name}_fp16_cast")
                )
                wrapped.add(node.op_type)
        new_nodes += [node, *casts_back]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return sorted(wrapped)
