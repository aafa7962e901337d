"""KV-mixed cross-attention and the `probes` output: keys place the objects, values dress them.

At one attention layer the maps depend on queries and keys only. Through a whole UNet they do not stay
fixed when values change (a layer's output becomes the next layers' queries), so the KV-mixed
statements are tested where they hold exactly: per layer.
"""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from vgrt.errors import InvalidInputError
from vgrt.export.feeds import random_feed
from vgrt.export.spec import unet_spec
from vgrt.models.conditioning import Conditioning
from vgrt.models.features import parse_features
from vgrt.models.presets import get_preset
from vgrt.models.processors import CrossAttentionProcessor
from vgrt.models.source import ModelSource
from vgrt.models.unet import build_unet

B, H, W, C, CTX, OBJECTS, TOKENS = 2, 4, 4, 32, 16, 2, 3
KV_PROBES = frozenset({"extra_tokens", "kv_source", "regions", "probes"})


def layer():
    torch.manual_seed(0)
    attn = Attention(query_dim=C, cross_attention_dim=CTX, heads=4, dim_head=8).eval()
    return attn, CrossAttentionProcessor(KV_PROBES, block=0, factor=1, context_dim=CTX, inner_dim=C)


def layer_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    region_masks = torch.ones(B, OBJECTS, H, W)
    region_masks[:, 1, :1] = 0  # the top row is outside object 1's region
    return {
        "hidden": torch.randn(B, H * W, C, generator=g),
        "text": torch.randn(B, 7, CTX, generator=g),
        "extra_tokens": torch.randn(B, OBJECTS * TOKENS, CTX, generator=g),
        "extra_key_tokens": torch.randn(B, OBJECTS * TOKENS, CTX, generator=g),
        "region_masks": region_masks,
        "token_regions": torch.eye(OBJECTS).repeat_interleave(TOKENS, dim=1).expand(B, -1, -1).contiguous(),
    }


def run(attn, processor, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    maps: list[torch.Tensor] = []
    cond = Conditioning(
        extra_tokens=x["extra_tokens"], extra_key_tokens=x["extra_key_tokens"], extra_gate=torch.ones(B, 1, H, W),
        region_masks=x["region_masks"], token_regions=x["token_regions"], layer_gates=torch.ones(1, 2), probe_maps=maps,
    )  # fmt: skip
    with torch.no_grad():
        out = processor(attn, x["hidden"], x["text"], conditioning=cond)
    return out, maps[0]


def test_values_change_the_output_but_not_the_maps_keys_change_the_maps():
    attn, processor = layer()
    x = layer_inputs()
    out, maps = run(attn, processor, x)
    new_values = {**x, "extra_tokens": x["extra_tokens"] + torch.randn(x["extra_tokens"].shape)}
    out_v, maps_v = run(attn, processor, new_values)
    assert (out_v - out).abs().amax() > 1e-3
    torch.testing.assert_close(maps_v, maps, rtol=0, atol=0)
    new_keys = {**x, "extra_key_tokens": x["extra_key_tokens"] + torch.randn(x["extra_key_tokens"].shape)}
    out_k, maps_k = run(attn, processor, new_keys)
    assert (maps_k - maps).abs().amax() > 1e-3 and (out_k - out).abs().amax() > 1e-3


def test_maps_are_each_regions_share_of_the_attention_probabilities():
    """Against diffusers' own attention scores of the extra keys: per region, the probability mass of its
    tokens, averaged over heads; object 1's tokens are hidden on the top row, so object 0 takes it all."""
    attn, processor = layer()
    x = layer_inputs()
    _, maps = run(attn, processor, x)
    query = attn.head_to_batch_dim(attn.to_q(x["hidden"]))
    key = attn.head_to_batch_dim(processor.to_k_extra(x["extra_key_tokens"]))
    with torch.no_grad():
        probs = attn.get_attention_scores(query, key).unflatten(0, (B, attn.heads)).mean(dim=1)  # [B, Lq, Ne]
    top = torch.arange(H * W) < W
    probs[:, top, TOKENS:] = 0  # hidden tokens
    probs[:, top] /= probs[:, top].sum(dim=-1, keepdim=True)
    expected = torch.einsum("bqj,brj->brq", probs, x["token_regions"]).unflatten(-1, (H, W))
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(B, H, W))
    assert torch.equal(maps[:, 1, 0], torch.zeros(B, W))


@pytest.fixture(scope="module")
def unets():
    source = ModelSource("tiny")
    return build_unet(source, KV_PROBES), build_unet(source, KV_PROBES - {"probes"})


def test_unet_returns_the_maps_as_a_second_output_and_the_same_noise(unets):
    probed, plain = unets
    spec = unet_spec(get_preset("tiny"), probed.features, "float32", probed.num_blocks)
    assert [t.name for t in spec.outputs] == ["noise_pred", "attention_maps"]
    plain_spec = unet_spec(get_preset("tiny"), plain.features, "float32", plain.num_blocks)
    assert [t.name for t in plain_spec.outputs] == ["noise_pred"]
    feed = random_feed(spec, seed=3)
    with torch.no_grad():
        noise, maps = probed(**feed)
        torch.testing.assert_close(noise, plain(**feed), rtol=0, atol=0)
    batch, regions = feed["token_regions"].shape[:2]
    assert maps.shape == (batch, regions, *feed["sample"].shape[2:])
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6  # shares of a probability


def test_layer_maps_are_repeated_up_to_the_latent_grid():
    from vgrt.models.probes import to_latent_grid

    coarse = torch.arange(8.0).reshape(1, 2, 4)  # two regions on a 2x2 grid
    fine = to_latent_grid(coarse, factor=2, height=4, width=4)
    assert fine.shape == (1, 2, 4, 4)
    torch.testing.assert_close(fine[0, 1], torch.tensor([[4.0, 4, 5, 5], [4, 4, 5, 5], [6, 6, 7, 7], [6, 6, 7, 7]]))


def test_probes_need_regions_and_are_not_part_of_all():
    with pytest.raises(InvalidInputError, match="add 'regions'"):
        parse_features("extra_tokens,probes")
    assert "probes" not in parse_features("all")
