"""Triton kernel of `masked_attention`: flash-attention forward that skips fully masked key tiles.

One program computes one query tile of one (batch, head): it walks the key tiles with an online softmax
in fp32 and never materialises the [Lq, Lk] scores. The bias is read through broadcast strides (stride 0
on broadcast axes), so a key mask [B, 1, 1, Lk] costs Lk values per row, not a dense [Lq, Lk] tensor.
An optional compact `block_mask` [B or 1, H or 1, ceil(Lq / BLOCK_M), ceil(Lk / BLOCK_N)] says which
(query tile, key tile) pairs hold any allowed key; the others are neither loaded nor computed, which is
where this kernel beats fused attention kernels that ignore the mask's sparsity.

Forward only: the gradient steps differentiate the PyTorch reference. Triton is imported on first call;
set TRITON_INTERPRET=1 before importing triton to run the kernel on CPU.
"""

from functools import cache

import torch

from vgrt._lazy import require
from vgrt.errors import InvalidInputError
from vgrt.plugins.masked_attention.reference import check_shapes

# Tile sizes, fixed so that callers can build block masks that match the kernel's tiling. BLOCK_N is
# small for a fine skip granularity and so that head size 160 (padded to 256) still fits in registers.
BLOCK_M = 64
BLOCK_N = 32
MAX_HEAD_SIZE = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@cache
def _kernel():
    """The @triton.jit kernel, defined on first use so that triton is imported only then."""
    triton = require("triton")
    tl = require("triton.language")

    @triton.jit
    def masked_attention_fwd(
        Q,
        K,
        V,
        Bias,
        TileMask,
        Out,
        sq_b,
        sq_h,
        sq_m,
        sq_d,
        sk_b,
        sk_h,
        sk_n,
        sk_d,
        sv_b,
        sv_h,
        sv_n,
        sv_d,
        sb_b,
        sb_h,
        sb_m,
        sb_n,
        st_b,
        st_h,
        st_m,
        st_n,
        so_b,
        so_h,
        so_m,
        so_d,
        num_heads,
        len_q,
        len_k,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BIAS_KIND: tl.constexpr,  # 0: none, 1: additive float, 2: bool (nonzero = attend)
        HAS_TILE_MASK: tl.constexpr,
        TILES_FROM_BIAS: tl.constexpr,  # without a tile mask: skip key tiles whose bias tile allows no key
        DOT_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        tile_m = tl.program_id(0)
        b = tl.program_id(1) // num_heads
        h = tl.program_id(1) % num_heads
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < len_q
        d_ok = offs_d < HEAD_DIM  # the D tile is padded to a power of two; padded lanes load zeros

        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        kt_ptrs = K + b * sk_b + h * sk_h + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d  # k^T tile
        v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d
        bias_offs = b * sb_b + h * sb_h + offs_m[:, None] * sb_m + offs_n[None, :] * sb_n

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, len_k, BLOCK_N):
            col_ok = start_n + offs_n < len_k
            if HAS_TILE_MASK:
                visit = tl.load(TileMask + b * st_b + h * st_h + tile_m * st_m + (start_n // BLOCK_N) * st_n) != 0
            elif TILES_FROM_BIAS:
                # The tile mask computed here, from the bias tile the scores need anyway: one launch, so an
                # engine's single-kernel (AOT) plugin skips masked tiles too. Lanes past the ends count as masked.
                bias = tl.load(Bias + bias_offs + start_n * sb_n, mask=row_ok[:, None] & col_ok[None, :], other=0)
                if BIAS_KIND == 1:
                    allowed = bias.to(tl.float32) > float("-inf")
                else:
                    allowed = bias != 0
                allowed = allowed & row_ok[:, None] & col_ok[None, :]
                visit = tl.max(tl.max(allowed.to(tl.int32), 1), 0) > 0
            else:
                visit = True
            if visit:
                kt = tl.load(kt_ptrs + start_n * sk_n, mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
                s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
                if BIAS_KIND != 0:
                    if not TILES_FROM_BIAS:
                        bias = tl.load(
                            Bias + bias_offs + start_n * sb_n, mask=row_ok[:, None] & col_ok[None, :], other=0
                        )
                    if BIAS_KIND == 1:
                        s += bias.to(tl.float32)
                    else:
                        s = tl.where(bias != 0, s, float("-inf"))
                s = tl.where(col_ok[None, :], s, float("-inf"))

                new_max = tl.maximum(row_max, tl.max(s, 1))
                # A row with no allowed key so far has max -inf: shifting by 0 instead keeps exp() at 0
                # rather than exp(-inf - -inf) = NaN.
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                p = tl.exp(s - shift[:, None])
                rescale = tl.exp(row_max - shift)
                v = tl.load(v_ptrs + start_n * sv_n, mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
                acc = acc * rescale[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
                row_sum = row_sum * rescale + tl.sum(p, 1)
                row_max = new_max

        # Any allowed key contributes exp(0) = 1 at the row maximum, so row_sum == 0 iff no key is allowed.
        # (Testing == 0 rather than > 0 lets a NaN in the inputs show in the output, as in the reference.)
        no_key = row_sum == 0
        out = tl.where(no_key[:, None], 0.0, acc / tl.where(no_key, 1.0, row_sum)[:, None])
        tl.store(
            Out + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )

    return masked_attention_fwd


def _tile_counts(len_q: int, len_k: int, block_m: int = BLOCK_M, block_n: int = BLOCK_N) -> tuple[int, int]:
    return -(-len_q // block_m), -(-len_k // block_n)


def _out_shape(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    return (*torch.broadcast_shapes(q.shape[:2], k.shape[:2]), q.shape[2], q.shape[3])


def _check(q, k, v, bias, block_mask) -> None:
    """What the kernel supports beyond the reference's shape contract, checked before any launch."""
    check_shapes(q, k, v, bias)
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvalidInputError(
            f"masked_attention_triton takes q, k, v of one dtype among fp16, bf16, fp32; got q {q.dtype}, "
            f"k {k.dtype}, v {v.dtype}: cast them to one of these"
        )
    if v.shape[-1] != q.shape[-1] or not 1 <= q.shape[-1] <= MAX_HEAD_SIZE:
        raise InvalidInputError(
            f"masked_attention_triton needs q, k, v with one head size of at most {MAX_HEAD_SIZE}; got q "
            f"{tuple(q.shape)}, v {tuple(v.shape)}: use the PyTorch reference for other head sizes"
        )
    if bias is not None and (bias.dim() > 4 or not (bias.dtype == torch.bool or bias.is_floating_point())):
        raise InvalidInputError(
            f"masked_attention_triton takes a bool or float bias of at most 4 axes; "
            f"got {bias.dtype} {tuple(bias.shape)}"
        )
    if len({t.device for t in (q, k, v, bias, block_mask) if t is not None}) > 1:
        raise InvalidInputError("masked_attention_triton needs q, k, v, bias and block_mask on one device")
    if block_mask is not None:
        batch, heads, len_q, _ = _out_shape(q, k)
        tiles = _tile_counts(len_q, k.shape[2])
        if (
            block_mask.dtype != torch.bool
            or block_mask.dim() != 4
            or tuple(block_mask.shape[2:]) != tiles
            or block_mask.shape[0] not in (1, batch)
            or block_mask.shape[1] not in (1, heads)
        ):
            raise InvalidInputError(
                f"block_mask must be bool [{batch} or 1, {heads} or 1, {tiles[0]}, {tiles[1]}] (tiles of "
                f"{BLOCK_M}x{BLOCK_N}); got {block_mask.dtype} {tuple(block_mask.shape)}: "
                "build it with block_mask_from_bias"
            )


def _launch(q, k, v, bias, scale, block_mask) -> torch.Tensor:
    _check(q, k, v, bias, block_mask)
    shape = _out_shape(q, k)
    batch, heads, len_q, head_size = shape
    len_k = k.shape[2]
    out = torch.empty(shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    kernel, tl = _kernel(), require("triton.language")
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[q.dtype]
    # Triton's CPU interpreter supports bf16 only through casts (its tl.dot multiplies the raw bits,
    # triton-lang/triton#11584): the dots take fp32 operands there. Elsewhere the casts to DOT_DTYPE are no-ops.
    dot_dtype = tl.float32 if tl_dtype == tl.bfloat16 and q.device.type == "cpu" else tl_dtype
    # expand() broadcasts by stride 0: nothing below copies a broadcast tensor.
    q, k, v = (t.expand(batch, heads, *t.shape[2:]) for t in (q, k, v))
    bias_kind, bias_strides = 0, (0, 0, 0, 0)
    if bias is not None:
        bias_kind = 2 if bias.dtype == torch.bool else 1
        bias = bias.view(torch.uint8) if bias_kind == 2 else bias.to(q.dtype)
        bias = bias[(None,) * (4 - bias.dim())].expand(batch, heads, len_q, len_k)
        bias_strides = bias.stride()
    tile_strides = (0, 0, 0, 0)
    if block_mask is not None:
        block_mask = block_mask.view(torch.uint8).expand(batch, heads, *block_mask.shape[2:])
        tile_strides = block_mask.stride()
    grid = (_tile_counts(len_q, len_k)[0], batch * heads)
    block_d = max(16, 1 << (head_size - 1).bit_length())  # tl.dot needs power-of-two tiles of at least 16
    kernel[grid](
        q,
        k,
        v,
        bias,
        block_mask,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        *tile_strides,
        *out.stride(),
        heads,
        len_q,
        len_k,
        q.shape[-1] ** -0.5 if scale is None else float(scale),
        HEAD_DIM=head_size,
        BLOCK_D=block_d,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BIAS_KIND=bias_kind,
        HAS_TILE_MASK=block_mask is not None,
        TILES_FROM_BIAS=False,
        DOT_DTYPE=dot_dtype,
        # fp32 dots as in the reference (PyTorch does not use TF32 for matmuls by default).
        DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        num_warps=4 if block_d <= 64 else 8,
    )
    return out


@cache
def _op():
    """Registers `vgrt::masked_attention_triton` on first use, so importing this module registers nothing."""

    @torch.library.custom_op("vgrt::masked_attention_triton", mutates_args=())
    def masked_attention_triton_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float | None,
        block_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        return _launch(q, k, v, bias, scale, block_mask)

    @masked_attention_triton_op.register_fake
    def _(q, k, v, bias, scale, block_mask):
        _check(q, k, v, bias, block_mask)
        return q.new_empty(_out_shape(q, k))

    return masked_attention_triton_op


def masked_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    block_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`masked_attention` computed by the Triton kernel, through the custom op `vgrt::masked_attention_triton`.

    Args:
        q: queries [B, H, Lq, D]. k, v: keys and values [B, H, Lk, D]; fp16, bf16 or fp32, D <= 256.
        bias: additive float bias or bool mask (True = attend), broadcastable to [B, H, Lq, Lk].
        scale: score scale; default 1/sqrt(D).
        block_mask: optional bool [B or 1, H or 1, ceil(Lq / BLOCK_M), ceil(Lk / BLOCK_N)]; False promises
            that the (query tile, key tile) pair is fully masked, and the kernel skips that key tile.
    """
    return _op()(q, k, v, bias, scale, block_mask)


def block_mask_from_bias(
    bias: torch.Tensor, lq: int, lk: int, block_m: int = BLOCK_M, block_n: int = BLOCK_N
) -> torch.Tensor:
    """The compact tile mask of `bias`: True where a (query tile, key tile) pair has any allowed key.

    Axes of `bias` that broadcast stay of size 1 in B and H; the result is
    [B or 1, H or 1, ceil(lq / block_m), ceil(lk / block_n)], computed without expanding the bias.
    """
    if bias.dim() > 4 or bias.shape[-2] not in (1, lq) or bias.shape[-1] not in (1, lk):
        raise InvalidInputError(f"bias of shape {tuple(bias.shape)} does not broadcast to [B, H, {lq}, {lk}]")
    allowed = bias if bias.dtype == torch.bool else bias > float("-inf")
    allowed = allowed[(None,) * (4 - allowed.dim())]
    for axis, length, block in ((2, lq, block_m), (3, lk, block_n)):
        allowed = _any_per_tile(allowed, axis, length, block)
    return allowed.contiguous()


def _any_per_tile(allowed: torch.Tensor, axis: int, length: int, block: int) -> torch.Tensor:
    """Reduces `axis` (logical size `length`) to one value per tile of `block` entries: any(tile)."""
    tiles = -(-length // block)
    if allowed.shape[axis] == 1:  # a broadcast axis: every tile holds the same single value
        return allowed.expand(*allowed.shape[:axis], tiles, *allowed.shape[axis + 1 :])
    pad = list(allowed.shape)
    pad[axis] = tiles * block - length  # entries past the end do not exist: never allowed
    allowed = torch.cat([allowed, allowed.new_zeros(pad)], dim=axis)
    return allowed.unflatten(axis, (tiles, block)).any(dim=axis + 1)
