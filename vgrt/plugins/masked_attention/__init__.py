"""The one attention operator every conditioned UNet layer is built from.

    masked_attention(q, k, v, bias) = softmax(scale * q k^T + bias) v,  rows with no allowed key -> 0

Forms that must agree: the PyTorch reference here, the ONNX forms in `onnx_form`, and the GPU kernel
and TensorRT plugin of the GPU path.
"""

from vgrt.plugins.masked_attention.identity import NODE_DOMAIN, NODE_TYPE, NODE_VERSION
from vgrt.plugins.masked_attention.reference import additive_bias, masked_attention

__all__ = ["NODE_DOMAIN", "NODE_TYPE", "NODE_VERSION", "additive_bias", "masked_attention"]
