"""The plugin form: MaskedAttention nodes carry exactly the identity the TensorRT registration declares,
lose their function body, and, in fp16 graphs, their fp32 casts; the rewired graph computes the same."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vgrt.export.attention_forms import model_opset
from vgrt.export.plugin_form import drop_fp32_islands, is_plugin_node, to_plugin_form
from vgrt.plugins.masked_attention.onnx_form import function_proto
from vgrt.plugins.masked_attention.trt_plugin import MASKED_ATTENTION

ATTRIBUTE_TYPES = {str: onnx.AttributeProto.STRING, int: onnx.AttributeProto.INT}


def _declared(aot: bool) -> dict[str, tuple[int, object]]:
    return {k: (ATTRIBUTE_TYPES[type(v)], v) for k, v in MASKED_ATTENTION.node_attributes(aot).items()}


def _attributes(node: onnx.NodeProto) -> dict[str, tuple[int, object]]:
    return {a.name: (a.type, helper.get_attribute_value(a)) for a in node.attribute}


def _as_text(attributes: dict) -> dict:
    return {k: (t, v.decode() if isinstance(v, bytes) else v) for k, (t, v) in attributes.items()}


def _model(dtype: int = TensorProto.FLOAT16, island: bool = True) -> onnx.ModelProto:
    """q, k, v, bias -> [Cast fp32] -> vgrt::MaskedAttention -> [Cast fp16] -> out, as the exporter writes it."""
    shape = {"q": [1, 2, 8, 4], "k": [1, 2, 6, 4], "v": [1, 2, 6, 4], "bias": [1, 1, 1, 6]}
    inputs = [helper.make_tensor_value_info(n, dtype, s) for n, s in shape.items()]
    output = helper.make_tensor_value_info("out", dtype, [1, 2, 8, 4])
    if island:
        casts = [helper.make_node("Cast", [n], [f"{n}_fp32"], to=TensorProto.FLOAT) for n in shape]
        nodes = [*casts, helper.make_node(MASKED_ATTENTION.name, [f"{n}_fp32" for n in shape], ["out_fp32"], domain=MASKED_ATTENTION.namespace),
                 helper.make_node("Cast", ["out_fp32"], ["out"], to=TensorProto.FLOAT16)]  # fmt: skip
    else:
        nodes = [helper.make_node(MASKED_ATTENTION.name, list(shape), ["out"], domain=MASKED_ATTENTION.namespace)]
    graph = helper.make_graph(nodes, "g", inputs, [output])
    opsets = [
        helper.make_opsetid("", 23),
        helper.make_opsetid(MASKED_ATTENTION.namespace, int(MASKED_ATTENTION.version)),
    ]
    return helper.make_model(graph, opset_imports=opsets, functions=[function_proto("decomposed", 23)])


@pytest.mark.parametrize("aot", [True, False])
def test_node_carries_exactly_the_declared_identity(aot):
    model = to_plugin_form(_model(), aot=aot)
    (node,) = [n for n in model.graph.node if is_plugin_node(n)]
    assert (node.op_type, node.domain) == (MASKED_ATTENTION.name, MASKED_ATTENTION.namespace)
    assert _as_text(_attributes(node)) == _declared(aot)
    assert not model.functions  # no body to fall back on: a missing plugin fails the parse
    assert (MASKED_ATTENTION.namespace, int(MASKED_ATTENTION.version)) in {
        (o.domain, o.version) for o in model.opset_import
    }
    onnx.checker.check_model(model)


def test_fp16_island_casts_are_dropped():
    model = to_plugin_form(_model())
    assert [n.op_type for n in model.graph.node] == [MASKED_ATTENTION.name]
    (node,) = model.graph.node
    assert list(node.input) == list(MASKED_ATTENTION.inputs) and list(node.output) == ["out"]


def test_fp32_graph_keeps_its_types():
    model = to_plugin_form(_model(TensorProto.FLOAT, island=False))
    (node,) = model.graph.node
    assert list(node.input) == list(MASKED_ATTENTION.inputs)


def test_a_cast_read_elsewhere_stays_and_a_non_fp16_source_keeps_the_island():
    model = _model()
    model.graph.node.append(helper.make_node("Identity", ["q_fp32"], ["q_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("q_copy", TensorProto.FLOAT, [1, 2, 8, 4]))
    assert drop_fp32_islands(model) == 1
    assert "q_fp32" in {o for n in model.graph.node for o in n.output}  # still read by Identity

    mixed = _model()
    mixed.graph.input[3].type.tensor_type.elem_type = TensorProto.BOOL  # a bool mask cast to fp32
    assert drop_fp32_islands(mixed) == 0
    assert [n.op_type for n in mixed.graph.node].count("Cast") == 5


# --- a real export -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_export(tiny_export):
    return tiny_export(features="all", dtype="fp16")


@pytest.fixture(scope="module")
def exported_and_plugin_form(fp16_export):
    exported = onnx.load(fp16_export / "unet.onnx")
    return exported, to_plugin_form(exported)


def test_every_exported_node_gets_the_declared_identity_and_loses_its_casts(exported_and_plugin_form):
    exported, model = exported_and_plugin_form
    nodes = [n for n in model.graph.node if is_plugin_node(n)]
    assert len(nodes) == sum(is_plugin_node(n) for n in exported.graph.node) > 0
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = [n for n in model.graph.node for i in n.input if i in {node.output[0] for node in nodes}]
    for node in nodes:
        assert _as_text(_attributes(node)) == _declared(aot=True)
        assert not any(producers.get(i) is not None and producers[i].op_type == "Cast" for i in node.input)
    assert not any(c.op_type == "Cast" for c in consumers)
    assert not model.functions
    onnx.checker.check_model(model)


def test_rewired_graph_computes_what_the_export_computes(fp16_export, exported_and_plugin_form):
    """With the standard-op body standing in for the plugin, ONNX Runtime gives the export's output:
    only the casts went, no tensor was rewired to the wrong place."""
    ort = pytest.importorskip("onnxruntime")
    from vgrt.export import example_feed

    exported, model = exported_and_plugin_form
    stand_in = onnx.ModelProto()
    stand_in.CopyFrom(model)
    for node in filter(is_plugin_node, stand_in.graph.node):
        del node.attribute[:]
    stand_in.functions.append(function_proto("decomposed", model_opset(stand_in)))
    feed = {k: v.numpy() for k, v in example_feed(fp16_export).items()}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]

    expected, got = run(exported).astype(np.float32), run(stand_in).astype(np.float32)
    assert got.dtype == expected.dtype and not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, atol=1e-2, rtol=1e-2)
