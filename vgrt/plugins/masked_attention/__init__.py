"""The one attention operator every conditioned UNet layer is built from.

    masked_attention(q, k, v, bias) = softmax(scale * q k^T + bias) v,  rows with no allowed key -> 0

Forms that must agree: the PyTorch reference (`reference`), the ONNX forms (`onnx_form`), the Triton
kernel (`triton_kernel`) and the TensorRT plugin. The node identity (`identity`) imports nothing heavy;
torch loads when `masked_attention` is first used.
"""

from vgrt.plugins.masked_attention.identity import NODE_DOMAIN, NODE_TYPE, NODE_VERSION

__all__ = ["NODE_DOMAIN", "NODE_TYPE", "NODE_VERSION", "additive_bias", "masked_attention"]


def __getattr__(name: str):
    if name in ("masked_attention", "additive_bias"):
        from vgrt.plugins.masked_attention import reference

        return getattr(reference, name)
    raise AttributeError(name)
