"""Graph pass choosing how the exported `vgrt::MaskedAttention` nodes appear in the ONNX file.

The exporter writes every masked attention as one custom node. This pass gives the three forms:
- "custom": the node stays, with a model-local function body (ONNX Runtime inlines it; TensorRT maps
  the node onto the vgrt plugin);
- "attention": the node is replaced by the opset-23 `Attention` op (TensorRT's native attention);
- "decomposed": the node is replaced by MatMul/Softmax/MatMul in standard ops (any opset >= 18).
Attention without a mask never becomes a custom node: it is exported as plain attention.
"""

import onnx
import onnx.inliner

from vgrt.errors import InvalidInputError
from vgrt.plugins.masked_attention.identity import NODE_DOMAIN, NODE_TYPE, NODE_VERSION
from vgrt.plugins.masked_attention.onnx_form import function_proto

ATTENTION_FORMS = ("custom", "attention", "decomposed")


def model_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def count_custom_nodes(model: onnx.ModelProto) -> int:
    return sum(n.domain == NODE_DOMAIN and n.op_type == NODE_TYPE for n in model.graph.node)


def apply_attention_form(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """Return `model` with its masked-attention nodes in `form` (see module docstring)."""
    if form not in ATTENTION_FORMS:
        raise InvalidInputError(f"unknown attention form {form!r}; choose one of: {', '.join(ATTENTION_FORMS)}")
    if count_custom_nodes(model) == 0:
        return model
    opset = model_opset(model)
    body = "decomposed" if form == "custom" else form
    _attach_function(model, function_proto(body, opset))
    if form == "custom":
        return model
    inlined = onnx.inliner.inline_selected_functions(model, [(NODE_DOMAIN, NODE_TYPE)])
    del inlined.opset_import[:]
    inlined.opset_import.extend(o for o in model.opset_import if o.domain != NODE_DOMAIN)
    return inlined


def _attach_function(model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    kept = [f for f in model.functions if (f.domain, f.name) != (NODE_DOMAIN, NODE_TYPE)]
    del model.functions[:]
    model.functions.extend([*kept, function])
    if not any(o.domain == NODE_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(NODE_DOMAIN, NODE_VERSION))
