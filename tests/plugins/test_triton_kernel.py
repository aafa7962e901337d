"""The Triton kernel of masked_attention against the PyTorch reference: on the GPU where there is one,
else on CPU by Triton's interpreter."""

import os

import torch

# Read when a kernel is defined: must be set before triton is used (tests/conftest.py sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
import itertools
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from vgrt.errors import InvalidInputError, MissingDependencyError
from vgrt.plugins.masked_attention import masked_attention, triton_kernel
from vgrt.plugins.masked_attention.triton_kernel import BLOCK_M, BLOCK_N, block_mask_from_bias, masked_attention_triton

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# LQ is one partial query tile; LK is two key tiles, the second partial, so the online softmax rescales.
B, H, LQ, LK = 2, 2, 40, 48
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _qkv(dtype, head_size, batch=B, heads=H, len_q=LQ, len_k=LK):
    return tuple(torch.randn(batch, heads, length, head_size).to(DEVICE, dtype) for length in (len_q, len_k, len_k))


def _bias(form):
    bias = _cpu_bias(form)
    return None if bias is None else bias.to(DEVICE)


def _cpu_bias(form):
    """A bias of the given form in which some query rows have every key masked."""
    if form == "none":
        return None
    if form == "bool":
        bias = torch.rand(B, H, LQ, LK) < 0.7
        bias[0, :, 3] = False
        bias[1, 1, LQ - 1] = False
        return bias
    if form == "additive":
        bias = (2 * torch.randn(B, H, LQ, LK)).masked_fill(torch.rand(B, H, LQ, LK) < 0.3, float("-inf"))
        bias[0, :, 3] = float("-inf")
        return bias
    if form == "key_mask":  # [B, 1, 1, Lk]: read with stride 0 over heads and queries
        bias = torch.rand(B, 1, 1, LK) < 0.7
        bias[1] = False
        return bias
    raise AssertionError(form)


