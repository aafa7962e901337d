"""`vgrt::masked_attention`: the operator as a torch custom op, so a compiled module on CUDA calls the kernel.

The op takes the node's contract (q pre-scaled, additive float bias). Its CPU implementation is the
PyTorch reference; its CUDA implementation is the Triton kernel fed the compact tile mask (computed on
the device from the bias, no host sync), falling back to the reference where the kernel does not apply
(head size over MAX_HEAD_SIZE, or no triton). torch.compile sees one opaque op with a fake
implementation, so it neither traces into the reference nor into Triton.

The op has no autograd formula: `reference.masked_attention` uses it only when no input needs a
gradient (inference, the step loops), and never inside an ONNX export, which keeps writing the
`vgrt::MaskedAttention` node.

Importing this module registers the op; `reference.masked_attention` imports it on its first masked call.
"""

from functools import cache

import torch

from vgrt.plugins.masked_attention.reference import check_shapes, prescaled_masked_attention

OP_NAME = "vgrt::masked_attention"


def _cuda_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from vgrt.plugins.masked_attention import triton_kernel

    if not _kernel_applies(q, k, v) or not _triton_installed():
        return prescaled_masked_attention(q, k, v, bias).contiguous()
    bias = bias[(None,) * (4 - bias.dim())]
    tiles = triton_kernel.block_mask_from_bias(bias, q.shape[2], k.shape[2])
    return triton_kernel.masked_attention_triton(q, k, v, bias, scale=1.0, block_mask=tiles)


def _kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    from vgrt.plugins.masked_attention.triton_kernel import DTYPES, MAX_HEAD_SIZE

    return q.dtype in DTYPES and k.dtype == v.dtype == q.dtype and v.shape[-1] == q.shape[-1] <= MAX_HEAD_SIZE


@cache
def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@torch.library.custom_op(OP_NAME, mutates_args=())
def masked_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`prescaled_masked_attention` (q pre-scaled, additive float bias) as `torch.ops.vgrt.masked_attention`.

    Outputs are contiguous, as the fake implementation declares (SDPA keeps strided inputs' layout).
    """
    return prescaled_masked_attention(q, k, v, bias).contiguous()


masked_attention_op.register_kernel("cuda")(_cuda_attention)


@masked_attention_op.register_fake
def _(q, k, v, bias):
    check_shapes(q, k, v, bias)
    return q.new_empty((*torch.broadcast_shapes(q.shape[:2], k.shape[:2]), q.shape[2], v.shape[3]))
