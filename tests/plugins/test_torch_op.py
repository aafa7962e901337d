"""`vgrt::masked_attention`: registered on first use, the reference on CPU, what masked calls run outside
an export and without gradients; the export keeps writing the MaskedAttention node."""

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vgrt.plugins.masked_attention import masked_attention, reference, torch_op
from vgrt.plugins.masked_attention.torch_op import masked_attention_op


def _inputs(requires_grad=False):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 16, requires_grad=requires_grad) for length in (20, 12, 12))
    bias = torch.randn(2, 1, 20, 12).masked_fill(torch.rand(2, 1, 20, 12) < 0.4, float("-inf"))
    bias[0, :, 3] = float("-inf")  # a row with no allowed key
    return q, k, v, bias


def test_a_compiled_first_call_registers_the_op():
    """Compiling before any eager call: the reference's import of the op module happens under tracing."""
    code = (
        "import torch; from vgrt.plugins.masked_attention import masked_attention; "
        "q = torch.randn(1, 1, 4, 8); bias = torch.zeros(1, 1, 4, 4); "
        "f = torch.compile(masked_attention, backend='eager', fullgraph=True); "
        "print(torch.equal(f(q, q, q, bias), masked_attention(q, q, q, bias)), "
        "hasattr(torch.ops.vgrt, 'masked_attention'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]


def test_fake_implementation_matches_the_layout_of_strided_inputs():
    """diffusers' q, k, v are [B, L, H, D] seen as [B, H, L, D]: the op still returns a contiguous tensor,
    as its fake implementation says (inductor checks the strides)."""
    q, k, v, bias = _inputs()
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    torch.library.opcheck(masked_attention_op, (q, k, v, bias))
    assert masked_attention_op(q, k, v, bias).is_contiguous()


def test_op_is_registered_and_its_cpu_implementation_is_the_reference():
    q, k, v, bias = _inputs()
    torch.library.opcheck(masked_attention_op, (q, k, v, bias))
    out = torch.ops.vgrt.masked_attention(q, k, v, bias)
    assert torch.equal(out, reference.prescaled_masked_attention(q, k, v, bias))
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))


class _Ops(TorchDispatchMode):
    """Records the ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_masked_calls_without_gradients_go_through_the_op():
    q, k, v, bias = _inputs()
    with torch.inference_mode(), _Ops() as ops:
        out = masked_attention(q, k, v, bias, scale=0.5)
    assert "vgrt.masked_attention.default" in ops.names
    assert torch.equal(out, reference.prescaled_masked_attention(q * 0.5, k, v, bias))
    with torch.inference_mode(), _Ops() as dense:
        masked_attention(q, k, v)  # no mask: PyTorch's SDPA, as before
    assert "vgrt.masked_attention.default" not in dense.names


def test_cuda_implementation_is_the_kernel_with_the_tile_mask(monkeypatch):
    """The CUDA implementation, run here on CPU tensors (Triton's interpreter where there is no GPU):
    the kernel gets the tile mask of the bias, and matches the reference."""
    pytest.importorskip("triton")
    from vgrt.plugins.masked_attention import triton_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 16) for length in (20, 80, 80))  # 3 key tiles of BLOCK_N = 32
    bias = torch.randn(2, 1, 1, 80)
    bias[0, ..., 32:64] = float("-inf")  # batch 0 never attends key tile 1
    launched = []
    original = triton_kernel.masked_attention_triton
    monkeypatch.setattr(
        triton_kernel,
        "masked_attention_triton",
        lambda *a, **kw: launched.append(kw["block_mask"]) or original(*a, **kw),
    )
    out = torch_op._cuda_attention(q, k, v, bias)
    torch.testing.assert_close(out, reference.prescaled_masked_attention(q, k, v, bias), atol=1e-4, rtol=1e-4)
    assert launched[0].tolist() == [[[[True, False, True]]], [[[True, True, True]]]]


def test_gradients_use_the_reference():
    q, k, v, bias = _inputs(requires_grad=True)
    out = masked_attention(q, k, v, bias)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_compiled_call_matches_eager():
    q, k, v, bias = _inputs()
    compiled = torch.compile(lambda *a: masked_attention(*a), backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, bias), masked_attention(q, k, v, bias), rtol=0, atol=0)
