"""Each conditioning feature at the level of one attention layer: it acts exactly where it should.

Every test here would fail if its feature were ignored: it checks both that the feature changes the
output where it applies and that it leaves the output alone where it must not reach.
"""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from vgrt.models.conditioning import Conditioning
from vgrt.models.processors import CrossAttentionProcessor, SelfAttentionProcessor

B, H, W, C, CTX, NE = 2, 4, 4, 32, 16, 4
L = H * W


def attention(cross: bool) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=C, cross_attention_dim=CTX if cross else None, heads=4, dim_head=8).eval()


def cross(features: set[str], seed: int = 1) -> tuple[Attention, CrossAttentionProcessor]:
    attn = attention(cross=True)
    torch.manual_seed(seed)
    return attn, CrossAttentionProcessor(frozenset(features), block=0, factor=1, context_dim=CTX, inner_dim=C)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, C, generator=g), torch.randn(B, 7, CTX, generator=g), torch.randn(B, NE, CTX, generator=g)


def gates(extra: float = 1.0, mutual: float = 1.0) -> torch.Tensor:
    return torch.tensor([[extra, mutual]])


def run(attn, processor, hidden, context=None, **cond):
    with torch.no_grad():
        return processor(attn, hidden, context, conditioning=Conditioning(**cond))


def test_key_mask_hides_masked_tokens_only():
    attn, proc = cross({"key_mask"})
    hidden, context, _ = inputs()
    mask = torch.ones(B, 7)
    mask[:, 5:] = 0
    base = run(attn, proc, hidden, context, key_mask=mask)
    changed_masked, changed_kept = context.clone(), context.clone()
    changed_masked[:, 5:] += 3.0
    changed_kept[:, :2] += 3.0
    torch.testing.assert_close(run(attn, proc, hidden, changed_masked, key_mask=mask), base)
    assert not torch.allclose(run(attn, proc, hidden, changed_kept, key_mask=mask), base)
    # all-ones mask is exactly stock attention
    torch.testing.assert_close(
        run(attn, proc, hidden, context, key_mask=torch.ones(B, 7)), run(attn, AttnProcessor2_0(), hidden, context)
    )


def test_extra_tokens_act_only_where_gated():
    attn, proc = cross({"extra_tokens"})
    hidden, context, extra = inputs()
    gate = torch.zeros(B, 1, H, W)
    gate[..., :, W // 2 :] = 1.0  # right half of the grid
    right = gate.reshape(B, L) > 0
    base = run(attn, proc, hidden, context, extra_tokens=extra, extra_gate=gate, layer_gates=gates())
    other = run(attn, proc, hidden, context, extra_tokens=extra + 1.0, extra_gate=gate, layer_gates=gates())
    torch.testing.assert_close(other[~right], base[~right])
    assert (other[right] - base[right]).abs().amax() > 1e-3
    stock = run(attn, AttnProcessor2_0(), hidden, context)
    torch.testing.assert_close(base[~right], stock[~right])
    # the per-block layer gate switches the feature off without re-export
    off = run(attn, proc, hidden, context, extra_tokens=extra + 1.0, extra_gate=gate, layer_gates=gates(extra=0.0))
    torch.testing.assert_close(off, stock)


def test_kv_source_takes_keys_from_the_key_tokens():
    attn, proc = cross({"extra_tokens", "kv_source"})
    hidden, context, extra = inputs()
    cond = {
        "extra_tokens": extra,
        "extra_key_tokens": extra.flip(1),
        "extra_gate": torch.ones(B, 1, H, W),
        "layer_gates": gates(),
    }
    base = run(attn, proc, hidden, context, **cond)
    assert not torch.allclose(run(attn, proc, hidden, context, **{**cond, "extra_key_tokens": extra}), base, atol=1e-4)
    attn_plain, proc_plain = cross({"extra_tokens"})
    same_keys = run(attn, proc, hidden, context, **{**cond, "extra_key_tokens": extra})
    torch.testing.assert_close(
        same_keys,
        run(attn_plain, proc_plain, hidden, context, **{k: v for k, v in cond.items() if k != "extra_key_tokens"}),
    )


def test_regions_restrict_tokens_to_their_region():
    attn, proc = cross({"extra_tokens", "regions"})
    hidden, context, extra = inputs()
    region_masks = torch.zeros(B, 2, H, W)
    region_masks[:, 0, :1] = 1  # region 0: top row
    region_masks[:, 1, 2:] = 1  # region 1: bottom two rows; row 1 is in no region
    token_regions = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float32).expand(B, 2, NE)
    cond = {
        "extra_gate": torch.ones(B, 1, H, W),
        "region_masks": region_masks,
        "token_regions": token_regions,
        "layer_gates": gates(),
    }
    base = run(attn, proc, hidden, context, extra_tokens=extra, **cond)
    moved = extra.clone()
    moved[:, 2:] += 2.0  # tokens of region 1 only
    other = run(attn, proc, hidden, context, extra_tokens=moved, **cond)
    rows = torch.arange(L) // W
    torch.testing.assert_close(other[:, rows < 2], base[:, rows < 2])
    assert (other[:, rows >= 2] - base[:, rows >= 2]).abs().amax() > 1e-3
    # queries in no region see none of the (all owned) tokens: stock attention there, and no NaN
    stock = run(attn, AttnProcessor2_0(), hidden, context)
    torch.testing.assert_close(base[:, rows == 1], stock[:, rows == 1])
    assert torch.isfinite(base).all()