def _rows_without_keys(bias) -> torch.Tensor:
    allowed = bias if bias.dtype == torch.bool else bias > float("-inf")
    return ~allowed.any(dim=-1).expand(B, H, LQ)


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("form", ["none", "bool", "additive", "key_mask"])
@pytest.mark.parametrize("head_size", [40, 64, 80, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(dtype, head_size, form):
    torch.manual_seed(0)
    q, k, v = _qkv(dtype, head_size)
    bias = _bias(form)
    out = masked_attention_triton(q, k, v, bias)
    assert out.dtype == dtype and not out.isnan().any()
    _close(out, masked_attention(q, k, v, bias), dtype)
    if bias is not None:
        empty = _rows_without_keys(bias)
        assert empty.any() and torch.equal(out[empty], torch.zeros_like(out[empty]))


def test_strided_inputs_broadcast_batch_and_scale():
    """diffusers' [B, L, H, D] layout seen as [B, H, L, D], q shared across k's batch, a 2-D bias."""
    torch.manual_seed(0)
    q = torch.randn(1, LQ, H, 64, device=DEVICE).transpose(1, 2)
    k, v = (torch.randn(B, LK, H, 64, device=DEVICE).transpose(1, 2) for _ in range(2))
    bias = torch.randn(LQ, LK, device=DEVICE)
    out = masked_attention_triton(q, k, v, bias, scale=0.3)
    _close(out, masked_attention(q, k, v, bias, scale=0.3), torch.float32)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over the poisoned rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_block_mask_skips_masked_tiles(dtype):
    """Skipped tiles are never read: NaN written into them does not reach the result."""
    torch.manual_seed(0)
    len_q, len_k = 80, 96  # 2 query tiles x 3 key tiles
    # Which key tiles each query tile attends, per batch row; batch 0 never needs key tile 1, batch 1 key tile 0.
    visited = torch.tensor([[[1, 0, 0], [1, 0, 1]], [[0, 1, 1], [0, 0, 1]]], dtype=torch.bool)
    tile_allowed = visited.repeat_interleave(BLOCK_M, 1)[:, :len_q].repeat_interleave(BLOCK_N, 2)[:, :, :len_k]
    tile_allowed = tile_allowed[:, None]  # [2, 1, Lq, Lk]
    allowed = tile_allowed & (torch.rand(2, 1, len_q, len_k) < 0.7)
    bias = torch.randn(2, 1, len_q, len_k).masked_fill(~allowed, float("-inf"))
    block_mask = block_mask_from_bias(bias, len_q, len_k)
    assert torch.equal(block_mask, visited[:, None])
    visited, tile_allowed, bias, block_mask = (t.to(DEVICE) for t in (visited, tile_allowed, bias, block_mask))

    q, k, v = _qkv(dtype, 80, batch=2, heads=1, len_q=len_q, len_k=len_k)
    unread_keys = (~visited.any(dim=1)).repeat_interleave(BLOCK_N, 1)[:, None, :len_k]  # [2, 1, Lk]
    k_poisoned, v_poisoned = (t.masked_fill(unread_keys[..., None], float("nan")) for t in (k, v))
    bias_poisoned = bias.masked_fill(~tile_allowed, float("nan"))

    out = masked_attention_triton(q, k_poisoned, v_poisoned, bias_poisoned, block_mask=block_mask)
    _close(out, masked_attention(q, k, v, bias), dtype)
    # Without the block mask the kernel visits every tile and the poison shows.
    assert masked_attention_triton(q, k_poisoned, v_poisoned, bias_poisoned).isnan().any()


@pytest.mark.parametrize(
    "shape", [(B, H, LQ, LK), (B, 1, 1, LK), (LQ, LK), (1, H, LQ, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_block_mask_from_bias_matches_dense_tiles(shape):
    torch.manual_seed(0)
    allowed = torch.rand(shape) < 0.5
    # Mask one 16x16 tile fully (a band of tiles where the other axis broadcasts).
    rows, cols = (slice(16, 32) if size > 1 else slice(None) for size in shape[-2:])
    allowed[..., rows, cols] = False
    bias = torch.randn(shape).masked_fill(~allowed, float("-inf"))
    block_mask = block_mask_from_bias(bias, LQ, LK, block_m=16, block_n=16)

    dense = allowed[(None,) * (4 - allowed.dim())]
    dense = dense.expand(*dense.shape[:2], LQ, LK)
    expected = torch.zeros(*dense.shape[:2], -(-LQ // 16), -(-LK // 16), dtype=torch.bool)
    for i, j in itertools.product(range(expected.shape[2]), range(expected.shape[3])):
        expected[..., i, j] = dense[..., 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)].any(dim=(-2, -1))
    assert torch.equal(block_mask, expected) and not block_mask.all()
    assert torch.equal(block_mask_from_bias(allowed, LQ, LK, 16, 16), expected)


TILES = (-(-LQ // BLOCK_M), -(-LK // BLOCK_N))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda q, k, v: {"q": q.int(), "k": k.int(), "v": v.int()}, id="int dtype"),
        pytest.param(lambda q, k, v: {"q": q.half(), "k": k, "v": v}, id="mixed dtypes"),
        pytest.param(lambda q, k, v: {"q": q[0], "k": k, "v": v}, id="3-D q"),
        pytest.param(lambda q, k, v: {"q": q, "k": k, "v": v[..., :32]}, id="value head size"),
        pytest.param(
            lambda q, k, v: {"q": q.repeat(1, 1, 1, 5), "k": k.repeat(1, 1, 1, 5), "v": v.repeat(1, 1, 1, 5)},
            id="head size 320",
        ),
        pytest.param(lambda q, k, v: {"q": q, "k": k, "v": v, "bias": q.new_zeros(LQ + 1, LK)}, id="bias shape"),
        pytest.param(
            lambda q, k, v: {"q": q, "k": k, "v": v, "block_mask": q.new_ones(1, 1, TILES[0], TILES[1] + 1) > 0},
            id="block_mask tiles",
        ),
        pytest.param(
            lambda q, k, v: {"q": q, "k": k, "v": v, "block_mask": q.new_ones(1, 1, *TILES)}, id="block_mask dtype"
        ),
    ],
)
def test_rejects_unsupported_inputs(bad):
    with pytest.raises(InvalidInputError):
        masked_attention_triton(**bad(*_qkv(torch.float32, 64)))


def test_registered_as_custom_op():
    torch.manual_seed(0)
    q, k, v = _qkv(torch.float16, 40)
    bias = _bias("key_mask")
    torch.library.opcheck(triton_kernel._op(), (q, k, v, bias, None, None))
    out = torch.ops.vgrt.masked_attention_triton(q, k, v, bias, None, None)
    _close(out, masked_attention(q, k, v, bias), torch.float16)


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    monkeypatch.setattr(triton_kernel, "_kernel", functools.cache(triton_kernel._kernel.__wrapped__))
    with pytest.raises(MissingDependencyError, match=r"vgrt\[gpu\]"):
        masked_attention_triton(*_qkv(torch.float32, 64))


def test_import_does_not_import_triton():
    code = "import sys, vgrt.plugins.masked_attention.triton_kernel; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
