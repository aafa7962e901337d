"""The masked-attention operator: PyTorch reference and its three ONNX forms agree, empty rows give 0."""

import numpy as np
import onnx
import pytest
import torch

from vgrt.errors import InvalidInputError
from vgrt.export.attention_forms import ATTENTION_FORMS, apply_attention_form, count_custom_nodes
from vgrt.plugins.masked_attention import masked_attention


def naive_attention(q, k, v, bias, scale):
    """Textbook definition in float64, rows with no allowed key set to 0 by hand."""
    q, k, v = q.double(), k.double(), v.double()
    scores = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + (torch.where(bias, 0.0, float("-inf")) if bias.dtype == torch.bool else bias.double())
    empty = torch.isinf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ v


def random_case(seed: int, bias_kind: str):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (10, 7, 7))
    if bias_kind == "none":
        return q, k, v, None
    if bias_kind == "bool":
        bias = torch.rand(2, 1, 10, 7, generator=g) > 0.4
        bias[:, :, :2] = False  # two rows with no allowed key
    elif bias_kind == "float":
        bias = torch.randn(2, 3, 10, 7, generator=g)
        bias[0, 1, 3] = float("-inf")
    else:  # key mask broadcast over heads and queries
        bias = torch.where(torch.rand(2, 1, 1, 7, generator=g) > 0.5, 0.0, float("-inf"))
        bias[1] = float("-inf")  # a batch row with every key masked
    return q, k, v, bias


@pytest.mark.parametrize("bias_kind", ["none", "bool", "float", "key"])
def test_reference_matches_definition(bias_kind):
    q, k, v, bias = random_case(seed=11, bias_kind=bias_kind)
    out = masked_attention(q, k, v, bias)
    expected = naive_attention(q, k, v, bias, scale=8**-0.5)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_fully_masked_rows_are_zero_and_have_finite_gradients():
    q, k, v, bias = random_case(seed=3, bias_kind="bool")
    q.requires_grad_(True)
    out = masked_attention(q, k, v, bias)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_explicit_scale_is_used():
    q, k, v, _ = random_case(seed=5, bias_kind="none")
    torch.testing.assert_close(
        masked_attention(q, k, v, scale=0.3).double(), naive_attention(q, k, v, None, 0.3), rtol=1e-5, atol=1e-6
    )


def test_shape_errors_name_the_shapes():
    q, k, v, _ = random_case(seed=1, bias_kind="none")
    with pytest.raises(InvalidInputError, match=r"bias of shape \(2, 1, 9, 7\)"):
        masked_attention(q, k, v, torch.zeros(2, 1, 9, 7))
    with pytest.raises(InvalidInputError, match="4-D"):
        masked_attention(q[0], k, v)


class _Op(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return masked_attention(q, k, v, bias)


@pytest.fixture(scope="module", params=["float", "key"])
def exported_op(request):
    """(model, bias kind): a single masked attention traced with a full [B, H, Lq, Lk] or a key-mask bias."""
    q, k, v, bias = random_case(seed=0, bias_kind=request.param)
    program = torch.onnx.export(_Op().eval(), (q, k, v, bias), dynamo=True, opset_version=23, verbose=False)
    return program.model_proto, request.param


@pytest.mark.parametrize("form", ATTENTION_FORMS)
def test_onnx_forms_match_reference_without_nan(exported_op, form):
    import onnxruntime as ort

    exported, bias_kind = exported_op
    model = apply_attention_form(onnx.ModelProto.FromString(exported.SerializeToString()), form)
    onnx.checker.check_model(model)
    assert (count_custom_nodes(model) == 1) == (form == "custom")
    q, k, v, bias = random_case(seed=21, bias_kind=bias_kind)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), (q, k, v, bias))}
    out = session.run(None, feed)[0]
    assert not np.isnan(out).any()
    expected = naive_attention(q, k, v, bias, scale=8**-0.5).numpy()
    empty = np.broadcast_to(np.isinf(bias.numpy()).all(axis=-1, keepdims=True), out.shape)
    assert empty.any(), "the case must contain rows with every key masked"
    assert (out[empty] == 0).all()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_form_needs_opset_23():
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("MaskedAttention", list("qkvb"), ["o"], domain="vgrt")], "g", [], []
        ),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    with pytest.raises(InvalidInputError, match="opset >= 23"):
        apply_attention_form(model, "attention")
    with pytest.raises(InvalidInputError, match="unknown attention form"):
        apply_attention_form(model, "fast")
