"""GroupNormalization in a numerically stable form of standard ONNX ops.

ONNX Runtime's CPU kernel computes a group's variance in one pass, as E[x^2] - E[x]^2: where the mean
is large against the spread the two terms cancel and the result loses precision (1e-3 relative at
mean/std 100, 0.1 or NaN at 1000). Flat image regions give exactly such groups (a VAE encoding a
constant colour; AIComposer's latents drift 9e-3 from PyTorch on SD 1.5). This pass replaces every
GroupNormalization node by: mean, centre, mean of the squared centred values, divide by its root, all
in fp32 (OpenVINO's own kernel is stable; the rewrite costs it nothing either).

The pass rewrites graph structure only (no initializers), so it works on the exporter's weightless
skeleton. Exports at opset < 21 hold no GroupNormalization (the exporter writes InstanceNormalization,
which ONNX Runtime computes stably), so only the per-channel scale and bias of opset 21 are handled.
"""

import onnx
from onnx import TensorProto, helper

# Bumped whenever the rewrite changes, so export caches keyed by it do not reuse older exports.
PASS_VERSION = 1


def decompose_group_norms(model: onnx.ModelProto) -> int:
    """Rewrite every GroupNormalization of the main graph in place; return how many were rewritten."""
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for original in model.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # detached: the graph's node list is cleared below
        if node.op_type == "GroupNormalization" and node.domain in ("", "ai.onnx"):
            new_nodes += _stable_nodes(node)
            count += 1
        else:
            new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return count


def _stable_nodes(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Nodes computing `node` as y = (x - mean) / sqrt(mean((x - mean)^2) + epsilon) * scale + bias,
    with fp32 statistics over each group of each sample, whatever the input's rank and dtype."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, scale, bias = node.input
    prefix = f"{node.output[0]}/stable_group_norm"  # output names are unique, so these are too

    def name(part: str) -> str:
        return f"{prefix}/{part}"

    def make(op_type: str, inputs: list[str], part: str, **kwargs: object) -> onnx.NodeProto:
        return helper.make_node(op_type, inputs, [name(part)], name=name(part), **kwargs)

    def constant(part: str, data_type: int, values: list[float]) -> onnx.NodeProto:
        shape = [] if data_type == TensorProto.FLOAT else [len(values)]
        return make("Constant", [], part, value=helper.make_tensor("", data_type, shape, values))

    return [
        constant("flat_shape", TensorProto.INT64, [0, 0, -1]),
        constant("group_shape", TensorProto.INT64, [0, attributes["num_groups"], -1]),
        constant("column_shape", TensorProto.INT64, [-1, 1]),
        constant("last_axis", TensorProto.INT64, [-1]),
        constant("epsilon", TensorProto.FLOAT, [attributes.get("epsilon", 1e-5)]),
        make("Shape", [x], "x_shape"),
        make("Reshape", [x, name("flat_shape")], "flat"),  # [N, C, S]
        make("Cast", [name("flat")], "flat_fp32", to=TensorProto.FLOAT),
        make("Reshape", [name("flat_fp32"), name("group_shape")], "grouped"),  # [N, G, C/G * S]
        make("ReduceMean", [name("grouped"), name("last_axis")], "mean"),
        make("Sub", [name("grouped"), name("mean")], "roughly_centred"),
        # ReduceMean's own rounding leaves the mean off by ~1e-7 of its size, which is much of the spread
        # when the mean is large: the mean of the centred values is that error, small and exact enough
        make("ReduceMean", [name("roughly_centred"), name("last_axis")], "mean_error"),
        make("Sub", [name("roughly_centred"), name("mean_error")], "centred"),
        make("Mul", [name("centred"), name("centred")], "squares"),
        make("ReduceMean", [name("squares"), name("last_axis")], "variance"),
        make("Add", [name("variance"), name("epsilon")], "padded_variance"),
        make("Sqrt", [name("padded_variance")], "deviation"),
        make("Div", [name("centred"), name("deviation")], "normalised_fp32"),
        make("CastLike", [name("normalised_fp32"), x], "normalised"),
        make("Shape", [name("flat")], "channel_shape"),
        make("Reshape", [name("normalised"), name("channel_shape")], "channels"),  # [N, C, S]
        make("Reshape", [scale, name("column_shape")], "scale"),
        make("Reshape", [bias, name("column_shape")], "bias"),
        make("Mul", [name("channels"), name("scale")], "scaled"),
        make("Add", [name("scaled"), name("bias")], "shifted"),
        helper.make_node("Reshape", [name("shifted"), name("x_shape")], list(node.output), name=name("output")),
    ]
