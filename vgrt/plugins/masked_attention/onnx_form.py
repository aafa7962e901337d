"""ONNX function bodies of `vgrt::MaskedAttention`, written in standard ops only.

ONNX Runtime inlines a model-local function, so a graph with the custom node runs there as is; the
TensorRT parser instead maps the node onto the plugin by its name. The bodies use no attribute
references (ONNX Runtime does not resolve them in opset-23 functions) and no scale: q arrives scaled.

Two bodies, both NaN-free on rows whose keys are all masked:
- "decomposed": MatMul/Softmax-by-hand/MatMul for any opset >= 18;
- "attention": the opset-23 `Attention` op with a floored mask, rows without keys zeroed after.
"""

import onnx
from onnx import TensorProto, helper

from vgrt.errors import InvalidInputError
from vgrt.plugins.masked_attention.identity import NODE_DOMAIN, NODE_TYPE

BODIES = ("decomposed", "attention")
ATTENTION_OP_MIN_OPSET = 23
# Lowest finite fp16 value: a floor that stays finite in fp16 and fp32 graphs alike.
_FP16_LOWEST = -65504.0


def _const(name: str, value: float | list[int], like: str | None = None) -> list[onnx.NodeProto]:
    """A Constant node (int64 list, or a float scalar cast like tensor `like`)."""
    if isinstance(value, list):
        return [
            helper.make_node(
                "Constant", [], [name], value=helper.make_tensor(name + "_v", TensorProto.INT64, [len(value)], value)
            )
        ]
    raw = name + "_f32"
    return [
        helper.make_node("Constant", [], [raw], value=helper.make_tensor(raw + "_v", TensorProto.FLOAT, [], [value])),
        helper.make_node("CastLike", [raw, like], [name]),
    ]


def _row_has_key(scores_or_bias: str) -> list[onnx.NodeProto]:
    """Nodes computing `row_max` and `row_has_key` (False where every key of the row is -inf)."""
    return [
        *_const("last_axis", [-1]),
        helper.make_node("ReduceMax", [scores_or_bias, "last_axis"], ["row_max"], keepdims=1),
        helper.make_node("IsInf", ["row_max"], ["row_all_masked"], detect_positive=0),
        helper.make_node("Not", ["row_all_masked"], ["row_has_key"]),
    ]


def _decomposed_nodes() -> list[onnx.NodeProto]:
    return [
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "k_t"], ["qk"]),
        helper.make_node("Add", ["qk", "bias"], ["scores"]),
        *_row_has_key("scores"),
        *_const("zero", 0.0, like="q"),
        *_const("one", 1.0, like="q"),
        # Subtracting 0 instead of -inf on empty rows keeps exp() at 0 rather than NaN.
        helper.make_node("Where", ["row_has_key", "row_max", "zero"], ["shift"]),
        helper.make_node("Sub", ["scores", "shift"], ["shifted"]),
        helper.make_node("Exp", ["shifted"], ["weights"]),
        helper.make_node("ReduceSum", ["weights", "last_axis"], ["weight_sum"], keepdims=1),
        helper.make_node("Where", ["row_has_key", "weight_sum", "one"], ["denominator"]),
        helper.make_node("Div", ["weights", "denominator"], ["probs"]),
        helper.make_node("MatMul", ["probs", "v"], ["out"]),
    ]


def _attention_op_nodes() -> list[onnx.NodeProto]:
    return [
        *_row_has_key("bias"),
        *_const("floor", _FP16_LOWEST, like="q"),
        *_const("zero", 0.0, like="q"),
        helper.make_node("Max", ["bias", "floor"], ["finite_bias"]),
        # ONNX Runtime's Attention wants the mask's query axis at full length (no broadcast there).
        helper.make_node("Shape", ["bias"], ["bias_lead"], end=-2),
        helper.make_node("Shape", ["q"], ["query_len"], start=2, end=3),
        helper.make_node("Shape", ["bias"], ["key_len"], start=-1),
        helper.make_node("Concat", ["bias_lead", "query_len", "key_len"], ["mask_shape"], axis=0),
        helper.make_node("Expand", ["finite_bias", "mask_shape"], ["mask"]),
        helper.make_node("Attention", ["q", "k", "v", "mask"], ["attended"], scale=1.0),
        helper.make_node("Where", ["row_has_key", "attended", "zero"], ["out"]),
    ]


def function_proto(body: str, opset: int) -> onnx.FunctionProto:
    """The model-local function defining `vgrt::MaskedAttention` with the chosen body."""
    if body not in BODIES:
        raise InvalidInputError(f"unknown MaskedAttention body {body!r}; choose one of: {', '.join(BODIES)}")
    if body == "attention" and opset < ATTENTION_OP_MIN_OPSET:
        raise InvalidInputError(
            f"the 'attention' form needs the ONNX Attention op (opset >= {ATTENTION_OP_MIN_OPSET}); "
            f"the model is opset {opset}: export with --opset 23 or use the 'decomposed' form"
        )
    nodes = _decomposed_nodes() if body == "decomposed" else _attention_op_nodes()
    return helper.make_function(
        NODE_DOMAIN,
        NODE_TYPE,
        inputs=["q", "k", "v", "bias"],
        outputs=["out"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
    )
