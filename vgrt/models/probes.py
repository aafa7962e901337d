"""The `probes` feature: where the extra tokens' attention falls, as a second UNet output.

`attention_maps [B, R, H, W]`: for latent pixel (h, w), the share of the extra tokens' attention
probability that goes to the tokens of region r (weighted by `token_regions`), averaged over heads and
over every cross-attention layer, each layer's grid repeated up to the latent grid. The extra tokens
have their own softmax, so where the regions together own every token a pixel's shares sum to 1; where
the region restriction hides every token they are 0. The maps read the keys only: values never reach
them (KV-mixed attention places objects by their keys).

The probability is recomputed from q and k in plain ops (the masked-attention node returns only its
output); with at most a few dozen extra tokens per layer that is a small fraction of the layer's work,
and none of it exists in a UNet exported without the feature.
"""

import torch


def region_attention(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, token_regions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Queries [B, Hd, Lq, D], extra keys [B, Hd, Ne, D], bias broadcastable to [B, Hd, Lq, Ne] and
    token_regions [B, R, Ne] -> each region's attention share [B, R, Lq], averaged over heads."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
        row_has_key = scores.amax(dim=-1, keepdim=True) > float("-inf")
        # a finite floor keeps fully masked rows free of NaN; `where` then zeroes them
        scores = scores.clamp_min(torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    if bias is not None:
        probs = torch.where(row_has_key, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    return torch.matmul(token_regions, probs.mean(dim=1).transpose(1, 2))


def to_latent_grid(layer_map: torch.Tensor, factor: int, height: int, width: int) -> torch.Tensor:
    """[B, R, (H/f)*(W/f)] at a layer `factor` times coarser -> [B, R, H, W], each cell repeated f x f."""
    grid = layer_map.unflatten(-1, (height // factor, width // factor))
    if factor == 1:
        return grid
    repeated = grid[:, :, :, None, :, None].expand(-1, -1, -1, factor, -1, factor)
    return repeated.reshape(grid.shape[0], grid.shape[1], height, width)