def mutual():
    attn = attention(cross=False)
    return attn, SelfAttentionProcessor(frozenset({"mutual"}), block=0, factor=1)


def identity_groups(groups: int = 1, rows: tuple[int, ...] = tuple(range(B))):
    """Every listed row's groups read the row itself, over every key."""
    listed = torch.tensor(rows)
    return {
        "mutual_rows": listed,
        "q_index": listed.expand(groups, len(rows)).contiguous(),
        "kv_index": listed.expand(groups, len(rows)).contiguous(),
        "self_key_masks": torch.ones(groups, len(rows), H, W),
        "self_out_gates": torch.ones(groups, len(rows), H, W) / groups,
    }


def test_mutual_with_identity_groups_is_plain_self_attention():
    attn, proc = mutual()
    hidden, _, _ = inputs()
    stock = run(attn, AttnProcessor2_0(), hidden)
    torch.testing.assert_close(run(attn, proc, hidden, **identity_groups(2), layer_gates=gates()), stock)


def test_mutual_reads_keys_of_other_rows_under_the_key_mask():
    attn, proc = mutual()
    hidden, _, _ = inputs()
    cond = identity_groups(rows=(0,))
    cond["kv_index"] = torch.tensor([[1]])  # row 0 attends to row 1's keys and values
    cond["self_key_masks"][:, :, :, : W // 2] = 0  # only the right half of the keys is allowed
    base = run(attn, proc, hidden, **cond, layer_gates=gates())
    stock = run(attn, AttnProcessor2_0(), hidden)
    assert (base[0] - stock[0]).abs().amax() > 1e-3
    torch.testing.assert_close(base[1], stock[1])  # row 1 is not listed: plain self-attention
    masked_keys = (torch.arange(L) % W) < W // 2
    changed = hidden.clone()
    changed[1, masked_keys] += 5.0  # row 1's masked-out keys; row 0 must not see them
    torch.testing.assert_close(run(attn, proc, changed, **cond, layer_gates=gates())[0], base[0])
    # the layer gate blends back to plain attention
    torch.testing.assert_close(run(attn, proc, hidden, **cond, layer_gates=gates(mutual=0.0)), stock)


def test_mutual_query_index_takes_another_rows_queries():
    attn, proc = mutual()
    hidden, _, _ = inputs()
    cond = identity_groups(rows=(0,))
    cond["q_index"] = torch.tensor([[1]])
    cond["kv_index"] = torch.tensor([[1]])
    out = run(attn, proc, hidden, **cond, layer_gates=gates())
    torch.testing.assert_close(out[0], out[1])  # row 0 now computes exactly row 1's attention
    assert not torch.allclose(out[0], run(attn, AttnProcessor2_0(), hidden)[0])


def test_mutual_rows_place_each_listed_rows_result_in_its_own_row():
    """Listed in any order, each row gets the groups at its own position in mutual_rows."""
    attn, proc = mutual()
    hidden, _, _ = inputs()
    swapped = identity_groups(rows=(1, 0))
    swapped["kv_index"] = torch.tensor([[0, 1]])  # row 1 reads row 0, row 0 reads row 1
    out = run(attn, proc, hidden, **swapped, layer_gates=gates())
    for row in (0, 1):
        alone = identity_groups(rows=(row,))
        alone["kv_index"] = torch.tensor([[1 - row]])
        torch.testing.assert_close(out[row], run(attn, proc, hidden, **alone, layer_gates=gates())[row])
    assert (out - run(attn, AttnProcessor2_0(), hidden)).abs().amax() > 1e-3


def test_mutual_groups_take_queries_from_different_rows():
    """MCA-Ctrl's SAGI: the target's foreground group uses the subject's queries, its background group
    the condition's; with gates splitting the grid, each half of the target copies one branch."""
    attn, proc = mutual()
    hidden, _, _ = inputs()
    hidden = torch.cat([hidden, hidden[:1] * -1.0])  # three rows: condition, subject, target
    left = torch.zeros(1, H, W)
    left[..., : W // 2] = 1
    cond = {
        "mutual_rows": torch.tensor([2]),  # only the target reads other rows
        "kv_index": torch.tensor([[1], [0]]),
        "q_index": torch.tensor([[1], [0]]),
        "self_key_masks": torch.ones(2, 1, H, W),
        "self_out_gates": torch.stack([left, 1 - left]),
    }
    out = run(attn, proc, hidden, **cond, layer_gates=gates())
    stock = run(attn, AttnProcessor2_0(), hidden)
    in_left = left[0].reshape(L) > 0
    torch.testing.assert_close(out[2, in_left], stock[1, in_left])  # subject's attention output
    torch.testing.assert_close(out[2, ~in_left], stock[0, ~in_left])  # condition's attention output
    torch.testing.assert_close(out[:2], stock[:2])


@pytest.mark.parametrize("factor", [1, 2])
def test_masks_are_resized_to_the_layer_grid(factor):
    from vgrt.models.conditioning import to_layer_grid

    mask = torch.zeros(1, 1, 4 * factor, 4 * factor)
    mask[..., 0, 0] = 1  # one latent pixel
    grid = to_layer_grid(mask, factor)
    assert grid.shape == (1, 1, 16)
    assert (grid > 0).sum() == 1 and grid[0, 0, 0] > 0  # a thin mask survives at a coarse layer
