"""`masked_attention` alone as ONNX models, for the attention suite.

Two dynamic-shape exports serve every layer size: the masked op (one vgrt::MaskedAttention node,
rewritten into each ONNX form by the graph pass the UNet export uses) and the dense op (no bias: plain
SDPA, which the exporter writes as the opset-23 Attention op). Both trace the PyTorch reference, so
the graphs are exactly what a UNet export holds per attention layer.
"""

from pathlib import Path

import onnx
import torch
from torch import nn

from vgrt.export.attention_forms import ATTENTION_FORMS, apply_attention_form
from vgrt.export.exporter import DTYPES, trace_to_onnx
from vgrt.export.spec import ComponentSpec, TensorSpec
from vgrt.models.presets import Range
from vgrt.plugins.masked_attention import masked_attention

OPSET = 23  # the Attention op needs 23
DENSE = "dense"


class MaskedAttentionOp(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return masked_attention(q, k, v, bias)


class DenseAttentionOp(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return masked_attention(q, k, v)


def attention_spec(dtype: str, masked: bool) -> ComponentSpec:
    """q, k, v as [B, H, L, D] and, when masked, an additive bias [B, 1, Lq, Lk] shared by the heads."""
    inputs = [
        TensorSpec("q", dtype, ("batch", "heads", "queries", "head_dim")),
        TensorSpec("k", dtype, ("batch", "heads", "keys", "head_dim")),
        TensorSpec("v", dtype, ("batch", "heads", "keys", "head_dim")),
    ]
    if masked:
        bias = TensorSpec(
            "bias", dtype, ("batch", 1, "queries", "keys"), "0 = attend, -inf = never", negative_infinity=True
        )
        inputs.append(bias)
    dims = {
        "batch": Range(1, 2, 16), "heads": Range(1, 8, 64), "queries": Range(1, 64, 65536),
        "keys": Range(1, 77, 65536), "head_dim": Range(1, 40, 256),
    }  # fmt: skip
    return ComponentSpec(
        "attention", tuple(inputs), (TensorSpec("out", dtype, ("batch", "heads", "queries", "head_dim")),), dims
    )


def export_attention_models(out_dir: Path, dtype: str) -> dict[str, tuple[Path, ComponentSpec]]:
    """Write the masked op in every ONNX form and the dense op; {form or 'dense': (path, spec)}."""
    dtype_name = DTYPES[dtype][0]
    masked_spec, dense_spec = attention_spec(dtype_name, masked=True), attention_spec(dtype_name, masked=False)
    masked = trace_to_onnx(MaskedAttentionOp(), masked_spec, OPSET)
    models = {form: (apply_attention_form(_copy(masked), form), masked_spec) for form in ATTENTION_FORMS}
    models[DENSE] = (trace_to_onnx(DenseAttentionOp(), dense_spec, OPSET), dense_spec)
    written = {}
    for name, (model, spec) in models.items():
        path = out_dir / f"attention-{name}-{dtype}.onnx"
        onnx.save_model(model, path)
        written[name] = (path, spec)
    return written


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied
