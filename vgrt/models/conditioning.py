"""Per-call conditioning tensors, and how each attention layer reads them at its own resolution.

The host gives spatial masks once, at latent resolution; every layer resizes them in the graph to its
own grid by area averaging (its downsampling factor is fixed by its place in the UNet). A resized mask
counts a cell as inside when any of its latent pixels is inside, so thin masks never vanish at coarse
layers. Dense [Lq, Lk] masks are never graph inputs.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass
class Conditioning:
    """Graph inputs of the conditioning features; a field is None when its feature is off."""

    key_mask: torch.Tensor | None = None  # [B, Lt], 1 = attend
    extra_tokens: torch.Tensor | None = None  # [B, Ne, Dc], value source (and key source without kv_source)
    extra_key_tokens: torch.Tensor | None = None  # [B, Ne, Dc]
    extra_gate: torch.Tensor | None = None  # [B, 1, H, W] per-query output gate of the extra tokens
    region_masks: torch.Tensor | None = None  # [B, R, H, W], 1 = query inside region r
    token_regions: torch.Tensor | None = None  # [B, R, Ne], 1 = extra token j belongs to region r
    mutual_rows: torch.Tensor | None = None  # [R] distinct batch rows whose self-attention reads other rows
    q_index: torch.Tensor | None = None  # [G, R] batch row whose queries group g of listed row j uses
    kv_index: torch.Tensor | None = None  # [G, R] batch row whose K/V group g of listed row j reads
    self_key_masks: torch.Tensor | None = None  # [G, R, H, W], 1 = key allowed in group g
    self_out_gates: torch.Tensor | None = None  # [G, R, H, W] per-query weight of group g's output
    layer_gates: torch.Tensor | None = None  # [blocks, 2]: extra-token scale, mutual blend
    probe_maps: list[torch.Tensor] | None = None  # with `probes`: each cross-attention layer appends [B, R, H, W]


def to_layer_grid(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """[..., H, W] latent-resolution mask -> [..., (H/f)*(W/f)] at a layer `factor` times coarser."""
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    if factor > 1:
        flat = F.avg_pool2d(flat, kernel_size=factor)
    return flat.reshape(*lead, -1)


def allowed_to_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, NEG_INF)


def key_mask_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Lk] 1 = attend -> additive bias [B, 1, 1, Lk]."""
    return allowed_to_bias(key_mask > 0.5, dtype)[:, None, None, :]


def region_bias(
    region_masks: torch.Tensor, token_regions: torch.Tensor, factor: int, dtype: torch.dtype
) -> torch.Tensor:
    """Bias [B, 1, Lq, Ne]: query i may attend token j if they share a region, or if j has no region."""
    query_in = (to_layer_grid(region_masks, factor) > 0).to(dtype)  # [B, R, Lq]
    token_in = (token_regions > 0.5).to(dtype)  # [B, R, Ne]
    shared = torch.einsum("bri,brj->bij", query_in, token_in) > 0
    unowned = token_in.amax(dim=1) == 0  # [B, Ne]
    return allowed_to_bias(shared | unowned[:, None, :], dtype)[:, None]
