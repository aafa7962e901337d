"""diffusers attention processors that implement the conditioning features with `masked_attention`.

Set with `unet.set_attn_processor`; the UNet's forward hands every processor the same `Conditioning`
through `cross_attention_kwargs`. Each processor knows its transformer block (its row of
`layer_gates`) and its downsampling factor (to resize the latent-resolution masks).
"""

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from vgrt.errors import InvalidInputError
from vgrt.models.conditioning import Conditioning, allowed_to_bias, key_mask_bias, region_bias, to_layer_grid
from vgrt.models.probes import region_attention, to_latent_grid
from vgrt.plugins.masked_attention import masked_attention

EXTRA_GATE, MUTUAL_GATE = 0, 1  # columns of Conditioning.layer_gates


def _check_plain_attention(attn: Attention) -> None:
    # SD UNets' transformer attention has none of these; refuse rather than silently drop them.
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection or attn.norm_cross:
        raise InvalidInputError("vgrt processors support the transformer attention of SD UNets only")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]"""
    return x.transpose(1, 2).flatten(2)


def _output(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](_merge(x)))


class _ConditionedProcessor(nn.Module):
    """Shared call contract: project q, k, v, let the subclass attend, project the output.

    diffusers passes `cross_attention_kwargs` only to parameters it finds in this signature by name.
    """

    def __init__(self, features: frozenset[str], block: int, factor: int):
        super().__init__()
        self.features, self.block, self.factor = features, block, factor

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        _check_plain_attention(attn)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k = _heads(attn.to_k(context), attn.heads)
        v = _heads(attn.to_v(context), attn.heads)
        return _output(attn, self.attend(attn, q, k, v, conditioning or Conditioning()))

    def attend(
        self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        raise NotImplementedError


class CrossAttentionProcessor(_ConditionedProcessor):
    """Text cross-attention, optionally key-masked, plus an optional extra token set.

    The extra tokens have their own K/V projections and softmax (decoupled cross-attention as in
    IP-Adapter); their output is added times a per-query gate and the block's `layer_gates` scale.
    `to_k_extra` / `to_v_extra` are IP-Adapter's `to_k_ip` / `to_v_ip` (loaded from its checkpoint by
    vgrt.models.adapter_checkpoints); its `scale` is the `layer_gates` extra column, its masks the gate.
    Keys may come from a different token set than values (kv_source), tokens may be restricted to
    regions (regions), and each region's attention share may be reported (probes).
    """

    def __init__(self, features: frozenset[str], block: int, factor: int, context_dim: int, inner_dim: int):
        super().__init__(features, block, factor)
        if "extra_tokens" in features:
            self.to_k_extra = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_v_extra = nn.Linear(context_dim, inner_dim, bias=False)

    def attend(
        self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        text_bias = key_mask_bias(cond.key_mask, q.dtype) if "key_mask" in self.features else None
        out = masked_attention(q, k, v, text_bias, scale=attn.scale)
        if "extra_tokens" in self.features:
            out = out + self._extra(attn, q, cond)
        return out

    def _extra(self, attn: Attention, q: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        key_tokens = cond.extra_key_tokens if "kv_source" in self.features else cond.extra_tokens
        k = _heads(self.to_k_extra(key_tokens), attn.heads)
        v = _heads(self.to_v_extra(cond.extra_tokens), attn.heads)
        bias = (
            region_bias(cond.region_masks, cond.token_regions, self.factor, q.dtype)
            if "regions" in self.features
            else None
        )
        out = masked_attention(q, k, v, bias, scale=attn.scale)
        if "probes" in self.features:
            shares = region_attention(q, k, bias, cond.token_regions, attn.scale)
            cond.probe_maps.append(to_latent_grid(shares, self.factor, *cond.region_masks.shape[-2:]))
        gate = to_layer_grid(cond.extra_gate, self.factor)[:, :, :, None]  # [B, 1, Lq, 1]
        return out * (gate * cond.layer_gates[self.block, EXTRA_GATE])


class SelfAttentionProcessor(_ConditionedProcessor):
    """Self-attention, optionally blended with mutual attention over other batch rows in some rows.

    Mutual attention (MasaCtrl, MCA-Ctrl's SALQ and SAGI) runs only for the rows listed in `mutual_rows`
    (distinct batch rows; every other row is plain self-attention): for the j-th listed row and softmax
    group g, the queries of row q_index[g, j] attend to the keys and values of row kv_index[g, j],
    restricted to the keys self_key_masks[g, j] allows; the groups' outputs are summed with per-query
    gates self_out_gates[g, j]. The block's `layer_gates` value blends the listed rows' plain (0) and
    mutual (1) attention; the other rows are never computed twice.
    """

    def attend(
        self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        out = masked_attention(q, k, v, scale=attn.scale)
        if "mutual" in self.features:
            plain = out.index_select(0, cond.mutual_rows)
            blend = cond.layer_gates[self.block, MUTUAL_GATE]
            blended = plain + blend * (self._mutual(attn, q, k, v, cond) - plain)
            out = out.index_copy(0, cond.mutual_rows, blended)
        return out

    def _mutual(
        self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """[R, H, L, D]: the mutual attention of each listed row."""
        groups, rows = cond.kv_index.shape
        kv_rows = cond.kv_index.reshape(-1)
        q_rows = q.index_select(0, cond.q_index.reshape(-1))
        key_allowed = to_layer_grid(cond.self_key_masks, self.factor).reshape(groups * rows, -1) > 0
        bias = allowed_to_bias(key_allowed, q.dtype)[:, None, None, :]
        grouped = masked_attention(
            q_rows, k.index_select(0, kv_rows), v.index_select(0, kv_rows), bias, scale=attn.scale
        )
        gates = to_layer_grid(cond.self_out_gates, self.factor).reshape(groups * rows, 1, -1, 1)
        return (grouped * gates).unflatten(0, (groups, rows)).sum(dim=0)
