"""PyTorch reference of `masked_attention`; differentiable, and the form traced into ONNX.

Outside an export and without gradients, masked calls go through the custom op `vgrt::masked_attention`
(vgrt.plugins.masked_attention.torch_op): this reference on CPU, the Triton kernel on CUDA.

Contract of the node the exporter writes (`vgrt::MaskedAttention(q, k, v, bias)`): q is already
multiplied by the scale (TensorRT's IAttention wants a pre-scaled Q too), bias is an additive float
broadcastable to [B, H, Lq, Lk] where -inf means "never attend". Rows whose every key is -inf give 0.
"""

import torch
import torch.nn.functional as F

from vgrt.errors import InvalidInputError
from vgrt.plugins.masked_attention.identity import NODE_DOMAIN, NODE_TYPE, NODE_VERSION


def additive_bias(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool masks (True = attend) become 0 / -inf; float biases are cast to `dtype`."""
    if bias is None:
        return None
    if bias.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=bias.device).masked_fill(~bias, float("-inf"))
    return bias.to(dtype)


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The shape contract every form of the operator shares (the Triton kernel checks it too)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InvalidInputError(
            f"masked_attention takes 4-D q, k, v as [B, H, L, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise InvalidInputError(
            f"masked_attention needs k and v with the same [B, H, Lk] and q, k with the same head size; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if bias is not None:
        target = (max(q.shape[0], k.shape[0]), q.shape[1], q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(bias.shape, target)
        except RuntimeError:
            raise InvalidInputError(
                f"masked_attention bias of shape {tuple(bias.shape)} does not broadcast to [B, H, Lq, Lk] = {target}"
            ) from None


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v over the last two axes; rows with no allowed key return zeros.

    Args:
        q: queries [B, H, Lq, D]. k: keys [B, H, Lk, D]. v: values [B, H, Lk, Dv].
        bias: additive float bias or bool mask (True = attend), broadcastable to [B, H, Lq, Lk].
        scale: score scale; default 1/sqrt(D).
    """
    check_shapes(q, k, v, bias)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    bias = additive_bias(bias, q.dtype)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{NODE_DOMAIN}::{NODE_TYPE}",
            [q, k, v, bias],
            {},
            dtype=q.dtype,
            shape=(*torch.broadcast_shapes(q.shape[:2], k.shape[:2]), q.shape[2], v.shape[3]),
            version=NODE_VERSION,
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        return prescaled_masked_attention(q, k, v, bias)  # the gradient steps differentiate the reference
    from vgrt.plugins.masked_attention.torch_op import masked_attention_op

    return masked_attention_op(q, k, v, bias)  # this function on CPU, the Triton kernel on CUDA


def prescaled_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`masked_attention` on a pre-scaled q and an additive float bias, in PyTorch."""
    # A finite floor keeps SDPA's softmax free of NaN on fully masked rows; those rows are then zeroed
    # by `where` (not a multiply, which would keep a NaN).
    floor = torch.finfo(q.dtype).min
    row_has_key = bias.amax(dim=-1, keepdim=True) > float("-inf")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.clamp_min(floor), scale=1.0)
    return torch.where(row_has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
